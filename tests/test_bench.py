"""The benchmark machinery: providers agree with each other, the sweep records what it
claims, the report (markdown, JSON, plots) carries every field, the whole-step benchmark's
ways compute one objective and its parts cover the step, and every bad argument is one
argparse error."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from eofd_kernels import cpu_cache_info, set_cpu_cache_limit
from eofd_kernels.bench import step as step_bench
from eofd_kernels.bench.memory import peak_extra_mb
from eofd_kernels.bench.providers import BASELINES, make_inputs, make_step, providers
from eofd_kernels.bench.report import device_slug, markdown, plot, write_json
from eofd_kernels.bench.shapes import MODELS, PRESETS, Preset, Shape, model_shape
from eofd_kernels.bench.sweep import environment, ideal_bytes, run_sweep
from eofd_kernels.cli import main
from eofd_kernels.distill import uniform_layer_map

CPU = torch.device("cpu")
TINY = Shape("tiny", 2, 2, 16, 24)


def test_presets_cover_the_paper_models():
    gpu_models = {s.model for s in PRESETS["gpu"].shapes}
    assert gpu_models == set(MODELS)
    assert model_shape("flan-t5-xxl", 32, 128) in PRESETS["gpu"].shapes
    assert {torch.float32, torch.bfloat16, torch.float16} == set(PRESETS["gpu"].dtypes)
    assert MODELS["t5-large"] == (48, 1024)


def test_providers_here_compute_the_same_loss():
    """The eager and compiled paper code and our backends agree (so timings compare the same
    computation); plain MSE is the p = 0 case of the same code."""
    names = [p for p in providers(CPU) if "compiled" not in p]  # compile is slow; same graph
    assert names[:2] == [BASELINES[0], BASELINES[2]] and "torch" in names
    assert not {"triton"} & set(names)  # the interpreter is not benchmarked
    students, teachers = make_inputs(TINY, torch.float64, CPU)
    losses = {p: make_step(p, "fwd", students, teachers)() for p in names}
    for p in names:
        want = losses["mse eager"] if p.startswith("mse") else losses["eager ref"]
        torch.testing.assert_close(losses[p].double(), want.double(), rtol=1e-12, atol=0)
    grads = make_step("torch", "fwd+bwd", students, teachers)()
    ref = make_step("eager ref", "fwd+bwd", students, teachers)()
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-15)


def test_ideal_bytes_counts_passes():
    side = TINY.elements * 2
    assert ideal_bytes(TINY, torch.bfloat16, "fwd") == 2 * side
    assert ideal_bytes(TINY, torch.bfloat16, "fwd+bwd") == 5 * side


def _sweep():
    preset = Preset(shapes=(TINY,), dtypes=(torch.float32,), reps=3)
    return run_sweep(preset, CPU, provider_names=["eager ref", "mse eager", "torch"])


def test_sweep_records_and_report(tmp_path):
    records = _sweep()
    assert [(r.mode, r.provider) for r in records] == [
        (m, p) for m in ("fwd", "fwd+bwd") for p in ("eager ref", "mse eager", "torch")]
    for r in records:
        assert r.error is None
        assert 0 < r.p20_ms <= r.median_ms <= r.p80_ms
        traffic = ideal_bytes(TINY, torch.float32, r.mode)
        assert r.gb_per_s == pytest.approx(traffic / r.median_ms / 1e6)
        assert r.pct_of_copy == pytest.approx(100 * r.gb_per_s / r.copy_gb_per_s)
        assert r.peak_extra_mb is None  # measured on CUDA only
    meta = environment(CPU, "test")
    assert {"device", "torch", "triton", "commit", "date", "command"} <= set(meta)
    table = markdown(records, meta)
    rows = [line for line in table.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2 and all("| torch |" in row for row in rows)
    eager = next(r for r in records if r.provider == "eager ref" and r.mode == "fwd")
    ours = next(r for r in records if r.provider == "torch" and r.mode == "fwd")
    assert f"{eager.median_ms / ours.median_ms:.2f}x" in rows[0]
    write_json(tmp_path / "bench.json", records, meta)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"] == meta and len(saved["records"]) == len(records)
    assert saved["records"][0]["median_ms"] == records[0].median_ms


@pytest.fixture
def drawn_figures(monkeypatch):
    """The figures the plots save, kept open for their data."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda fig, *args, **kw: (figures.append(fig), save(fig, *args, **kw)))
    return figures


