"""A static performance model of a GPU kernel, read from its machine code (no GPU needed).

Given a cubin (``nvcc -cubin``, or a Triton kernel's ``compiled.asm["cubin"]``) and a kernel
name, :func:`analyse` reports what decides a memory-bound kernel's bandwidth on sm_90:

* registers, local memory (spills), shared memory: ``cuobjdump -res-usage``; threads per
  CTA: the kernel's ``EIATTR_MAX_THREADS`` / ``EIATTR_REQNTID`` (``cuobjdump -elf``) unless
  given;
* resident CTAs per SM (:func:`ctas_per_sm`, the occupancy calculator's rules);
* the main loop (the innermost loop issuing the most global-load bytes per iteration) and
  the bytes of global loads one thread has in flight there: the SASS's own dependence
  information is replayed along every path of the loop body (two trips, so loads issued for
  the next iteration count). A global load is outstanding from its issue until an
  instruction waits on its scoreboard (the wait mask or a ``DEPBAR`` in the control bits) or
  reads one of its destination registers; the peak sum of outstanding bytes is the thread's;
* barriers (``BAR``) per main-loop iteration;
* Little's law: a GPU streams at full bandwidth only when bytes in flight >= bandwidth x
  latency, so the reachable fraction is
  ``min(1, in_flight_per_SM x SMs / (bandwidth x latency))`` (H200: 4.3 TB/s, ~0.7 us).

This is a model, not a measurement: it ignores caches, DRAM page effects, issue limits and
tails of grids. ``python -m eofd_kernels.static_model CUBIN [KERNEL_REGEX]`` prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Device:
    """The limits the occupancy and Little's-law model need (defaults: H200, sm_90)."""

    name: str = "H200 (sm_90)"
    sms: int = 132
    registers_per_sm: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of 256
    max_ctas_per_sm: int = 32
    max_threads_per_sm: int = 2048
    shared_per_sm: int = 228 * 1024
    shared_unit: int = 128
    shared_reserved_per_cta: int = 1024  # the runtime's own share of every CTA
    bandwidth: float = 4.3e12  # bytes / s
    latency: float = 0.7e-6  # s, a loaded DRAM access

    @property
    def bytes_in_flight_needed(self) -> float:
        """Little's law: bytes that must be outstanding on the whole GPU for full bandwidth."""
        return self.bandwidth * self.latency


H200 = Device()


