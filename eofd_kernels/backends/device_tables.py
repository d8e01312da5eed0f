"""The Triton launcher's call tables on the GPU: stream-ordered, safe under CUDA-graph capture.

A call's tables (pointers, sizes and strides of its layers; where its gradients go) are small
int64 vectors that the kernels read from device memory. How they get there:

* **No blocking copy.** A table is written into pinned host memory and copied with
  ``non_blocking=True`` on the current stream, so the copy is ordered before the kernels that
  read it and the host never waits. (The pinned block goes back to torch's host allocator,
  which reuses it only once the copy has completed.)
* **Memoized by content and stream.** Outside capture a table is kept among the ``capacity``
  most recent, keyed by ``(device, stream, values)``: the content is all a table holds, so a
  hit is always the right table, and a layer table serves both the forward and the backward of
  a step (the backward's fresh output pointers are in a table of their own).
* **Never freed while a kernel may read it.** A memoized table is used only on the stream it
  was allocated and written on. When it is evicted, torch's caching allocator hands its block
  only to later allocations on that same stream, whose work runs after every kernel that read
  the table: no event or ``record_stream`` is needed.
* **Capture-safe.** During capture the copy is recorded, not run: the table's contents exist
  only once the graph replays. So a table made during capture is handed to no one else (not
  even a later call of the same capture), and it and its pinned staging buffer are kept for
  the life of the process, since every replay reads them. A capture never uses a memoized
  eager table either, so evicting one never breaks a graph.
* **Thread-safe.** One lock guards the memo.

A memo, not state: it never changes a result, only whether a copy is needed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch

__all__ = ["CudaStreams", "DeviceTables", "TABLES"]


class CudaStreams:
    """What the tables need from the CUDA runtime (a simulated one stands in for it in
    tests/test_device_tables.py)."""

    @staticmethod
    def stream(device: torch.device) -> Hashable:
        return torch.cuda.current_stream(device).cuda_stream

    @staticmethod
    def capturing(device: torch.device) -> bool:
        return torch.cuda.is_current_stream_capturing()

    @staticmethod
    def upload(values: tuple[int, ...], device: torch.device):
        """``(table, staging)``: the device table, written by a copy enqueued on the current
        stream from the pinned ``staging`` buffer."""
        staging = torch.tensor(values, dtype=torch.int64, pin_memory=True)
        table = torch.empty(len(values), dtype=torch.int64, device=device)
        table.copy_(staging, non_blocking=True)
        return table, staging


class DeviceTables:
    """Device copies of int64 tables (see the module docstring)."""

    def __init__(self, capacity: int = 256, streams=CudaStreams):
        self.capacity = capacity
        self._streams = streams
        self._lock = threading.Lock()
        self._recent: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []  # (table, staging)

    def get(self, values: tuple[int, ...], device: torch.device) -> torch.Tensor:
        with self._lock:
            if self._streams.capturing(device):
                captured = self._streams.upload(values, device)
                self._captured.append(captured)
                return captured[0]
            key = (device, self._streams.stream(device), values)
            table = self._recent.get(key)
            if table is not None:
                self._recent.move_to_end(key)
                return table
            table, _ = self._streams.upload(values, device)
            self._recent[key] = table
            while len(self._recent) > self.capacity:
                self._recent.popitem(last=False)
            return table

    def __len__(self) -> int:
        with self._lock:
            return len(self._recent) + len(self._captured)


TABLES = DeviceTables()