def test_plots_draw_the_records(tmp_path, drawn_figures):
    """speedup.png draws each of our providers' speedup over the eager code and over
    torch.compile; bandwidth.png each provider's GB/s and the copy's: the records' values."""
    records = _sweep()
    paths = plot(records, tmp_path)
    assert [p.name for p in paths] == ["speedup.png", "bandwidth.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    speedup, bandwidth = drawn_figures
    by_provider = {r.provider: r for r in records if r.mode == "fwd+bwd"}
    eager_ax, _ = speedup.axes
    (line,) = [ln for ln in eager_ax.lines if ln.get_label() == "torch float32"]
    want = by_provider["eager ref"].median_ms / by_provider["torch"].median_ms
    assert line.get_ydata().tolist() == pytest.approx([want])
    drawn = {ln.get_label(): ln.get_ydata().tolist() for ln in bandwidth.axes[0].lines}
    assert drawn["torch float32"] == pytest.approx([by_provider["torch"].gb_per_s])
    assert drawn["copy float32"] == pytest.approx([by_provider["torch"].copy_gb_per_s])


def test_step_plot_stacks_each_ways_parts(tmp_path, drawn_figures):
    from eofd_kernels.bench import step_report

    records = [{"setting": "s", "dtype": "float32", "batch": 2, "seq": 8, "way": way,
                "step_ms": sum(parts), "parts": dict(zip(step_bench.PARTS, parts))}
               for way, parts in (("paper", (5.0, 2.0, 3.0, 7.0)),
                                  ("eofd_kernels", (5.0, 2.0, 1.0, 4.0)))]
    assert step_report.plot(records, tmp_path / "step.png") == tmp_path / "step.png"
    (ax,) = drawn_figures[0].axes
    bars = {}  # (way index, part) -> (bottom, height)
    for part, container in zip(step_bench.PARTS, ax.containers):
        for i, rect in enumerate(container):
            bars[i, part] = (rect.get_y(), rect.get_height())
    for i, r in enumerate(records):
        bottom = 0.0
        for part in step_bench.PARTS:
            assert bars[i, part] == pytest.approx((bottom, r["parts"][part]))
            bottom += r["parts"][part]
    assert [t.get_text() for t in ax.texts] == ["17", "12"]


def test_step_table_compares_the_cache_with_the_live_teacher():
    from eofd_kernels.bench import step_report

    meta = {"device": "cpu", "torch": "x", "commit": "c", "date": "d", "command": "bench"}
    records = [{"setting": "s", "label": "S", "dtype": "float32", "batch": 2, "seq": 8,
                "reps": 3, "way": way, "step_ms": step, "p20_ms": step, "p80_ms": step,
                "parts": dict(zip(step_bench.PARTS, (teacher, 1.0, 1.0, 1.0))),
                "peak_extra_mb": None, "vs_paper": None, "loss_part_vs_paper": None,
                "loss0": 1.0}
               for way, step, teacher in (("eofd_kernels", 40.0, 37.0),
                                          ("eofd_kernels cached", 10.0, 7.0))]
    table = step_report.markdown(records, meta)
    assert ("From a teacher cache the step takes 10.0 ms against 40.0 ms with the live "
            "teacher: 0.250x (teacher part 7.0 vs 37.0 ms)") in table


def test_bench_command_writes_table_json(tmp_path, capsys):
    code = main(["bench", "--models", "tinybert-4", "--dtypes", "fp32", "--modes", "fwd",
                 "--providers", "eager ref", "torch", "--reps", "3", "--out", str(tmp_path)])
    assert code == 0
    assert "| tinybert-4 L=4 B=8 N=128 d=312 | float32 | fwd |" in capsys.readouterr().out
    assert {"bench.md", "bench.json"} <= {p.name for p in tmp_path.iterdir()}


def test_device_slug():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# Tiny pairs of the two families: GPT-2 with L_pred on the logits and EOFD on every student
# layer, BERT with the hidden loss only (embeddings mapped too).
_TINY_SIZES = dict(vocab_size=64, bos_token_id=0, eos_token_id=0)
TINY_GPT2 = step_bench.Setting(
    "tiny-gpt2", "tiny GPT-2 pair", "gpt2",
    dict(n_layer=4, n_embd=32, n_head=2, n_positions=16, **_TINY_SIZES),
    dict(n_layer=2, n_embd=16, n_head=2, n_positions=16, **_TINY_SIZES),
    uniform_layer_map(2, 4, embeddings=False), batch=2, seq=8, use_logits=True,
    hidden_weight=0.5)
TINY_BERT = step_bench.Setting(
    "tiny-bert", "tiny BERT pair", "bert",
    dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
         max_position_embeddings=16, vocab_size=64),
    dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
         max_position_embeddings=16, vocab_size=64),
    uniform_layer_map(1, 2), batch=2, seq=8, use_logits=False, hidden_weight=1.0)


