"""``eofd-kernels bench``: run a sweep, write bench.md, bench.json and the plots."""

from __future__ import annotations

from pathlib import Path

import torch

from .projection import SHAPES as PROJECTION_SHAPES
from .providers import MODES, providers
from .shapes import MODELS, PRESETS, Preset
from .sweep import device_name, environment, run_sweep

__all__ = ["add_parser", "run"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_parser(commands) -> None:
    p = commands.add_parser(
        "bench", help="benchmark sweep: table, JSON and plots",
        description="Time the EOFD loss of every provider (eager and compiled paper code, "
                    "plain MSE, our backends) over the paper's model shapes.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the sweep (default: gpu on CUDA, cpu otherwise)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                   help="only these models' shapes")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", default=None, help="default: all that run here")
    p.add_argument("--reps", type=int, default=None, help="timed reps per point")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: benchmarks/results/<device>)")
    p.add_argument("--fused-projection", nargs="*", metavar="SHAPE", default=None,
                   choices=sorted(PROJECTION_SHAPES),
                   help="instead of the sweep: the projection fused into the loss against "
                        "projecting first, time and peak memory (default shapes: all of "
                        f"{sorted(PROJECTION_SHAPES)})")


def _preset(args, device: torch.device) -> tuple[str, Preset]:
    name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[name]
    shapes = tuple(s for s in preset.shapes if args.models is None or s.model in args.models)
    dtypes = preset.dtypes if args.dtypes is None else tuple(DTYPES[d] for d in args.dtypes)
    if not shapes:
        raise SystemExit(f"--models: none of {args.models} is in the {name!r} preset")
    return name, Preset(shapes, dtypes, preset.reps)


def _run_fused_projection(args, device: torch.device, out: Path) -> int:
    from . import projection

    keys = args.fused_projection or list(PROJECTION_SHAPES)
    dtype = DTYPES[args.dtypes[0]] if args.dtypes else torch.float32
    records = projection.run_fused_projection(keys, device, reps=args.reps or 5, dtype=dtype)
    meta = environment(device, "fused-projection")
    projection.write(records, meta, out)
    print(projection.markdown(records, meta))
    print(f"wrote {out / 'fused_projection.md'}, {out / 'fused_projection.json'}")
    return 0


def run(args) -> int:
    from .report import device_slug, markdown, plot, write_json

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.fused_projection is not None:
        out = args.out or Path("benchmarks/results") / device_slug(device_name(device))
        return _run_fused_projection(args, device, out)
    name, preset = _preset(args, device)
    known = providers(device)
    unknown = [p for p in args.providers or [] if p not in known]
    if unknown:
        raise SystemExit(f"--providers: {unknown} cannot run here; choose from {known}")
    out = args.out or Path("benchmarks/results") / device_slug(device_name(device))
    out.mkdir(parents=True, exist_ok=True)
    records = run_sweep(preset, device, provider_names=args.providers, modes=tuple(args.modes),
                        reps=args.reps)
    meta = environment(device, name)
    table = markdown(records, meta)
    (out / "bench.md").write_text(table)
    write_json(out / "bench.json", records, meta)
    plots = plot(records, out)
    print(table)
    print(f"wrote {out / 'bench.md'}, {out / 'bench.json'}"
          + (", " + ", ".join(str(p) for p in plots) if plots
             else " (no plots: pip install matplotlib)"))
    return 0 if not any(r.error for r in records) else 1
