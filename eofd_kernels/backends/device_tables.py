"""The Triton launcher's call tables on the GPU, safe under CUDA-graph capture.

A call's table (pointers, sizes, strides of its layers, and p and eps) is a small int64
vector that the kernels read from device memory. A plain ``tensor.to("cuda")`` is a pageable
host-to-device copy, which CUDA-graph capture forbids, and a pinned staging buffer that goes
back to the allocator after the call would be read freed by a later replay. So tables are
memoized by their content (the content is all they hold: a hit is always the right table):

* outside capture, a miss copies the table and keeps it among the ``capacity`` most recent;
* during capture, a miss stages the table in pinned memory and the copy is captured from it;
  that entry, and any entry a capture used, is kept for the life of the process, since a
  replay reads it.

A memo, not state: it never changes a result, only whether a copy is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

__all__ = ["DeviceTables", "TABLES"]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class DeviceTables:
    """Device copies of int64 tables, memoized by ``(device, values)``."""

    def __init__(self, capacity: int = 256,
                 capturing: Callable[[torch.device], bool] = _capturing):
        self.capacity = capacity
        self._capturing = capturing
        self._recent: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (staging, table)

    def get(self, values: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (device, values)
        kept = self._kept.get(key)
        if kept is not None:
            return kept[1]
        capturing = self._capturing(device)
        table = self._recent.get(key)
        if table is not None:
            if capturing:  # a replay will read it: never evict it
                self._kept[key] = (table, self._recent.pop(key))
            else:
                self._recent.move_to_end(key)
            return table
        host = torch.tensor(values, dtype=torch.int64)
        if capturing:
            staging = host.pin_memory() if device.type == "cuda" else host
            table = torch.empty(staging.shape, dtype=torch.int64, device=device)
            table.copy_(staging, non_blocking=True)
            self._kept[key] = (staging, table)
            return table
        table = host.to(device)
        self._recent[key] = table
        while len(self._recent) > self.capacity:
            self._recent.popitem(last=False)
        return table

    def __len__(self) -> int:
        return len(self._recent) + len(self._kept)


TABLES = DeviceTables()