def test_step_ways_compute_one_objective():
    """At step 0 the paper's code, its compiled twin and ours give the same loss; plain MSE
    gives another (the teacher has outlier dims), and the paper's at p = 0."""
    records = step_bench.run_setting(TINY_GPT2, CPU, torch.float32, warmup=0, reps=2,
                                     measure_memory=False, print_fn=lambda *_: None)
    loss0 = {r["way"]: r["loss0"] for r in records}
    assert list(loss0) == list(step_bench.WAYS)
    for way in ("paper compiled", "eofd_kernels"):
        assert loss0[way] == pytest.approx(loss0["paper"], rel=1e-5)
    # An fp32 cache holds the teacher's states and logits exactly: the same loss, bitwise.
    assert loss0["eofd_kernels cached"] == loss0["eofd_kernels"]
    assert loss0["mse"] != pytest.approx(loss0["paper"], rel=1e-3)
    p0 = step_bench.run_setting(TINY_BERT, CPU, torch.float32, ways=("paper", "mse"),
                                power=0.0, warmup=0, reps=1, measure_memory=False,
                                print_fn=lambda *_: None)
    assert p0[0]["loss0"] == pytest.approx(p0[1]["loss0"], rel=1e-6)
    for r in records:
        sums = [sum(parts) for parts in r["steps_ms"]]
        assert len(sums) == 2 and min(sums) <= r["step_ms"] <= max(sums)
        assert r["p20_ms"] <= r["step_ms"] <= r["p80_ms"]
        assert list(r["parts"]) == list(step_bench.PARTS)
        assert all(ms > 0 for parts in r["steps_ms"] for ms in parts)
    paper = records[0]
    assert paper["vs_paper"] == 1.0
    assert records[-1]["vs_paper"] == pytest.approx(paper["step_ms"] / records[-1]["step_ms"])


@pytest.mark.parametrize("setting", [TINY_BERT, TINY_GPT2], ids=lambda s: s.key)
def test_cached_way_reads_what_the_teacher_gives(setting):
    """The cached way's teacher part gives the live teacher's mapped states and logits, and
    holds nothing else (the other layers are None)."""
    bench = step_bench.StepBench(setting, CPU, torch.float32)
    cached = bench.ways(["eofd_kernels cached"], 0.5)[0].teacher(bench.batch)
    with torch.no_grad():
        live = bench.teacher(**bench.batch, output_hidden_states=True)
    mapped = {t for _, t in setting.layer_map}
    for t, state in enumerate(cached.hidden_states):
        if t in mapped:
            assert torch.equal(state, live.hidden_states[t]), t
        else:
            assert state is None, t
    if setting.use_logits:
        assert torch.equal(cached.logits, live.logits)


