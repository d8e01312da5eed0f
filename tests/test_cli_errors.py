"""Every bad argument of ``distill``, ``outliers``, ``cache`` and ``check``: argparse's one
``error:`` line naming the flag, exit status 2, no traceback, and nothing trained, scanned or
recorded.

Files, folders and single values are checked at parse time; what several flags (or a flag and
the teacher's config) must agree on is checked before anything trains. The runs are replaced
by a failure, so a check that goes missing shows as that failure, not as a long run.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

pytest.importorskip("transformers")

from eofd_kernels import cli  # noqa: E402
from eofd_kernels.distill import cache_job, outliers_job, record_teacher, run  # noqa: E402
from tests.test_distill_cli import bert_folder  # noqa: E402


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """Named bad (and one good) inputs, for the ``{name}`` fields of the cases."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("cli_errors")
    # head size 8, 3 layers and 64 positions (the defaults fit)
    tiny = bert_folder(root / "tiny", hidden=32, heads=4, layers=3, positions=64)
    broken = {}
    for name, remove in (("no_weights", "model.safetensors"), ("no_tokenizer", "vocab.txt")):
        broken[name] = root / name
        shutil.copytree(tiny, broken[name])
        (broken[name] / remove).unlink()
        if name == "no_tokenizer":
            for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                (broken[name] / extra).unlink(missing_ok=True)
    small_vocab = root / "small_vocab"  # a tokenizer with more tokens than the model embeds
    shutil.copytree(tiny, small_vocab)
    config = BertConfig.from_pretrained(tiny)
    config.vocab_size = 9
    BertModel(config).save_pretrained(small_vocab)
    no_type = root / "no_type"
    no_type.mkdir()
    (no_type / "config.json").write_text("{}")
    bad_json = root / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    no_config = root / "no_config"
    no_config.mkdir()
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n  \n\t\n")
    (root / "binary.bin").write_bytes(bytes(range(256)))
    (root / "utf16.txt").write_bytes("One sentence.\n".encode("utf-16"))
    (root / "file.txt").write_text("A sentence.\n")
    caches = _caches(root, tiny)
    return {**caches, "tiny": str(tiny), **{k: str(v) for k, v in broken.items()},
            "small_vocab": str(small_vocab), "no_type": str(no_type),
            "bad_json": str(bad_json), "no_config": str(no_config),
            "empty": str(root / "empty.txt"), "blank": str(root / "blank.txt"),
            "binary": str(root / "binary.bin"), "utf16": str(root / "utf16.txt"),
            "file": str(root / "file.txt"), "missing": str(root / "missing"),
            "folder": str(root)}