def ctas_per_sm(registers: int, threads: int, shared: int, device: Device = H200) -> int:
    """Resident CTAs per SM: the least of the CTA limit, the thread limit, the register file
    (``floor(registers_per_sm / regs_per_warp) // warps``, with ``regs_per_warp`` the warp's
    registers rounded up to the allocation unit) and shared memory (each CTA's share rounded
    up to the unit, plus the runtime's reserved KB)."""
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / device.register_unit) * device.register_unit
    by_registers = (device.registers_per_sm // per_warp) // warps
    by_threads = device.max_threads_per_sm // (warps * 32)
    per_cta = math.ceil(shared / device.shared_unit) * device.shared_unit
    by_shared = device.shared_per_sm // (per_cta + device.shared_reserved_per_cta)
    return min(device.max_ctas_per_sm, by_registers, by_threads, by_shared)


def little_fraction(bytes_per_sm: float, device: Device = H200) -> float:
    """Fraction of the bandwidth Little's law allows with `bytes_per_sm` outstanding."""
    return min(1.0, bytes_per_sm * device.sms / device.bytes_in_flight_needed)


# --- the tools -------------------------------------------------------------------------------

def find_tool(name: str) -> str | None:
    """`name` (cuobjdump, nvdisasm) on PATH, in the CUDA toolkit, or in the triton wheel."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        roots += [str(Path(p) / "backends" / "nvidia") for p in spec.submodule_search_locations]
    for root in filter(None, roots):
        path = Path(root) / "bin" / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def _cuobjdump(cubin: Path, *args: str) -> str:
    tool = find_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (PATH, CUDA_HOME/bin, the triton wheel)")
    result = subprocess.run([tool, *args, str(cubin)], capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


# --- parsing ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. LDG.E.128.CONSTANT
    operands: str
    predicated: bool
    wait_mask: int  # scoreboards waited on before issue (control bits)
    write_scoreboard: int  # 7: none
    target: int | None  # branch target address

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);"
                   r"\s*/\*\s*0x[0-9a-f]{16}\s*\*/")
_CONTROL = re.compile(r"^\s*/\*\s*(0x[0-9a-f]{16})\s*\*/\s*$")
_BRANCHES = {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BREAK", "KILL"}


def _parse_sass(text: str) -> dict[str, list[Instruction]]:
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    pending = None
    for line in text.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            current = functions.setdefault(header.group(1), [])
            pending = None
            continue
        if current is None:
            continue
        match = _LINE.search(line)
        if match:
            pending = match
            continue
        control = _CONTROL.match(line)
        if control and pending is not None:
            hi = int(control.group(1), 16)
            opcode, operands = pending.group(3), pending.group(4).strip()
            target = None
            if opcode.split(".")[0] in _BRANCHES:
                found = re.search(r"0x([0-9a-f]+)", operands)
                target = int(found.group(1), 16) if found else None
            current.append(Instruction(
                address=int(pending.group(1), 16), opcode=opcode, operands=operands,
                predicated=pending.group(2) is not None, wait_mask=(hi >> 52) & 0x3F,
                write_scoreboard=(hi >> 46) & 0x7, target=target))
            pending = None
    return functions


@dataclasses.dataclass(frozen=True)
class Resources:
    registers: int
    shared: int
    local: int  # local memory per thread (spills, run-time indexed arrays)
    stack: int
    max_threads: int | None


def _parse_resources(text: str) -> dict[str, dict]:
    out = {}
    for name, body in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", body))
        out[name] = {"registers": int(fields["REG"]), "shared": int(fields.get("SHARED", 0)),
                     "local": int(fields.get("LOCAL", 0)), "stack": int(fields.get("STACK", 0))}
    return out


def _parse_max_threads(text: str) -> dict[str, int]:
    out = {}
    for section in re.split(r"\n(?=\.nv\.info\.)", text):
        header = re.match(r"\.nv\.info\.(\S+)", section)
        if not header:
            continue
        found = re.search(r"EIATTR_(?:REQNTID|MAX_THREADS)\s*\n\s*Format:\s*\S+\s*\n\s*Value:"
                          r"\s*(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", section)
        if found:
            out[header.group(1)] = math.prod(int(v, 16) for v in found.groups())
    return out


class Cubin:
    """One cubin's SASS and resources, disassembled once."""

    def __init__(self, cubin: str | os.PathLike | bytes):
        with tempfile.TemporaryDirectory() as tmp:
            if isinstance(cubin, bytes):
                path = Path(tmp) / "kernel.cubin"
                path.write_bytes(cubin)
            else:
                path = Path(cubin)
            self.sass = _parse_sass(_cuobjdump(path, "-sass"))
            resources = _parse_resources(_cuobjdump(path, "-res-usage"))
            threads = _parse_max_threads(_cuobjdump(path, "-elf"))
        self.resources = {name: Resources(**r, max_threads=threads.get(name))
                          for name, r in resources.items()}

    def kernels(self) -> list[str]:
        return sorted(self.sass)


# --- the loop analysis -----------------------------------------------------------------------

_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "32": 4, "64": 8, "128": 16}


def global_load_bytes(ins: Instruction) -> int:
    """Bytes one thread reads with `ins` if it is a global (or generic) load, else 0."""
    if ins.base not in ("LDG", "LD"):
        return 0
    widths = [_WIDTH[m] for m in ins.opcode.split(".")[1:] if m in _WIDTH]
    return widths[-1] if widths else 4


def _registers(text: str) -> set[int]:
    regs = set()
    for number, wide in re.findall(r"\bR(\d+)(\.64)?\b", text):
        regs.update(range(int(number), int(number) + (2 if wide else 1)))
    return regs