def test_step_parts_cover_the_step():
    bench = step_bench.StepBench(TINY_BERT, CPU, torch.float32)
    way = bench.ways(["eofd_kernels"], 0.5)[0]
    bench.step(way)
    for _ in range(3):
        start = time.perf_counter()
        parts, loss = bench.step(way)
        wall = (time.perf_counter() - start) * 1e3
        assert len(parts) == len(step_bench.PARTS) and loss > 0
        assert 0.8 * wall <= sum(parts) <= wall


def test_bench_step_command(tmp_path, monkeypatch, capsys):
    """The command on a tiny setting: step.json's fields, step.md's rows and the plot."""
    monkeypatch.setitem(step_bench.SETTINGS, "tiny", TINY_BERT)
    code = main(["bench", "--step", "tiny", "--ways", "paper", "eofd_kernels", "--reps", "2",
                 "--batch", "3", "--no-memory", "--out", str(tmp_path)])
    assert code == 0
    saved = json.loads((tmp_path / "step.json").read_text())
    assert saved["meta"]["command"] and saved["meta"]["device"]
    assert [r["way"] for r in saved["records"]] == ["paper", "eofd_kernels"]
    for r in saved["records"]:
        assert {"setting", "way", "step_ms", "parts", "peak_extra_mb", "loss0"} <= set(r)
        assert r["setting"] == "tiny-bert" and r["batch"] == 3 and r["seq"] == 8
    table = (tmp_path / "step.md").read_text()
    assert "| paper |" in table and "| **eofd_kernels** |" in table
    assert "From a teacher cache" not in table  # not asked for
    assert "tiny BERT pair, B=3, N=8, float32" in capsys.readouterr().out
    if (tmp_path / "step.png").exists():
        assert (tmp_path / "step.png").read_bytes()[:4] == b"\x89PNG"


def test_peak_memory_sees_a_call_and_the_child_reports_every_way():
    """A fresh 64 MB tensor is mapped on its own (over glibc's largest mmap threshold), so the
    reading sees it; the fresh process's work, run here, gives a peak per way."""
    mb = peak_extra_mb(lambda: torch.ones(16 * 2**20))
    assert 63 <= mb < 200
    spec = {"setting": dataclasses.asdict(TINY_BERT), "ways": ["paper", "eofd_kernels"],
            "dtype": "float32", "power": 0.5}
    limit = cpu_cache_info()["limit_bytes"]
    try:
        peaks = step_bench._cpu_child(spec)
    finally:
        set_cpu_cache_limit(limit)
    assert list(peaks) == spec["ways"] and all(v >= 0 for v in peaks.values())


@pytest.mark.parametrize("argv, flag", [
    (["--reps", "0"], "--reps"), (["--reps", "-3"], "--reps"), (["--reps", "x"], "--reps"),
    (["--device", "tpu9"], "--device"), (["--device", "cuda:7"], "--device"),
    (["--out", "{file}"], "--out"), (["--out", "{file}/sub"], "--out"),
    (["--providers", "nope"], "--providers"),
    (["--fused-projection", "--dtypes", "bf16"], "--dtypes"),
    (["--step", "--dtypes", "fp16"], "--dtypes"), (["--step", "--seq", "100000"], "--seq"),
    (["--step", "--batch", "0"], "--batch"), (["--step", "--warmup", "-1"], "--warmup"),
    (["--step", "gpt3"], "--step"), (["--step", "--fused-projection"], "--fused-projection"),
])
def test_bench_bad_arguments_are_one_argparse_error(argv, flag, tmp_path, capsys):
    if flag == "--device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    if "--dtypes" in argv and "--fused-projection" in argv and torch.cuda.is_available():
        pytest.skip("bf16 runs on a GPU")
    file = tmp_path / "a-file"
    file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *(a.format(file=file) for a in argv)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("eofd-kernels bench: error:") and flag in last
