"""A progress bar: tqdm when it is installed (the ``plots`` extra), else a one-line fallback."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

__all__ = ["progress"]


class _LineBar:
    """The subset of tqdm we use: iteration, ``set_postfix_str`` and ``write``."""

    def __init__(self, iterable: Iterable, total: int, desc: str):
        self._iterable, self._total, self._desc = iterable, total, desc
        self._postfix, self._start = "", time.perf_counter()

    def __iter__(self) -> Iterator:
        for i, item in enumerate(self._iterable, 1):
            yield item
            elapsed = time.perf_counter() - self._start
            sys.stderr.write(f"\r{self._desc} {i}/{self._total} [{elapsed:.0f}s] {self._postfix}")
            sys.stderr.flush()
        sys.stderr.write("\n")

    def set_postfix_str(self, text: str) -> None:
        self._postfix = text

    @staticmethod
    def write(text: str) -> None:
        sys.stderr.write("\r\033[K")
        print(text)


def progress(iterable: Iterable, total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LineBar(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)
