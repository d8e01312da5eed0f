"""A small multi-layer masked fwd+bwd through every fused backend on the GPU, checked against
the torch backend: the case benchmarks/gpu_check.sh runs under compute-sanitizer memcheck."""

import sys

import torch

import eofd_kernels as ek


def main() -> int:
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(2, 37, 96), (3, 20, 64), (1, 50, 130)]  # ragged d: the general path too
    students = [torch.randn(sh, generator=g, device=device) for sh in shapes]
    teachers = [torch.randn(sh, generator=g, device=device) * 3 for sh in shapes]
    masks = [torch.rand(sh[:-1], generator=g, device=device) < 0.8 for sh in shapes]
    worst = 0.0
    want = None
    for backend in ["torch"] + [b for b in ("ext", "triton") if b in ek.available_backends(device)]:
        ss = [s.clone().requires_grad_() for s in students]
        ts = [t.clone().requires_grad_() for t in teachers]
        loss = ek.eofd_loss(ss, ts, mask=masks, backend=backend)
        grads = torch.autograd.grad(loss, ss + ts)
        torch.cuda.synchronize()
        got = [loss] + list(grads)
        if want is None:
            want = got
            continue
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
        print(f"{backend}: max relative error vs torch {err:.2e}")
        worst = max(worst, err)
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
