"""Compile the Triton launch plan ahead of time for a GPU arch, on any machine.

``python -m eofd_kernels.backends.triton_aot`` plans the forward and backward of the headline
shapes (BERT-base: 12 layers of 32 x 128 tokens, d = 768; a Llama-like model: 32 layers of
8 x 2048 tokens, d = 4096) over fp32/bf16/fp16/fp64 and mixed inputs, masked and not, exactly
as the launcher would on an H100/H200 (132 SMs, the occupancy of each kernel as compiled for
sm_90), and compiles every planned kernel for sm_80 and sm_90 (no GPU needed: the triton wheel
ships ptxas and cuobjdump). Each kernel is specialised exactly as the JIT would specialise it
for the planned arguments (triton's own binder: 16-byte aligned pointers and integers
divisible by 16 get ``tt.divisibility = 16``). Per kernel it reports, as JSON lines: registers,
spills, local memory, programs per SM, the grid in waves, and the main loop's global loads by
width and its barriers. Run it without TRITON_INTERPRET (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CASES", "GPU_SMS", "PlannedKernel", "compile_launch", "planned_kernels",
           "planned_launches"]

GPU_SMS = 132  # H100 / H200: the launch shape depends on the SM count
PLAN_ARCH = 90  # the occupancy the plan is made for
# name -> (layers, tokens, d)
SHAPES = {"bert-base": (12, 32 * 128, 768), "llama-like": (32, 8 * 2048, 4096)}
DTYPES = {"fp32": (torch.float32,) * 2, "bf16": (torch.bfloat16,) * 2,
          "fp16": (torch.float16,) * 2, "fp64": (torch.float64,) * 2,
          "mixed": (torch.bfloat16, torch.float32)}  # (student, teacher)
CASES = [(shape, dtype, masked) for shape in SHAPES for dtype in DTYPES
         for masked in (False, True)]


@dataclass(frozen=True)
class PlannedKernel:
    """One planned launch compiled for one arch: what a static model of the machine code
    needs (``cubin`` holds ``symbol``; ``threads`` per program; ``programs`` in the grid)."""

    label: str
    symbol: str
    cubin: bytes
    ptx: str
    threads: int
    programs: int
    launch: object


def _binder(kernel, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    return target, backend, create_function_from_signature(kernel.signature, kernel.params,
                                                           backend)


def specialize(launch, arch: int):
    """``(source, target, options)`` of ``launch`` as the JIT would compile it on sm_<arch>:
    its own binder gives each argument its type and specialisation (tt.divisibility for
    16-byte aligned pointers and integers divisible by 16, not for arguments marked
    do_not_specialize), exactly as ``JITFunction.run`` does."""
    from triton.compiler import ASTSource

    kernel = launch.kernel
    target, backend, binder = _binder(kernel, arch)
    kwargs = dict(launch.constexprs, **launch.options)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options.__dict__


def variant(launch, arch: int) -> str:
    """What tells compiled variants apart: kernel, argument types and specialisation,
    constexprs, warps."""
    source, _, options = specialize(launch, arch)
    return (f"{launch.kernel.__name__} sm_{arch} {source.signature} {source.constants} "
            f"{source.attrs} {options['num_warps']} {options.get('maxnreg')}")


_COMPILED: dict[str, object] = {}


def compiled(launch, arch: int):
    """The ``CompiledKernel`` of ``launch`` for sm_<arch> (memoized per variant)."""
    import triton

    key = variant(launch, arch)
    if key not in _COMPILED:
        source, target, options = specialize(launch, arch)
        _COMPILED[key] = triton.compile(source, target=target, options=options)
    return _COMPILED[key]


def _tool(name: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return str(Path(get_ptxas(PLAN_ARCH).path).with_name(name))


def resources(cubin: bytes) -> dict:
    """Registers, stack, local and shared memory of the one kernel in ``cubin``
    (``cuobjdump -res-usage``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)],
                                capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", report))
    return {"registers": int(fields["REG"]), "stack": int(fields.get("STACK", 0)),
            "local": int(fields.get("LOCAL", 0)), "shared": int(fields.get("SHARED", 0))}


def _aot_resident(kernel, args, constexprs, options) -> int:
    from .triton_grid import programs_per_sm
    from .triton_kernels import Launch

    kernel_binary = compiled(Launch(kernel, (1,), args, constexprs, options), PLAN_ARCH)
    used = resources(kernel_binary.asm["cubin"])
    return programs_per_sm(used["registers"], options["num_warps"],
                           max(used["shared"], kernel_binary.metadata.shared))


def gpu_target():
    """The launcher's target for an H100/H200, its occupancy from the sm_90 compile."""
    from .triton_grid import Target

    return Target(GPU_SMS, False, _aot_resident)