def _destinations(ins: Instruction, nbytes: int) -> frozenset[int]:
    first = re.match(r"\s*R(\d+)", ins.operands)
    if not first:
        return frozenset()
    start = int(first.group(1))
    return frozenset(range(start, start + max(1, nbytes // 4)))


def _sources(ins: Instruction) -> set[int]:
    if ins.base.startswith(("ST", "RED", "BAR", "BRA")):
        return _registers(ins.operands)
    _, _, rest = ins.operands.partition(",")
    return _registers(rest)


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the backward branch
    load_bytes: int  # global-load bytes in the body (all paths)
    wide_loads: int  # 16-byte global loads in the body
    barriers: int


def find_loops(code: list[Instruction]) -> list[Loop]:
    index = {ins.address: i for i, ins in enumerate(code)}
    loops = []
    for i, ins in enumerate(code):
        if ins.base == "BRA" and ins.target is not None and ins.target <= ins.address:
            start = index[ins.target]
            body = code[start:i + 1]
            loops.append(Loop(start, i, sum(map(global_load_bytes, body)),
                              sum(global_load_bytes(b) == 16 for b in body),
                              sum(b.base == "BAR" for b in body)))
    return loops


def main_loop(code: list[Instruction]) -> Loop | None:
    """The innermost loop (no loop with global loads inside it) issuing the most global-load
    bytes per iteration, preferring 16-byte loads (the vector path over the scalar one)."""
    loops = [lp for lp in find_loops(code) if lp.load_bytes]
    inner = [lp for lp in loops if not any(o is not lp and lp.start <= o.start and o.end <= lp.end
                                           for o in loops)]
    return max(inner, key=lambda lp: (lp.wide_loads, lp.load_bytes, -lp.start), default=None)


def _step(state: frozenset, ins: Instruction) -> frozenset:
    """The loads still outstanding after `ins` issues; a load is (address, scoreboard,
    bytes, destination registers)."""
    kept = {o for o in state if not ins.wait_mask >> o[1] & 1}
    if ins.base == "DEPBAR":
        found = re.search(r"SB(\d)\s*,\s*(0x[0-9a-f]+|\d+)", ins.operands)
        if found:  # waits until at most `allowed` loads remain on the board: the oldest go
            board, allowed = int(found.group(1)), int(found.group(2), 0)
            on_board = sorted((o for o in kept if o[1] == board), key=lambda o: o[0])
            kept -= set(on_board[:max(0, len(on_board) - allowed)])
    read = _sources(ins)
    kept = {o for o in kept if not (o[3] & read)}
    nbytes = global_load_bytes(ins)
    if nbytes:
        kept.add((ins.address, ins.write_scoreboard, nbytes, _destinations(ins, nbytes)))
    return frozenset(kept)


def _add_maximal(states: list, new: frozenset) -> None:
    """Keeps only states that no other contains: outstanding sets evolve monotonically (a
    superset stays a superset along any path), so a contained one never gives a higher peak."""
    if any(new <= s for s in states):
        return
    states[:] = [s for s in states if not s <= new] + [new]


def peak_in_flight(code: list[Instruction], loop: Loop) -> int:
    """Peak global-load bytes one thread has outstanding in `loop`, over every path of its
    body (forward branches), for two trips (loads issued for the next iteration count)."""
    body = code[loop.start:loop.end + 1]
    position = {ins.address: i for i, ins in enumerate(body)}
    leaders = {0}
    for i, ins in enumerate(body):
        if ins.base in _BRANCHES:
            leaders.add(i + 1)
            if ins.target in position:
                leaders.add(position[ins.target])
    leaders = sorted(x for x in leaders if x < len(body))
    blocks = list(zip(leaders, leaders[1:] + [len(body)]))
    block_at = {start: b for b, (start, _) in enumerate(blocks)}
    peak = 0

    def trip(entry: list) -> list:
        """Walks the body's blocks in address order (a topological order of its forward
        edges) from the loop head's states; returns the states at the back edge."""
        nonlocal peak
        states = [[] for _ in blocks]
        for s in entry:
            _add_maximal(states[0], s)
        back: list = []
        for b, (start, stop) in enumerate(blocks):
            for state in states[b]:
                for ins in body[start:stop]:
                    state = _step(state, ins)
                    peak = max(peak, sum(o[2] for o in state))
                last = body[stop - 1]
                target = position.get(last.target) if last.base in _BRANCHES else None
                if target == 0:
                    _add_maximal(back, state)
                elif target is not None and target >= stop:
                    _add_maximal(states[block_at[target]], state)
                if (last.base not in _BRANCHES or last.predicated) and stop < len(body):
                    _add_maximal(states[b + 1], state)
        return back

    trip(trip([frozenset()]) or [frozenset()])
    return peak


# --- the report ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KernelModel:
    name: str
    registers: int
    local_bytes: int  # spills and local arrays: 0 for a healthy kernel
    shared_bytes: int
    threads: int
    ctas_per_sm: int
    bytes_in_flight_per_thread: int
    barriers_per_iteration: int
    device: Device = H200

    @property
    def bytes_in_flight_per_sm(self) -> int:
        return self.bytes_in_flight_per_thread * self.threads * self.ctas_per_sm

    @property
    def bandwidth_fraction(self) -> float:
        return little_fraction(self.bytes_in_flight_per_sm, self.device)

    def waves(self, ctas: int) -> float:
        """Waves a grid of `ctas` CTAs takes at this occupancy."""
        return ctas / (self.ctas_per_sm * self.device.sms)


def analyse(cubin: str | os.PathLike | bytes | Cubin, kernel: str, threads: int | None = None,
            device: Device = H200) -> KernelModel:
    """The model of `kernel` (its exact symbol name) in `cubin` (a path, the bytes, or a
    :class:`Cubin`); `threads` per CTA defaults to the kernel's declared maximum."""
    cubin = cubin if isinstance(cubin, Cubin) else Cubin(cubin)
    if kernel not in cubin.sass:
        raise KeyError(f"{kernel!r} is not in the cubin; it has {cubin.kernels()}")
    res = cubin.resources[kernel]
    threads = threads or res.max_threads
    if not threads:
        raise ValueError(f"{kernel}: no declared thread count; pass threads=")
    code = cubin.sass[kernel]
    loop = main_loop(code)
    local = res.local + res.stack
    if any(ins.base in ("LDL", "STL") for ins in code):
        local = max(local, 1)
    return KernelModel(
        name=kernel, registers=res.registers, local_bytes=local, shared_bytes=res.shared,
        threads=threads, ctas_per_sm=ctas_per_sm(res.registers, threads, res.shared, device),
        bytes_in_flight_per_thread=peak_in_flight(code, loop) if loop else 0,
        barriers_per_iteration=loop.barriers if loop else 0, device=device)


# --- the extension's CUDA kernels ------------------------------------------------------------

CUDA_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "eofd_cuda.cu"
_TYPES = {"f": "fp32", "d": "fp64", "13__nv_bfloat16": "bf16", "6__half": "fp16"}


def compile_cuda_kernels(out_dir: str | os.PathLike, arch: str = "sm_90") -> Path:
    """The extension's kernels (csrc/cuda/eofd_cuda.cu) as a cubin, with the build's flags."""
    from eofd_kernels.ext_build import NVCC_FLAGS

    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    out = Path(out_dir) / f"eofd_cuda_{arch}.cubin"
    result = subprocess.run([nvcc, *NVCC_FLAGS, f"-arch={arch}", "-cubin", "-o", str(out),
                             str(CUDA_SOURCE)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed: {result.stderr}")
    return out


@dataclasses.dataclass(frozen=True)
class CudaInstance:
    """What a mangled stats_kernel / backward_kernel name instantiates."""

    kernel: str  # "stats" or "backward"
    student: str  # the student's dtype
    teacher: str  # the teacher's dtype
    mask: bool
    teacher_grad: bool  # backward only
    aligned: bool  # the vector path every contiguous, aligned call takes

    @property
    def label(self) -> str:
        pair = (self.student if self.student == self.teacher
                else f"{self.student} student {self.teacher} teacher")
        parts = [self.kernel, pair, "mask" if self.mask else "no mask"]
        if self.kernel == "backward":
            parts.append("dT" if self.teacher_grad else "no dT")
        return " ".join(parts) + ("" if self.aligned else " (element-wise fallback)")


# The kernels' template arguments: <Student, Teacher, flags...>. A teacher of the student's
# (class) type is mangled as a back-reference (S<n>_) to it.
_TYPE = "f|d|13__nv_bfloat16|6__half"
_INSTANCE = re.compile(rf"(stats|backward)_kernelI({_TYPE})({_TYPE}|S\d*_)((?:Lb[01]E)+)")


def cuda_instance(symbol: str) -> CudaInstance | None:
    match = _INSTANCE.search(symbol)
    if not match:
        return None
    kernel, student, teacher, flags = match.groups()
    teacher = student if teacher.startswith("S") else teacher
    flags = [f == "1" for f in re.findall(r"Lb([01])E", flags)]
    pair = (_TYPES[student], _TYPES[teacher])
    if kernel == "stats":
        return CudaInstance("stats", *pair, flags[0], False, flags[1])
    return CudaInstance("backward", *pair, flags[0], flags[1], flags[2])


TABLE_HEADER = ("| kernel | regs | local B | CTAs/SM | B/thread in flight | KB/SM in flight "
                "| BAR/iter | Little's-law bound |\n|---|---|---|---|---|---|---|---|")


def table_row(label: str, m: KernelModel) -> str:
    return (f"| {label} | {m.registers} | {m.local_bytes} | {m.ctas_per_sm} | "
            f"{m.bytes_in_flight_per_thread} | {m.bytes_in_flight_per_sm / 1024:.1f} | "
            f"{m.barriers_per_iteration} | {100 * m.bandwidth_fraction:.0f} % |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cubin", nargs="?", help="a cubin; default: compile the extension's")
    parser.add_argument("--kernel", default="", help="regex on the symbol names")
    parser.add_argument("--arch", default="sm_90", help="for compiling the extension's kernels")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Cubin(args.cubin or compile_cuda_kernels(tmp, args.arch))
    print(f"STATIC MODEL (from SASS, not a measurement): {H200.name}, {H200.sms} SMs, Little's "
          f"law at {H200.bandwidth / 1e12:.1f} TB/s x {H200.latency * 1e6:.1f} us")
    print(TABLE_HEADER)
    rows = []
    for name in cubin.kernels():
        if not re.search(args.kernel, name) or not cubin.resources[name].max_threads:
            continue
        instance = cuda_instance(name)
        if args.cubin is None and instance is None:
            continue  # the extension's small merge/finalize kernels
        label = instance.label if instance else name
        rows.append((not instance or instance.aligned, label, analyse(cubin, name)))
    for _, label, model in sorted(rows, key=lambda r: (not r[0], r[1])):
        print(table_row(label, model))


if __name__ == "__main__":
    main()