def _caches(root, tiny) -> dict[str, str]:
    """Teacher caches of 4 examples: all of tiny's hidden states, only its embeddings, all of
    another teacher's, and the first with a truncated shard."""
    from transformers import BertConfig, BertModel

    quiet = lambda *_: None  # noqa: E731
    ids = torch.randint(5, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    model = BertModel.from_pretrained(tiny)
    other = BertModel(BertConfig(vocab_size=model.config.vocab_size, hidden_size=16,
                                 num_attention_heads=2, num_hidden_layers=3,
                                 intermediate_size=32))
    for name, teacher, layers in (("cache_all", model, [0, 1, 2, 3]),
                                  ("cache_layer0", model, [0]),
                                  ("cache_other", other, [0, 1, 2, 3])):
        record_teacher(teacher, batches, layers=layers, out=root / name, print_fn=quiet)
    shutil.copytree(root / "cache_all", root / "cache_truncated")
    shard = next((root / "cache_truncated").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    index = json.loads((root / "cache_all" / "index.json").read_text())
    for name, text in (("cache_list_index", "[]"),
                       ("cache_no_shards", json.dumps({k: v for k, v in index.items()
                                                       if k != "shards"}))):
        shutil.copytree(root / "cache_all", root / name)
        (root / name / "index.json").write_text(text)
    return {name: str(root / name) for name in
            ("cache_all", "cache_layer0", "cache_other", "cache_truncated", "cache_list_index",
             "cache_no_shards")}


MODEL_COMMON = [  # flags distill and outliers share
    ("--teacher", ["--teacher={missing}"]),
    ("--teacher", ["--teacher={file}"]),
    ("--teacher", ["--teacher={no_config}"]),
    ("--teacher", ["--teacher={bad_json}"]),
    ("--teacher", ["--teacher={no_type}"]),
    ("--teacher", ["--teacher={no_weights}"]),
    ("--teacher", ["--teacher={no_tokenizer}"]),
    ("--teacher", ["--teacher={small_vocab}"]),
    ("--power", ["--power=nan"]),
    ("--power", ["--power=inf"]),
    ("--power", ["--power=half"]),
    ("--batch-size", ["--batch-size=0"]),
    ("--batch-size", ["--batch-size=-3"]),
    ("--batch-size", ["--batch-size=2.5"]),
    ("--max-length", ["--max-length=0"]),
    ("--max-length", ["--max-length=2"]),
    ("--max-length", ["--teacher={tiny}", "--max-length=65"]),  # past its 64 positions
    ("--device", ["--device=tpu9"]),
    ("--device", ["--device=cuda:64"]),
    ("--device", ["--device=meta"]),
    ("--backend", ["--backend=fast"]),
    ("--backend", ["--backend=ext"]),  # not available here (patched below)
    ("--out", ["--out={file}"]),
    ("--out", ["--out={file}/sub"]),
]
if sys.platform == "linux":  # /proc takes no files, not even root's
    MODEL_COMMON.append(("--out", ["--out=/proc/eofd-out"]))

CASES = [
    *(("distill", flag, argv) for flag, argv in MODEL_COMMON),
    ("distill", "--steps", ["--steps=0"]),
    ("distill", "--steps", ["--steps=-2"]),
    ("distill", "--lr", ["--lr=0"]),
    ("distill", "--lr", ["--lr=-1e-3"]),
    ("distill", "--lr", ["--lr=nan"]),
    ("distill", "--seed", ["--seed=-1"]),
    ("distill", "--seed", [f"--seed={2**32}"]),
    ("distill", "--student-layers", ["--student-layers=0"]),
    ("distill", "--student-layers", ["--teacher={tiny}", "--student-layers=4"]),
    ("distill", "--student-width", ["--student-width=0"]),
    ("distill", "--student-width", ["--teacher={tiny}", "--student-width=20"]),
    ("distill", "--nproc", ["--nproc=0"]),
    ("distill", "--nproc", ["--nproc=-4"]),
    ("distill", "--nproc", ["--nproc=100000"]),
    ("distill", "--batch-size", ["--nproc=2", "--batch-size=5"]),
    ("distill", "--batch-size", ["--batch-size=100000"]),  # more than the text's sentences
    ("distill", "--teacher-cache", ["--teacher-cache={missing}"]),
    ("distill", "--teacher-cache", ["--teacher-cache={file}"]),
    ("distill", "--teacher-cache", ["--teacher-cache={folder}"]),  # no index.json
    ("distill", "--teacher-cache", ["--teacher={tiny}", "--teacher-cache={cache_truncated}",
                                    "--batch-size=4"]),
    ("distill", "--teacher-cache", ["--teacher={tiny}", "--teacher-cache={cache_other}",
                                    "--batch-size=4"]),
    ("distill", "--teacher-cache", ["--teacher={tiny}", "--teacher-cache={cache_layer0}",
                                    "--batch-size=4"]),
    ("distill", "--teacher-cache", ["--teacher={tiny}", "--teacher-cache={cache_list_index}",
                                    "--batch-size=4"]),
    ("distill", "--teacher-cache", ["--teacher={tiny}", "--teacher-cache={cache_no_shards}",
                                    "--batch-size=4"]),
    ("distill", "--batch-size", ["--teacher={tiny}", "--teacher-cache={cache_all}"]),  # 16 > 4
    ("distill", "--power", ["--power", "0.5", "1", "0.50000001"]),  # one student name twice
    *(("cache", flag, argv) for flag, argv in MODEL_COMMON
      if flag in ("--teacher", "--batch-size", "--max-length", "--device", "--out")),
    ("cache", "--layers", ["--layers=x"]),
    ("cache", "--layers", ["--layers=-1"]),
    ("cache", "--layers", ["--layers=1,1"]),
    ("cache", "--layers", ["--layers="]),
    ("cache", "--layers", ["--teacher={tiny}", "--layers=0,4"]),  # hidden states 0..3
    ("cache", "--logits", ["--logits=0"]),
    ("cache", "--logits", ["--logits=x"]),
    ("cache", "--logits", ["--teacher={tiny}", "--logits=full"]),  # a BertModel: no head
    ("cache", "--logits", ["--logits=5"]),  # the default teacher is a base model too
    ("cache", "--dtype", ["--dtype=fp16"]),
    ("cache", "--text", ["--text={missing}"]),
    ("cache", "--text", ["--text={folder}"]),
    ("cache", "--text", ["--text={empty}"]),
    ("cache", "--text", ["--text={binary}"]),
    ("cache", "--nproc", ["--nproc=0"]),
    ("cache", "--nproc", ["--nproc=100000"]),
    *(("outliers", flag, argv) for flag, argv in MODEL_COMMON),
    ("outliers", "--text", ["--text={missing}"]),
    ("outliers", "--text", ["--text={folder}"]),
    ("outliers", "--text", ["--text={empty}"]),
    ("outliers", "--text", ["--text={blank}"]),
    ("outliers", "--text", ["--text={binary}"]),
    ("outliers", "--text", ["--text={utf16}"]),
    ("outliers", "--batches", ["--batches=0"]),
    ("outliers", "--batches", ["--batches=-3"]),
    ("outliers", "--top", ["--top=0"]),
    ("outliers", "--top", ["--top=-1"]),
    ("outliers", "--threshold", ["--threshold=nan"]),
    ("outliers", "--threshold", ["--threshold=-1"]),
    ("outliers", "--backend", ["--backend=reference"]),  # the paper's code has no moments
    ("outliers", "--criterion", ["--criterion=mean"]),
    ("check", "--reps", ["--reps=0"]),
    ("check", "--reps", ["--reps=-1"]),
    ("check", "--reps", ["--reps=x"]),
    ("check", "--device", ["--device=tpu9"]),
    ("check", "--device", ["--device=cuda:64"]),
]


def _never(*_args, **_kwargs):
    pytest.fail("a bad argument got past the checks")


@pytest.mark.parametrize("command, flag, argv", CASES,
                         ids=[f"{c}-{' '.join(a)}" for c, _, a in CASES])
def test_bad_argument_is_one_error_line(monkeypatch, capsys, paths, command, flag, argv):
    for target, name in ((run, "run_distill"), (outliers_job, "run_outliers"),
                         (cache_job, "run_cache"), (cli, "_relaunch_with_torchrun")):
        monkeypatch.setattr(target, name, _never)
    if command == "cache" and flag != "--out":
        argv = [*argv, "--out={folder}/new-cache"]
    # Fixed here, so the cases mean the same on every machine: 4 cores (--nproc 2 allowed,
    # 100000 not), and ext missing.
    monkeypatch.setattr(cli, "usable_cpus", lambda: 4)
    monkeypatch.setattr(cli, "available_backends", lambda device: ["torch", "reference"])
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, *(a.format(**paths) for a in argv)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"eofd-kernels {command}: error: argument {flag}"), err


@pytest.mark.parametrize("command, argv", [
    ("distill", []),
    ("distill", ["--teacher={tiny}", "--student-layers=3", "--student-width=16", "--nproc=2",
                 "--batch-size=4", "--max-length=64", "--out={folder}/new/plots"]),
    ("distill", ["--teacher={tiny}", "--teacher-cache={cache_all}", "--batch-size=4"]),
    ("outliers", []),
    ("outliers", ["--teacher={tiny}", "--text={file}", "--threshold=0", "--top=1"]),
    ("cache", ["--out={folder}/new-cache"]),
    ("cache", ["--teacher={tiny}", "--layers=0,3", "--text={file}", "--nproc=2",
               "--out={folder}/new-cache"]),
])
def test_good_arguments_reach_the_run(monkeypatch, paths, command, argv):
    """The other side of the checks: valid values (the defaults, and the bounds) pass them."""
    reached = []
    monkeypatch.setattr(run, "run_distill", lambda cfg, **_: reached.append(cfg) or
                        {"finite": True})
    monkeypatch.setattr(outliers_job, "run_outliers", lambda cfg, **_: reached.append(cfg))
    monkeypatch.setattr(cache_job, "run_cache", lambda cfg, **_: reached.append(cfg))
    monkeypatch.setattr(cli, "_relaunch_with_torchrun", lambda nproc, argv: reached.append(nproc)
                        or 0)
    monkeypatch.setattr(cli, "usable_cpus", lambda: 4)
    assert cli.main([command, *(a.format(**paths) for a in argv)]) == 0
    assert len(reached) == 1


@pytest.mark.parametrize("case", ["another recording in --out", "top k of all classes",
                                  "a head without logits"])
def test_cache_errors_found_on_the_first_batch(capsys, tmp_path, paths, case):
    """What only the recording finds (before it writes anything) is one error line too."""
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

    out, flag, extra = tmp_path / "out", "--logits", []
    if case == "another recording in --out":  # recorded at fp32, asked at bf16
        shutil.copytree(paths["cache_all"], out)
        teacher, flag, extra = paths["tiny"], "--out", ["--dtype=bf16"]
    else:
        model_class = BertForMaskedLM if case == "top k of all classes" else BertForPreTraining
        teacher = tmp_path / "head"
        shutil.copytree(paths["tiny"], teacher)
        model_class(BertConfig.from_pretrained(teacher)).save_pretrained(teacher)
        extra = [f"--logits={10**6 if case == 'top k of all classes' else 5}"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["cache", f"--teacher={teacher}", f"--out={out}", "--text={file}".format(**paths),
                  *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"eofd-kernels cache: error: argument "
                                                     f"{flag}"), err
