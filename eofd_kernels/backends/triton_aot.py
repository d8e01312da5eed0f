"""Compile the Triton launch plan ahead of time for a GPU arch, on any machine.

``python -m eofd_kernels.backends.triton_aot`` plans the forward and backward of the headline
shapes (BERT-base: L=12, B=32, N=128, d=768; Flan-T5-XXL-like: L=32, B=4, N=128, d=4096) over
fp32/bf16/fp16/fp64 and mixed inputs, masked and not, exactly as the launcher would on an
H100/H200 (132 SMs), and compiles every planned kernel with ``triton.compile`` for sm_80 and
sm_90 (no GPU needed: the triton wheel ships ptxas). Per kernel it reports registers, spills,
local memory (stack frame), the occupancy the registers allow, and the PTX's global loads by
width, as JSON lines. Run it without TRITON_INTERPRET (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["CASES", "compile_launch", "planned_launches"]

GPU_SMS = 132  # H100 / H200: the launch shape depends on the SM count
REGISTERS_PER_SM = 65536
# name -> (layers, batch, seq, d)
SHAPES = {"bert-base": (12, 32, 128, 768), "flan-t5-xxl": (32, 4, 128, 4096)}
DTYPES = {"fp32": (torch.float32,) * 2, "bf16": (torch.bfloat16,) * 2,
          "fp16": (torch.float16,) * 2, "fp64": (torch.float64,) * 2,
          "mixed": (torch.bfloat16, torch.float32)}  # (student, teacher)
CASES = [(shape, dtype, masked) for shape in SHAPES for dtype in DTYPES
         for masked in (False, True)]
_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
          torch.float16: "fp16", torch.int64: "i64", torch.int8: "i8", torch.bool: "i1"}


def planned_launches(shape: str, dtype: str, masked: bool):
    """The forward's and backward's (dT and not) launches of a case, planned for the GPU.

    Layers are uninitialised CPU tensors (pages never touched): only their shapes, strides
    and alignment matter to the plan."""
    from .triton_kernels import Target, plan_backward, plan_forward

    layers, batch, seq, d = SHAPES[shape]
    s_dtype, t_dtype = DTYPES[dtype]
    n = batch * seq
    students = [torch.empty(n, d, dtype=s_dtype) for _ in range(layers)]
    teachers = [torch.empty(n, d, dtype=t_dtype) for _ in range(layers)]
    masks = [torch.ones(n, dtype=torch.bool) if masked else None for _ in range(layers)]
    target = Target(GPU_SMS, interpreter=False)
    forward, (losses, dim_stats) = plan_forward(students, teachers, masks, 0.5, 0.0, target)
    launches = list(forward)
    for need_dt in (False, True):
        launches += plan_backward(losses, students, teachers, masks, dim_stats, need_dt,
                                  target)[0]
    return launches


def _signature(launch):
    names = launch.kernel.arg_names
    signature, attrs = {}, {}
    for i, (name, value) in enumerate(zip(names, launch.args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
    constexprs = {}
    for name in names[len(launch.args):]:
        signature[name] = "constexpr"
        constexprs[name] = launch.constexprs[name]
    return signature, constexprs, attrs


def _ptxas(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(arch).path
    except TypeError:  # triton < 3.7 takes no arch
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        target = re.search(r"\.target (sm_\w+)", ptx).group(1)  # sm_90a for arch 90
        result = subprocess.run([ptxas, "--verbose", f"-arch={target}", str(path), "-o",
                                 str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    report = result.stdout + result.stderr
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", report)
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "stack": int(frame.group(1)), "spills": int(frame.group(2))}


def compile_launch(launch, arch: int) -> dict:
    """Compile one planned launch for ``sm_<arch>``; its resources and loads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _signature(launch)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32))
    ptx = compiled.asm["ptx"]
    loads = re.findall(r"ld\.global\S*", ptx)
    wide = [x for x in loads if re.search(r"\.(v4\.b32|v2\.b64|v4\.f32|v2\.f64)$", x)]
    info = _ptxas(ptx, arch)
    threads = 32 * compiled.metadata.num_warps
    info.update(kernel=launch.kernel.__name__, arch=arch, threads=threads,
                blocks_per_sm=REGISTERS_PER_SM // max(1, info["registers"] * threads),
                loads_16B=len(wide), loads_other=len(loads) - len(wide),
                constexprs={k: str(v) for k, v in constexprs.items()})
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    args = parser.parse_args(argv)
    seen = set()
    for shape, dtype, masked in CASES:
        for launch in planned_launches(shape, dtype, masked):
            key = (launch.kernel.__name__, str(_signature(launch)))
            if key in seen:
                continue
            seen.add(key)
            for arch in args.arch:
                record = compile_launch(launch, arch)
                record.update(shape=shape, dtype=dtype, masked=masked)
                print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
