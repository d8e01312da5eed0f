"""Small multi-layer masked fwd+bwd calls through the fused backends on the GPU, checked
against the torch backend: the case benchmarks/gpu_check.sh runs under compute-sanitizer.
One call per kernel path: aligned fp32 and bf16 layers (the 16-byte kernels) and a layer of
ragged d (the element-wise ones).

    python benchmarks/gpu_smoke.py [--backends ext triton]
"""

import argparse
import sys

import torch

import eofd_kernels as ek

# (shapes, dtype, relative tolerance against the torch backend in the same dtype)
CASES = [
    ([(2, 37, 96), (3, 20, 64)], torch.float32, 1e-5),
    ([(1, 50, 130)], torch.float32, 1e-5),
    ([(2, 33, 128)], torch.bfloat16, 2e-2),
]


def worst_error(backend: str, shapes, dtype, g: torch.Generator) -> float:
    device = torch.device("cuda")
    students = [torch.randn(sh, generator=g, device=device).to(dtype) for sh in shapes]
    teachers = [(torch.randn(sh, generator=g, device=device) * 3).to(dtype) for sh in shapes]
    masks = [torch.rand(sh[:-1], generator=g, device=device) < 0.8 for sh in shapes]
    results = []
    for name in ("torch", backend):
        ss = [s.clone().requires_grad_() for s in students]
        ts = [t.clone().requires_grad_() for t in teachers]
        loss = ek.eofd_loss(ss, ts, mask=masks, backend=name)
        results.append([loss, *torch.autograd.grad(loss, ss + ts)])
    torch.cuda.synchronize()
    want, got = results
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
               for a, b in zip(got, want))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["ext", "triton"])
    args = parser.parse_args()
    available = ek.available_backends("cuda")
    failed = False
    for backend in args.backends:
        if backend not in available:
            print(f"{backend}: not available on this GPU")
            failed = True
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        for shapes, dtype, tolerance in CASES:
            err = worst_error(backend, shapes, dtype, g)
            print(f"{backend} {dtype} {shapes}: max relative error vs torch {err:.2e}")
            failed |= not err <= tolerance
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
