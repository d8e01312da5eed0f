"""The benchmark machinery: providers agree with each other, the sweep records what it
claims, and the report (markdown, JSON, plots) carries every field."""

from __future__ import annotations

import json

import pytest
import torch

from eofd_kernels.bench.providers import BASELINES, make_inputs, make_step, providers
from eofd_kernels.bench.report import device_slug, markdown, plot, write_json
from eofd_kernels.bench.shapes import MODELS, PRESETS, Preset, Shape, model_shape
from eofd_kernels.bench.sweep import environment, ideal_bytes, run_sweep
from eofd_kernels.cli import main

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


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    paths = plot(_sweep(), tmp_path)
    assert [p.name for p in paths] == ["speedup.png", "bandwidth.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_bench_command_writes_table_json(tmp_path, capsys):
    code = main(["bench", "--models", "tinybert-4", "--dtypes", "fp32", "--modes", "fwd",
                 "--providers", "eager ref", "torch", "--reps", "3", "--out", str(tmp_path)])
    assert code == 0
    assert "| tinybert-4 L=4 B=8 N=128 d=312 | float32 | fwd |" in capsys.readouterr().out
    assert {"bench.md", "bench.json"} <= {p.name for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit, match="--providers"):
        main(["bench", "--providers", "nope", "--out", str(tmp_path)])


def test_device_slug():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
