"""Launch shapes of the Triton kernels: tiles, warps, and grids that fill whole waves.

Every decision about how the Triton kernels are launched lives here (docs/design.md, "GPU
specifics"), and depends on the shapes and the target only, so a call's reduction order (hence
its bits) is the same every time:

* **Tiles.** A program walks a ``(BLOCK_N, BLOCK_D)`` tile down its chunk of rows. The stats
  kernel keeps running moments per element of half a tile (three accumulators each) and
  loads a whole tile per trip, so the tile's elements per thread set both its registers and
  the bytes it has in flight; ``stats_tile`` and ``backward_tile`` pick, per element width,
  shapes whose compiled kernels need no spills and issue 16-byte loads
  (tests/test_triton_aot.py checks both on the compiled code).
* **Occupancy.** How many programs of a compiled kernel an SM holds at once follows from its
  registers, warps and shared memory (``programs_per_sm``: the register file is allocated per
  warp in units of 256 registers). On a GPU these come from the very kernel that will run
  (compiled by the JIT before the grid is fixed: the grid-dependent arguments are not
  specialised on, so the grid cannot change which kernel runs); ahead of time, from the
  compiled cubin (triton_aot.py).
* **Grid.** ``chunking`` splits each layer's rows into chunks so that the grid is as close
  as possible to whole waves of resident programs: it minimises the modelled time
  ``waves x (tiles per chunk + CHUNK_OVERHEAD_TILES)`` over the chunk lengths the fp32
  partials allow (``layout.MAX_CHUNK_ROWS``).
* **The interpreter** runs programs one after another: its target is a number of resident
  programs in all (``triton_kernels.INTERPRETER_PROGRAMS``), 1 by default, which gives the
  fewest, largest chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import layout

__all__ = ["JitOccupancy", "SmLimits", "Target", "TileShape", "backward_tile", "chunking",
           "max_tiles_per_chunk", "one_program", "programs_per_sm", "stats_tile"]

# A program's fixed work besides its tiles (the pivot scan, one reduction over rows, the
# partials' stores), in units of one tile's work.
CHUNK_OVERHEAD_TILES = 1


@dataclass(frozen=True)
class TileShape:
    block_n: int
    block_d: int
    num_warps: int
    max_registers: int | None = None  # ptxas maxnreg

    @property
    def options(self) -> dict:
        """The kernel's compile options."""
        options = dict(num_warps=self.num_warps)
        if self.max_registers:
            options["maxnreg"] = self.max_registers
        return options


# The interpreter takes big tiles: its cost is per program and per operation, not per element.
INTERPRETER_TILE_ROWS = 64


def stats_tile(max_d: int, element_bytes: int, interpreter: bool) -> TileShape:
    """The stats kernel's tile (``element_bytes``: the wider input's).

    128 dims (one 16-byte vector of 16-bit data per thread per row: 16 lanes of 8 dims cover
    128) on 4 warps. A trip loads a whole tile and the kernel keeps three accumulators per
    element of half a tile: 32 rows of 16-bit data fit 128 registers without spills, i.e. 4
    programs per SM (the bound keeps ptxas from taking a few more, which would cost a whole
    program per SM); wider elements take 16 rows."""
    if interpreter:
        return TileShape(INTERPRETER_TILE_ROWS, min(_next_power_of_2(max_d), 256), 1)
    if element_bytes == 2:
        return TileShape(32, min(_next_power_of_2(max_d), 128), 4, max_registers=128)
    return TileShape(16, min(_next_power_of_2(max_d), 128), 4)


def backward_tile(max_d: int, element_bytes: int, interpreter: bool) -> TileShape:
    """The backward kernel's tile: 128 dims on 4 warps by 16 rows (8 for 8-byte elements),
    i.e. 16 elements per thread (8), few registers and many programs per SM."""
    if interpreter:
        return TileShape(INTERPRETER_TILE_ROWS, min(_next_power_of_2(max_d), 256), 1)
    return TileShape(8 if element_bytes == 8 else 16, min(_next_power_of_2(max_d), 128), 4)


