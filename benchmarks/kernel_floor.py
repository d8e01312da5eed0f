"""The extension's kernels alone against the memory floor of this device.

Times, round-robin in one run: the forward op, the backward op (frozen teacher), the CPU
training forward that also writes dS (``forward_and_grad``), a plain read of S and T
(``sum``) and a copy of S, on all distilled layers of a paper model. The ops are called
directly (no Python API, no autograd), so this isolates kernel time from dispatch; the whole
training step (``eofd_loss`` forward and backward, as the benchmark sweep times it) is timed
beside them. Both that step and ``forward_and_grad`` are put against the floor of the design's
separate passes (a read of S and T plus a copy of S): on CPU they move less (3 passes from
memory, T reread from L3), so they can come in under it. torch's ``sum`` and ``copy_`` are not
the machine's peak: ``memory_floor.c`` times the same traffic in plain C.

    python benchmarks/kernel_floor.py [--model bert-base] [--batch 8] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from eofd_kernels.backends import ext_backend  # registers the extension's ops
from eofd_kernels.bench.providers import make_inputs, make_step
from eofd_kernels.bench.shapes import MODELS, model_shape
from eofd_kernels.timing import time_ms_interleaved

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="bert-base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = model_shape(args.model, args.batch, args.seq)
    students, teachers = make_inputs(shape, DTYPES[args.dtype], device)
    masks = [None] * shape.layers
    ops = torch.ops.eofd_ext
    _, dim_stats = ops.forward(students, teachers, masks, 0.5, 0.0)
    grad = torch.ones(shape.layers, device=device)
    copies = [torch.empty_like(s) for s in students]
    ops_and_floors = {
        "forward op": lambda: ops.forward(students, teachers, masks, 0.5, 0.0),
        "backward op": lambda: ops.backward(grad, students, teachers, masks, dim_stats, False),
        "read S and T": lambda: [x.sum() for x in students + teachers],
        "copy S": lambda: [c.copy_(s) for c, s in zip(copies, students)],
        "ext step": make_step("ext", "fwd+bwd", students, teachers),
    }
    if device.type == "cpu":
        ops_and_floors["fwd + dS op"] = lambda: ops.forward_and_grad(
            students, teachers, masks, 0.5, 0.0, grad.double(), ext_backend.grad_group_bytes())
    times = time_ms_interleaved(ops_and_floors, device, warmup=3, reps=args.reps)
    print(f"{args.model} L={shape.layers} B={args.batch} N={args.seq} d={shape.d} {args.dtype} "
          f"on {device}, median of {args.reps} round-robin reps")
    median = {name: statistics.median(ms) for name, ms in times.items()}
    # The floors: the forward reads S and T once; the backward reads them and streams dS out,
    # the traffic of a copy of S (a copy's stores first read their lines).
    median["read + copy"] = median["read S and T"] + median["copy S"]
    floor = {"forward op": "read S and T", "backward op": "copy S", "ext step": "read + copy",
             "fwd + dS op": "read + copy"}
    for name, ms in times.items():
        versus = (f"   {median[name] / median[floor[name]]:.2f}x {floor[name]}"
                  if name in floor else "")
        print(f"  {name:<13} {median[name]:8.3f} ms   (min {min(ms):.3f}){versus}")


if __name__ == "__main__":
    main()