def planned_launches(shape: str, dtype: str, masked: bool):
    """The forward's and backward's (dT and not) launches of a case, planned for the GPU.

    Layers are uninitialised CPU tensors (pages never touched): only their shapes, strides
    and alignment matter to the plan."""
    from .triton_kernels import plan_backward, plan_forward

    layers, n, d = SHAPES[shape]
    s_dtype, t_dtype = DTYPES[dtype]
    students = [torch.empty(n, d, dtype=s_dtype) for _ in range(layers)]
    teachers = [torch.empty(n, d, dtype=t_dtype) for _ in range(layers)]
    masks = [torch.ones(n, dtype=torch.bool) if masked else None for _ in range(layers)]
    target = gpu_target()
    forward, (losses, dim_stats) = plan_forward(students, teachers, masks, 0.5, 0.0, target)
    launches = list(forward)
    for need_dt in (False, True):
        launches += plan_backward(losses, students, teachers, masks, dim_stats, need_dt,
                                  target)[0]
    return launches


def _loops(ptx: str) -> list[str]:
    """The bodies of the PTX's loops (a label and a later branch back to it)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"\s*(\$L__BB\d+_\d+):", line))}
    bodies = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and labels.get(m.group(1), i) < i:
            bodies.append("\n".join(lines[labels[m.group(1)]:i + 1]))
    return bodies


_WIDE = r"\.v4\.(?:b32|f32|u32)|\.v2\.(?:b64|f64|u64)"


def main_loop(ptx: str) -> dict:
    """The main loop (the loop with the most global loads): its loads by width and its
    barriers (``bar.sync`` / ``barrier.sync``, the same instructions as BAR.SYNC in SASS)."""
    bodies = _loops(ptx)
    if not bodies:
        return {"loop_loads_16B": 0, "loop_loads_other": 0, "loop_barriers": 0}
    body = max(bodies, key=lambda b: len(re.findall(r"ld\.global", b)))
    loads = re.findall(r"ld\.global\S*", body)
    wide = [x for x in loads if re.search(_WIDE, x)]
    return {"loop_loads_16B": len(wide), "loop_loads_other": len(loads) - len(wide),
            "loop_barriers": len(re.findall(r"\b(?:bar|barrier)\.sync", body))}


def compile_launch(launch, arch: int) -> dict:
    """Compile one planned launch for ``sm_<arch>``; its resources, occupancy and loads."""
    from .triton_grid import programs_per_sm

    kernel_binary = compiled(launch, arch)
    ptx = kernel_binary.asm["ptx"]
    info = resources(kernel_binary.asm["cubin"])
    loads = re.findall(r"ld\.global\S*", ptx)
    wide = [x for x in loads if re.search(_WIDE, x)]
    threads = 32 * kernel_binary.metadata.num_warps
    per_sm = programs_per_sm(info["registers"], kernel_binary.metadata.num_warps,
                             max(info["shared"], kernel_binary.metadata.shared))
    programs = 1
    for size in launch.grid:
        programs *= size
    info.update(kernel=launch.kernel.__name__, arch=arch, threads=threads,
                programs_per_sm=per_sm, grid=list(launch.grid),
                waves=programs / (per_sm * GPU_SMS),
                args=[a for a in launch.args if isinstance(a, int)],
                loads_16B=len(wide), loads_other=len(loads) - len(wide),
                attrs=str(specialize(launch, arch)[0].attrs),
                constexprs={k: str(v) for k, v in launch.constexprs.items()},
                **main_loop(ptx))
    return info


def planned_kernels(arch: int = PLAN_ARCH, cases=None):
    """Every distinct planned kernel of ``cases`` (default: all) compiled for sm_<arch>, as
    :class:`PlannedKernel`s (for a static model of the machine code)."""
    seen = {}
    for shape, dtype, masked in cases or CASES:
        for launch in planned_launches(shape, dtype, masked):
            key = variant(launch, arch)
            if key in seen:
                continue
            kernel_binary = compiled(launch, arch)
            programs = 1
            for size in launch.grid:
                programs *= size
            label = (f"triton {launch.kernel.__name__.strip('_')} {dtype} "
                     f"{'mask' if masked else 'no mask'} {shape}")
            if "NEED_DT" in launch.constexprs:
                label += " dT" if launch.constexprs["NEED_DT"] else " no dT"
            seen[key] = PlannedKernel(label, kernel_binary.metadata.name,
                                      kernel_binary.asm["cubin"], kernel_binary.asm["ptx"],
                                      32 * kernel_binary.metadata.num_warps, programs, launch)
    return list(seen.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    args = parser.parse_args(argv)
    for shape, dtype, masked in CASES:
        for launch in planned_launches(shape, dtype, masked):
            for arch in args.arch:
                record = compile_launch(launch, arch)
                record.update(shape=shape, dtype=dtype, masked=masked)
                print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
