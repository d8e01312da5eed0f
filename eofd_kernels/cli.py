"""The ``eofd-kernels`` command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eofd-kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="every backend here against the float64 reference on built-in cases")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    check.add_argument("--reps", type=int, default=5, help="timed repetitions per row")
    args = parser.parse_args(argv)

    if args.command == "check":
        from .check import run_check

        return 0 if run_check(args.device, reps=args.reps) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
