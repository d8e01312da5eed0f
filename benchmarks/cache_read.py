"""Read throughput of a teacher cache, as training reads it: every example through
``TeacherCache.__getitem__`` and ``collate`` in batches, in a shuffled order (the Trainer's
sampler), cold (each shard dropped from the page cache first, where the OS allows it) and
warm (the same pass again).

    python benchmarks/cache_read.py DIR [--batch-size 16] [--seed 0]

Prints per pass: seconds, GB/s of the shards' bytes, examples/s and ms per batch, beside the
bytes one batch carries (what a step consumes from the cache).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from eofd_kernels.distill import TeacherCache


def _drop_from_page_cache(cache: TeacherCache) -> bool:
    """Ask the OS to drop the shards' clean pages; False where it cannot be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for shard in cache.index["shards"]:
        fd = os.open(cache.path / shard["file"], os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _one_pass(path, batch_size: int, order: list[int]) -> tuple[float, int]:
    """Seconds to read and collate every example once (a fresh TeacherCache: its maps start
    empty) and the bytes of the largest batch's teacher tensors."""
    start = time.perf_counter()
    cache = TeacherCache(path)
    largest = 0
    for i in range(0, len(order), batch_size):
        batch = cache.collate([cache[j] for j in order[i:i + batch_size]])
        states = [t for t in batch["teacher"].hidden_states or () if t is not None]
        largest = max(largest, sum(t.numel() * t.element_size() for t in states))
    return time.perf_counter() - start, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", help="a teacher cache folder (eofd-kernels cache --out)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cache = TeacherCache(args.cache)
    stored = sum(s["bytes"] for s in cache.index["shards"])
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(args.seed))
    batches = -(-len(cache) // args.batch_size)
    print(f"{cache!r}: {stored / 2**20:.1f} MiB in {len(cache.index['shards'])} shards, "
          f"{len(cache)} examples, batches of {args.batch_size}")
    cold = _drop_from_page_cache(cache)
    for name in ("cold" if cold else "first", "warm"):
        seconds, largest = _one_pass(args.cache, args.batch_size, order.tolist())
        print(f"{name:>5}: {seconds:6.2f} s, {stored / seconds / 1e9:5.2f} GB/s of shards, "
              f"{len(cache) / seconds:7.0f} examples/s, {1e3 * seconds / batches:6.2f} ms per "
              f"batch (the largest batch's padded states: {largest / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
