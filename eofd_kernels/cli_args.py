"""Argparse types shared by the ``eofd-kernels`` commands.

Each one turns a bad value into ``argparse.ArgumentTypeError``, which argparse reports as one
``error: argument --flag: ...`` line and exit status 2, before any model loads. Also here: the
CPU cores a process may use (what bounds ``--nproc`` on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["cache_dir_arg", "device_arg", "finite_float", "int_in", "layers_arg", "logits_arg",
           "non_negative_float", "out_dir_arg", "positive_float", "positive_int",
           "teacher_arg", "text_arg", "usable_cpus"]


def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}"
                                         f", got {text!r}") from None


def int_in(low: int, high: int | None = None):
    """An integer in ``[low, high]`` (no upper bound for ``high=None``)."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
        return value
    return parse


positive_int = int_in(1)


def finite_float(text: str) -> float:
    value = _number(float, text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _finite_float_above(low: float, *, strict: bool):
    def parse(text: str) -> float:
        value = finite_float(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} "
                                             f"{low:g}, got {text!r}")
        return value
    return parse


positive_float = _finite_float_above(0.0, strict=True)
non_negative_float = _finite_float_above(0.0, strict=False)


def device_arg(text: str) -> torch.device:
    """``cpu``, or ``cuda[:N]`` for a CUDA device present here."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA devices")
    return device


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def out_dir_arg(text: str) -> Path:
    """A folder that exists or can be made, and can be written (nothing is created yet)."""
    path = Path(text)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {str(existing)!r} is not a folder")
    # A real write rather than os.access: root passes os.access everywhere, yet cannot write
    # on a read-only mount or in /proc.
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write in {str(existing)!r} "
                                         f"({error.strerror})") from None
    return path


def text_arg(text: str) -> str:
    """``stdlib``, or a UTF-8 text file with at least one non-blank line."""
    if text == "stdlib":
        return text
    path = Path(text)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        raise argparse.ArgumentTypeError(f"expected 'stdlib' or a file of sentences, one a "
                                         f"line; {text!r} is {what}")
    try:
        content = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error.strerror}") from None
    except UnicodeDecodeError:
        content = None
    # NUL never occurs in text; UTF-16 without a byte-order mark decodes as UTF-8 with NULs.
    if content is None or "\0" in content:
        raise argparse.ArgumentTypeError(f"{text!r} is not UTF-8 text (a binary file?)")
    if not content.strip():
        raise argparse.ArgumentTypeError(f"{text!r} has no sentences (it is empty)")
    return text


def teacher_arg(text: str) -> str:
    """``minilm``, ``random``, or a local Hugging Face model folder (with its config.json)."""
    if text in ("minilm", "random"):
        return text
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected 'minilm', 'random' or a model folder; "
                                         f"{text!r} is {'a file' if path.exists() else 'missing'}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a model folder (no readable "
                                         f"config.json)")
    return text


def cache_dir_arg(text: str) -> Path:
    """A teacher cache: a folder holding the index ``eofd-kernels cache`` writes last (its
    shards are checked when it opens)."""
    from .distill.teacher_cache import INDEX_NAME

    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a teacher cache folder; {text!r} is "
                                         f"{'a file' if path.exists() else 'missing'}")
    if not (path / INDEX_NAME).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} has no {INDEX_NAME}: not a teacher cache, "
                                         f"or its recording did not finish")
    return path


def layers_arg(text: str) -> list[int]:
    """Hidden-state indices ``0,3,6``: non-negative integers, comma-separated, no repeats
    (the teacher's config bounds them, checked once it loads)."""
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        layers = None
    if not layers or any(t < 0 for t in layers):
        raise argparse.ArgumentTypeError(f"expected hidden-state indices >= 0 like 0,3,6, got "
                                         f"{text!r}")
    if len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"{text!r} names a layer twice")
    return layers


def logits_arg(text: str) -> str | int:
    """``full``, or k >= 1: the top k logits per row."""
    if text == "full":
        return text
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected 'full' or a top-k count >= 1, got {text!r}")
    return k