@dataclass(frozen=True)
class SmLimits:
    """What bounds the programs resident on one SM (sm_80 / sm_90 defaults)."""

    registers: int = 65536
    register_unit: int = 256  # allocated per warp, in units of 256
    threads: int = 2048
    shared: int = 228 * 1024
    shared_reserved_per_program: int = 1024  # the runtime's share of every CTA

    @staticmethod
    def of(device: torch.device) -> SmLimits:
        props = torch.cuda.get_device_properties(device)
        return SmLimits(registers=props.regs_per_multiprocessor,
                        threads=props.max_threads_per_multi_processor,
                        shared=props.shared_memory_per_multiprocessor)


def programs_per_sm(registers: int, num_warps: int, shared: int,
                    limits: SmLimits = SmLimits()) -> int:
    """Programs (CTAs) of a kernel one SM holds at once: the least that the register file,
    the thread slots and shared memory allow."""
    per_warp = math.ceil(max(registers, 1) * 32 / limits.register_unit) * limits.register_unit
    by_registers = (limits.registers // per_warp) // num_warps
    by_threads = limits.threads // (32 * num_warps)
    by_shared = limits.shared // (shared + limits.shared_reserved_per_program)
    return max(1, min(by_registers, by_threads, by_shared))


@dataclass(frozen=True)
class Target:
    """Where a plan runs: ``sms`` SMs, and ``resident(kernel, args, constexprs, options)``
    giving how many programs of that compiled kernel one SM holds at once."""

    sms: int
    interpreter: bool
    resident: Callable[..., int]

    def resident_programs(self, kernel, args, constexprs, options) -> int:
        return self.sms * self.resident(kernel, args, constexprs, options)


def one_program(kernel, args, constexprs, options) -> int:
    return 1


class JitOccupancy:
    """Programs per SM of the kernel the JIT will launch for these arguments, from its
    compiled registers and shared memory (memoized per kernel variant)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.limits = SmLimits.of(device)
        self._known: dict = {}

    def __call__(self, kernel, args, constexprs, options) -> int:
        key = (kernel, tuple(sorted(options.items())), tuple(sorted(constexprs.items())),
               tuple(a.dtype if isinstance(a, torch.Tensor) else type(a) for a in args))
        known = self._known.get(key)
        if known is None:
            compiled = kernel.warmup(*args, grid=(1,), **options, **constexprs)
            compiled._init_handles()
            known = programs_per_sm(compiled.n_regs, options["num_warps"],
                                    compiled.metadata.shared, self.limits)
            self._known[key] = known
        return known


def chunking(tiles: int, programs_per_chunk: int, resident: int,
             max_tiles_per_chunk: int) -> tuple[int, int]:
    """``(tiles_per_chunk, num_chunks)`` for rows of ``tiles`` tiles, ``programs_per_chunk``
    programs per chunk index (layers x dim blocks) and ``resident`` programs at once.

    Minimises ``waves x (tiles_per_chunk + CHUNK_OVERHEAD_TILES)``: a grid one program short
    of a whole wave costs a whole wave; ties go to the longer chunks (fewer partials)."""
    best = None
    for per_chunk in range(1, min(tiles, max_tiles_per_chunk) + 1):
        chunks = -(-tiles // per_chunk)
        waves = -(-chunks * programs_per_chunk // resident)
        cost = (waves * (per_chunk + CHUNK_OVERHEAD_TILES), -per_chunk)
        if best is None or cost < best[0]:
            best = (cost, per_chunk, chunks)
    return best[1], best[2]


def max_tiles_per_chunk(block_n: int) -> int:
    """A chunk's fp32 partials hold at most MAX_CHUNK_ROWS rows (csrc/include/chunk_policy.h
    says why)."""
    return max(1, layout.MAX_CHUNK_ROWS // block_n)


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()
