"""What only a GPU can show (skipped elsewhere): CUDA-graph capture and replay of the fused
ops, tensors of more than 2^31 elements, and launches on the tensors' own device. The rest of
the suite runs on CUDA tensors too wherever a GPU is present (tests/helpers.py)."""

import pytest
import torch

import eofd_kernels as ek

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FUSED = ["ext", "triton"]


def _fused(backend):
    if backend not in ek.available_backends("cuda"):
        pytest.skip(f"{backend} cannot run on this GPU")


def _layers(device, shapes=((2, 40, 128), (3, 16, 96)), seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    students = [torch.randn(sh, generator=g, device=device) for sh in shapes]
    teachers = [torch.randn(sh, generator=g, device=device) * 2 for sh in shapes]
    masks = [torch.rand(sh[:-1], generator=g, device=device) < 0.8 for sh in shapes]
    return students, teachers, masks


@pytest.mark.parametrize("backend", FUSED)
def test_cuda_graph_capture_and_replay(backend):
    """fwd+bwd captured once, replayed on new values copied into the static inputs: the same
    loss and grads as eager calls on those values."""
    _fused(backend)
    students, teachers, masks = _layers("cuda")
    static_s = [s.clone().requires_grad_() for s in students]
    static_t = [t.clone() for t in teachers]

    def step():
        loss = ek.eofd_loss(static_s, static_t, mask=masks, backend=backend)
        return loss, torch.autograd.grad(loss, static_s)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up: Triton compiles, allocator settles
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grads = step()
    new_s, new_t, _ = _layers("cuda", seed=1)
    with torch.no_grad():
        for dst, src in zip(static_s + static_t, new_s + new_t):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    leaves = [s.clone().requires_grad_() for s in new_s]
    want = ek.eofd_loss(leaves, new_t, mask=masks, backend=backend)
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_more_than_2_to_the_31_elements(backend):
    """int64 offsets: one bf16 layer of 2^31 + 2^12 elements (4 GiB per side)."""
    _fused(backend)
    rows, d = 2 ** 19 + 1, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(rows, d, generator=g, device="cuda", dtype=torch.bfloat16)
    s = (t.float() + 0.5).to(torch.bfloat16)
    s[-1] += 3.0  # the last rows, past 2^31 elements, must count
    leaf = s.requires_grad_()
    loss = ek.eofd_loss(leaf, t, backend=backend)
    (grad,) = torch.autograd.grad(loss, leaf)
    want = ek.eofd_loss(s.detach().float(), t.float(), backend="torch")
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=0)
    assert grad[-1].float().abs().max() > grad[0].float().abs().max()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", FUSED)
def test_launches_on_the_tensors_device(backend):
    _fused(backend)
    students, teachers, masks = _layers("cuda:1")
    with torch.cuda.device(0):
        loss = ek.eofd_loss(students, teachers, mask=masks, backend=backend)
    want = ek.eofd_loss([s.cpu() for s in students], [t.cpu() for t in teachers],
                        mask=[m.cpu() for m in masks], backend="torch")
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-6, atol=0)
