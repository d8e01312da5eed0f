"""Split batches (``process_group=``): one batch's tokens spread over the ranks of a group.

EOFD's weights are statistics of the whole batch. Each rank computes its per-dim moments with
its backend's statistics pass (a few KB per layer), :func:`merged_moments` gathers them and
every rank merges them in rank order (float64, :func:`eofd_kernels.moments.merge_moments`), so
every rank finalizes the same sigma_d, w_d and loss. A rank without valid tokens contributes
nothing. Before any data moves, :func:`agree` exchanges what the ranks must agree on (power,
eps, the layers' widths and dtypes, whether weights are given, the backend) and each rank's
argument error, in one small collective: a mismatch or a bad argument on one rank is the same
clear error on every rank, never a hang or a broken pipe (docs/design.md, "Split batches").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .moments import merge_moments

__all__ = ["agree", "merged_moments", "world_size"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    return dist


def world_size(group) -> int:
    """The group's size, after checking that this rank belongs to it."""
    dist = _dist()
    # new_group hands a rank outside the group a sentinel instead of a group.
    if group is dist.GroupMember.NON_GROUP_MEMBER or (
            isinstance(group, dist.ProcessGroup) and dist.get_rank(group) < 0):
        raise ValueError(f"process_group: this process (global rank {dist.get_rank()}) is not "
                         "a member of the group it passed")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed ProcessGroup, got "
                        f"{type(group).__name__}")
    return dist.get_world_size(group)


def agree(group, error: Exception | None, contract: dict | None) -> None:
    """Exchange every rank's argument ``error`` (or None) and ``contract`` (what the ranks
    must pass alike); raise on every rank if any rank failed or the contracts differ."""
    dist = _dist()
    world = world_size(group)
    mine = (None if error is None else f"{type(error).__name__}: {error}", contract)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    failed = [(rank, message) for rank, (message, _) in enumerate(everyone) if message]
    if failed:
        if error is not None:
            raise error
        rank, message = failed[0]
        raise ValueError(f"process_group: rank {rank} of the group failed: {message}")
    for key in contract:
        seen = [c[key] for _, c in everyone]
        if any(value != seen[0] for value in seen):
            raise ValueError(f"process_group: every rank must pass the same {key}; the ranks "
                             f"passed {seen}")


def merged_moments(moments: Tensor, group) -> Tensor:
    """Every rank's ``(L, MOMENT_FIELDS, max d)`` moments, merged in rank order."""
    dist = _dist()
    parts = [torch.empty_like(moments) for _ in range(world_size(group))]
    dist.all_gather(parts, moments.contiguous(), group=group)
    return merge_moments(parts)
