"""``eofd-kernels bench``: run a sweep, write bench.md, bench.json and the plots; or, with
``--fused-projection`` or ``--step``, their own benchmarks."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..cli_args import device_arg, int_in, out_dir_arg, positive_int
from .projection import SHAPES as PROJECTION_SHAPES
from .providers import MODES, providers
from .shapes import MODELS, PRESETS, Preset
from .step import SETTINGS as STEP_SETTINGS
from .step import WAYS as STEP_WAYS
from .sweep import device_name, environment, run_sweep

__all__ = ["add_parser", "run"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 training needs a gradient scaler, which the step does not model.
STEP_DTYPES = ("fp32", "bf16")


def add_parser(commands) -> None:
    p = commands.add_parser(
        "bench", help="benchmark sweep: table, JSON and plots",
        description="Time the EOFD loss of every provider (eager and compiled paper code, "
                    "plain MSE, our backends) over the paper's model shapes; or, with --step, "
                    "whole distillation training steps.")
    p.set_defaults(bench_parser=p)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the sweep (default: gpu on CUDA, cpu otherwise)")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                   help="only these models' shapes")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", default=None, help="default: all that run here")
    p.add_argument("--reps", type=positive_int, default=None,
                   help="timed reps per point (--step: timed steps per way; default 5 on a "
                        "CPU, 20 on a GPU)")
    p.add_argument("--out", type=out_dir_arg, default=None,
                   help="output folder (default: benchmarks/results/<device>)")
    jobs = p.add_mutually_exclusive_group()
    jobs.add_argument("--fused-projection", nargs="*", metavar="SHAPE", default=None,
                      choices=sorted(PROJECTION_SHAPES),
                      help="instead of the sweep: the projection fused into the loss against "
                           "projecting first, time and peak memory (default shapes: all of "
                           f"{sorted(PROJECTION_SHAPES)})")
    jobs.add_argument("--step", nargs="*", metavar="SETTING", default=None,
                      choices=sorted(STEP_SETTINGS),
                      help="instead of the sweep: whole training steps (teacher forward, "
                           "student forward, loss, backward + AdamW) of every way of computing "
                           f"the loss, interleaved (default settings: all of "
                           f"{sorted(STEP_SETTINGS)}); writes step.md, step.json, step.png")
    step = p.add_argument_group("--step options")
    step.add_argument("--ways", nargs="+", choices=STEP_WAYS, default=list(STEP_WAYS),
                      help="the ways of computing the loss (default: all)")
    step.add_argument("--batch", type=positive_int, default=None,
                      help="batch size (default: each setting's)")
    step.add_argument("--seq", type=positive_int, default=None,
                      help="tokens per sequence (default: each setting's)")
    step.add_argument("--warmup", type=int_in(0), default=1,
                      help="untimed steps per way before the timed ones (default 1)")
    step.add_argument("--no-memory", action="store_true",
                      help="skip the peak memory step (on a CPU: a fresh process per setting)")


def _preset(args, device: torch.device) -> tuple[str, Preset]:
    name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[name]
    shapes = tuple(s for s in preset.shapes if args.models is None or s.model in args.models)
    dtypes = preset.dtypes if args.dtypes is None else tuple(DTYPES[d] for d in args.dtypes)
    if not shapes:
        args.bench_parser.error(f"--models: none of {args.models} is in the {name!r} preset")
    return name, Preset(shapes, dtypes, preset.reps)


def _run_fused_projection(args, device: torch.device, out: Path) -> int:
    from . import projection

    keys = args.fused_projection or list(PROJECTION_SHAPES)
    dtype = DTYPES[args.dtypes[0]] if args.dtypes else torch.float32
    if device.type != "cuda" and dtype != torch.float32:
        args.bench_parser.error("--dtypes: --fused-projection measures CPU memory in fp32 only")
    records = projection.run_fused_projection(keys, device, reps=args.reps or 5, dtype=dtype)
    meta = environment(device, "fused-projection")
    projection.write(records, meta, out)
    print(projection.markdown(records, meta))
    print(f"wrote {out / 'fused_projection.md'}, {out / 'fused_projection.json'}")
    return 0


def _run_step(args, device: torch.device, out: Path) -> int:
    import dataclasses

    from . import step, step_report

    dtypes = args.dtypes or ["fp32"]
    bad = [d for d in dtypes if d not in STEP_DTYPES]
    if bad:
        args.bench_parser.error(f"--dtypes: --step runs {' and '.join(STEP_DTYPES)}, got {bad}")
    settings = []
    for key in args.step or list(STEP_SETTINGS):
        default = STEP_SETTINGS[key]
        setting = dataclasses.replace(default, batch=args.batch or default.batch,
                                      seq=args.seq or default.seq)
        if setting.seq > step.max_seq(setting):
            args.bench_parser.error(f"--seq: the {key} setting's models take at most "
                                    f"{step.max_seq(setting)} tokens, got {setting.seq}")
        settings.append(setting)
    reps = args.reps or (20 if device.type == "cuda" else 5)
    records = []
    for setting in settings:
        for d in dtypes:
            records += step.run_setting(setting, device, DTYPES[d], ways=args.ways,
                                        warmup=args.warmup, reps=reps,
                                        measure_memory=not args.no_memory)
    meta = environment(device, "step")
    # The machine's load over the run: a shared CPU's neighbours show in every part.
    meta["load_average"] = os.getloadavg()
    paths = step_report.write(records, meta, out)
    print(step_report.markdown(records, meta))
    print("wrote " + ", ".join(str(p) for p in paths)
          + ("" if len(paths) == 3 else " (no plot: pip install matplotlib)"))
    return 0 if all(math.isfinite(r["loss0"]) for r in records) else 1


def run(args) -> int:
    from .report import device_slug, markdown, plot, write_json

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or Path("benchmarks/results") / device_slug(device_name(device))
    if args.fused_projection is not None:
        return _run_fused_projection(args, device, out)
    if args.step is not None:
        return _run_step(args, device, out)
    name, preset = _preset(args, device)
    known = providers(device)
    unknown = [p for p in args.providers or [] if p not in known]
    if unknown:
        args.bench_parser.error(f"--providers: {unknown} cannot run here; choose from {known}")
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
