"""The Triton launcher's device tables (backends/device_tables.py) on a simulated GPU.

The simulation keeps what makes tables hard: device memory is an arena whose freed blocks are
handed to the next allocation (and overwritten), work enqueued outside capture runs in stream
order, and work enqueued during capture only runs when the graph replays; a "kernel" reads a
table by address, as a real one does, so a table not yet written reads wrong and a table freed
while work still refers to it is caught."""

import gc
import threading
import weakref

import pytest
import torch

from eofd_kernels.backends.device_tables import DeviceTables

DEVICE = torch.device("cpu")  # the simulation's device; the tables never look at it


class SimulatedGpu:
    """One device: an arena of int64 words, streams, and graph capture. Work holds addresses,
    never tensors (a graph keeps no table alive); work that touches a block its allocation no
    longer owns (freed, perhaps handed to another table) is recorded in ``stale``."""

    def __init__(self, words: int = 4096):
        self.arena = torch.full((words,), -1, dtype=torch.int64)
        self.free = [(0, words)]  # (start, length), reused lowest address first
        self.owner = {}  # start -> the live allocation's id
        self.allocations = 0
        self.current = "stream 0"
        self.graph = None  # the work a capture in progress records
        self.uploads = 0
        self.stale = []

    # --- what DeviceTables asks of the runtime
    def stream(self, device):
        return self.current

    def capturing(self, device):
        return self.graph is not None

    def upload(self, values, device):
        self.uploads += 1
        table = self._allocate(len(values))
        staging = torch.tensor(values, dtype=torch.int64)
        block = self._address(table)
        self._enqueue(lambda: self._words(block, len(values)).copy_(staging))
        return table, staging

    # --- the simulation
    def _allocate(self, length):
        self.free.sort()
        for i, (start, size) in enumerate(self.free):
            if size >= length:
                self.free[i] = (start + length, size - length)
                table = self.arena[start:start + length]
                table.fill_(-7)  # whatever the previous owner left
                self.allocations += 1
                self.owner[start] = self.allocations
                weakref.finalize(table, self._release, start, length)
                return table
        raise MemoryError

    def _release(self, start, length):
        del self.owner[start]
        self.free.append((start, length))

    def _address(self, table):
        start = (table.data_ptr() - self.arena.data_ptr()) // 8
        return start, self.owner[start]

    def _words(self, block, length):
        start, allocation = block
        if self.owner.get(start) != allocation:
            self.stale.append(block)
        return self.arena[start:start + length]

    def _enqueue(self, work):
        if self.graph is not None:
            self.graph.append(work)
        else:
            work()

    def launch(self, table, expected, reads):
        """A kernel that reads ``table`` by address and records whether it saw ``expected``."""
        block = self._address(table)
        self._enqueue(lambda: reads.append(self._words(block, len(expected)).tolist()
                                           == list(expected)))

    def capture(self):
        self.graph = []

    def end_capture(self):
        graph, self.graph = self.graph, None
        return graph

    @staticmethod
    def replay(graph):
        for work in graph:
            work()


@pytest.fixture
def gpu():
    return SimulatedGpu()


def test_eager_tables_are_written_before_use_and_memoized_per_stream(gpu):
    tables = DeviceTables(capacity=2, streams=gpu)
    reads = []
    first = tables.get((1, 2, 3), DEVICE)
    gpu.launch(first, (1, 2, 3), reads)
    assert tables.get((1, 2, 3), DEVICE) is first and gpu.uploads == 1  # a hit: no copy
    gpu.current = "stream 1"
    other_stream = tables.get((1, 2, 3), DEVICE)
    assert other_stream is not first  # a table is only ever read on its own stream
    gpu.launch(other_stream, (1, 2, 3), reads)
    assert reads == [True, True]


def test_evicted_tables_go_oldest_first_and_their_memory_is_reused(gpu):
    tables = DeviceTables(capacity=2, streams=gpu)
    old = tables.get((1, 1), DEVICE)
    tables.get((2, 2), DEVICE)
    address = old.data_ptr()
    del old
    tables.get((3, 3), DEVICE)  # evicts (1, 1)
    gc.collect()
    assert len(tables) == 2
    assert tables.get((4, 4), DEVICE).data_ptr() == address  # its block went back
    assert gpu.uploads == 4


def test_a_table_made_during_capture_is_handed_to_no_one_before_the_replay(gpu):
    """Capture a call, run the same call eagerly before the first replay, churn the memo until
    everything evictable is gone, then replay twice: every kernel reads the right table, and
    the replays' copies write over no other table."""
    tables = DeviceTables(capacity=2, streams=gpu)
    values = (10, 20, 30, 40)
    eager_reads, graph_reads = [], []
    gpu.capture()
    gpu.launch(tables.get(values, DEVICE), values, graph_reads)
    gpu.launch(tables.get(values, DEVICE), values, graph_reads)  # e.g. the backward's reuse
    graph = gpu.end_capture()
    assert graph_reads == []  # nothing ran yet

    gpu.launch(tables.get(values, DEVICE), values, eager_reads)  # before the first replay
    for i in range(8):
        gpu.launch(tables.get((i,) * 4, DEVICE), (i,) * 4, eager_reads)
    gc.collect()
    gpu.replay(graph)
    gpu.replay(graph)
    for i in (6, 7):  # still memoized: the replays' copies must not have written over them
        gpu.launch(tables.get((i,) * 4, DEVICE), (i,) * 4, eager_reads)
    assert eager_reads == [True] * 11
    assert graph_reads == [True] * 4 and gpu.stale == []


def test_a_capture_never_depends_on_an_eager_table(gpu):
    """A capture after an eager call of the same content gets its own table, so evicting the
    eager one (and reusing its memory) cannot change what the graph reads."""
    tables = DeviceTables(capacity=1, streams=gpu)
    values = (5, 6, 7)
    eager = tables.get(values, DEVICE)
    graph_reads = []
    gpu.capture()
    captured = tables.get(values, DEVICE)
    gpu.launch(captured, values, graph_reads)
    graph = gpu.end_capture()
    assert captured is not eager
    del eager, captured
    for i in range(4):
        tables.get((i, i, i), DEVICE)
    gc.collect()
    gpu.replay(graph)
    assert graph_reads == [True] and gpu.stale == []


def test_concurrent_callers_get_right_tables_and_the_memo_stays_bounded(gpu):
    tables = DeviceTables(capacity=8, streams=gpu)
    failures = []

    def worker(seed):
        for i in range(200):
            values = ((seed * 7 + i) % 13, i % 5)
            reads = []
            gpu.launch(tables.get(values, DEVICE), values, reads)
            if reads != [True]:
                failures.append(values)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and gpu.stale == [] and len(tables) <= 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tables_are_copied_without_blocking_and_reused():
    tables = DeviceTables(capacity=4)
    device = torch.device("cuda")
    table = tables.get((1, 2, 3), device)
    assert table.device.type == "cuda" and table.tolist() == [1, 2, 3]
    assert tables.get((1, 2, 3), device) is table
