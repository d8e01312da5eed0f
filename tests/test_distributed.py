"""A batch split over ranks (torch.distributed, gloo on CPU): the loss of the whole batch on
every rank, and world_size x the whole batch's gradient for each rank's own tokens, for every
backend; a DDP training loop equals the single-process one; given weights make gradient
accumulation exact; bad input is an error on every rank, not a hang.

fp32 bound 1e-6 relative (the single-process bound): merging summaries in float64 in rank
order differs from one process's chunk merge by rounding only.
"""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eofd_kernels as ek

from .helpers import rel_err

BACKENDS = [b for b in ek.available_backends("cpu") if b != "reference"]


def _run(world: int, fn, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; re-raise the first failure."""
    with tempfile.TemporaryDirectory() as tmp:
        errors = mp.get_context("spawn").Manager().list()
        mp.start_processes(_entry, args=(world, f"file://{tmp}/store", errors, fn, args),
                           nprocs=world, start_method="spawn", join=True)
        if errors:
            raise AssertionError(errors[0])


def _entry(rank, world, init, errors, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except Exception:  # noqa: BLE001 - sent to the parent, which fails the test
        errors.append(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def _batch(seed=0):
    """Three layers of different d; uneven masks; a teacher dim with |mean| 1e3, std 0.1."""
    g = torch.Generator().manual_seed(seed)
    students, teachers = [], []
    for d in (12, 20, 33):
        t = torch.randn(7, 9, d, generator=g) * torch.exp(torch.rand(d, generator=g) * 2 - 1)
        t[..., 1] = 1e3 + 0.1 * torch.randn(7, 9, generator=g)
        teachers.append(t)
        students.append(t + 0.5 * torch.randn(7, 9, d, generator=g))
    mask = torch.rand(7, 9, generator=g) < 0.7
    mask[:, 0] = True
    return students, teachers, mask


def _shard(x, rank, world):
    bounds = {2: [0, 2, 7], 3: [0, 1, 4, 7]}[world]  # uneven shards of the 7 sequences
    return x[bounds[rank]:bounds[rank + 1]]


def _loss_and_grads(students, teachers, mask, backend, teacher_grad, **kwargs):
    ss = [s.clone().requires_grad_() for s in students]
    ts = [t.clone().requires_grad_(teacher_grad) for t in teachers]
    loss = ek.eofd_loss(ss, ts, mask=mask, backend=backend, **kwargs)
    grads = torch.autograd.grad(loss, ss + (ts if teacher_grad else []))
    return loss.detach(), grads


def _split_batch_worker(rank, world):
    """Every backend, teacher grad on and off; and teacher_weights of the split batch."""
    students, teachers, mask = _batch()
    for backend in BACKENDS:
        for teacher_grad in (True, False):
            whole, whole_grads = _loss_and_grads(students, teachers, mask, backend,
                                                 teacher_grad)
            mine = [_shard(x, rank, world) for x in students + teachers]
            loss, grads = _loss_and_grads(mine[:3], mine[3:], _shard(mask, rank, world),
                                          backend, teacher_grad, process_group=dist.group.WORLD)
            assert rel_err(loss, whole) <= 1e-6, (backend, loss, whole)
            for got, want in zip(grads, whole_grads, strict=True):
                err = rel_err(got / world, _shard(want, rank, world))
                assert err <= 1e-6, (backend, teacher_grad, err)
            everyone = [torch.empty_like(loss) for _ in range(world)]
            dist.all_gather(everyone, loss)
            assert all(torch.equal(x, loss) for x in everyone)  # bitwise the same loss
    my_teachers = [_shard(t, rank, world) for t in teachers]
    weights = ek.teacher_weights(my_teachers, mask=_shard(mask, rank, world),
                                 process_group=dist.group.WORLD)
    for got, want in zip(weights, ek.teacher_weights(teachers, mask=mask), strict=True):
        assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("world", [2, 3])
def test_split_batch_equals_whole_batch(world):
    _run(world, _split_batch_worker)


def _ddp_worker(rank, world, with_group, out_dir):
    from eofd_kernels.distill import DistillationLoss, HiddenProjection, attach_projection
    from eofd_kernels.distill.layer_map import uniform_layer_map

    from .distill_models import batches, model_pair
    from .test_distill_loops import STEPS

    pair = model_pair("bert")  # the same seed, as in the single-process loop
    layer_map = uniform_layer_map(pair.student_layers, pair.teacher_layers)
    proj = attach_projection(pair.student, HiddenProjection(
        pair.student_width, pair.teacher_width, len(layer_map)))
    objective = DistillationLoss(layer_map, proj, power=0.5, hidden_weight=1.0,
                                 temperature=2.0, backend="ext" if "ext" in BACKENDS else "torch",
                                 process_group=dist.group.WORLD if with_group else None)
    student = torch.nn.parallel.DistributedDataParallel(pair.student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, eps=1e-6)
    for batch in batches(pair, STEPS):
        mine = {k: _shard_even(v, rank, world) for k, v in batch.items()}
        with torch.no_grad():
            t_out = pair.teacher(**mine, output_hidden_states=True)
        out = objective(student(**mine, output_hidden_states=True), t_out,
                        mine["attention_mask"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    if rank == 0:
        torch.save(pair.student.state_dict(), os.path.join(out_dir, "ddp.pt"))


def _shard_even(x, rank, world):
    size = x.shape[0] // world
    return x[rank * size:(rank + 1) * size]


def test_ddp_training_equals_single_process():
    """3 AdamW steps of a small BERT pair on 2 ranks (half the batch each, DDP) with
    process_group give the single-process parameters (1e-5); without it they differ."""
    from .test_distill_loops import train

    _, _, single = train("bert", "ext" if "ext" in BACKENDS else "torch", "cpu")
    results = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for with_group in (True, False):
            _run(2, _ddp_worker, with_group, out_dir)
            results[with_group] = torch.load(os.path.join(out_dir, "ddp.pt"))
    worst = {k: max((results[k][n] - single[n]).abs().max().item() for n in single)
             for k in results}
    assert worst[True] <= 1e-5, worst
    assert worst[False] > 1e-4, worst  # the per-rank weights really differ


def test_accumulation_with_whole_batch_weights_equals_the_unsplit_step():
    """4 micro-batches with weights= from the whole batch, each loss / 4: the gradients of the
    unsplit step (frozen teacher; equal micro-batches, no padding)."""
    students, teachers, _ = _batch()
    students = [s[:4] for s in students]
    teachers = [t[:4] for t in teachers]
    weights = ek.teacher_weights(teachers)
    for backend in BACKENDS:
        _, whole = _loss_and_grads(students, teachers, None, backend, False)
        leaves = [s.clone().requires_grad_() for s in students]
        for k in range(4):
            loss = ek.eofd_loss([s[k:k + 1] for s in leaves], [t[k:k + 1] for t in teachers],
                                weights=weights, backend=backend)
            (loss / 4).backward()
        for got, want in zip([s.grad for s in leaves], whole, strict=True):
            assert rel_err(got, want) <= 1e-6, backend


# What the ranks must agree on, or what one rank alone gets wrong: (name, the kwargs of rank 1
# (rank 0 passes the defaults), the error every rank must raise).
DISAGREEMENTS = [
    ("widths", dict(d=9), "every rank must pass the same layer widths"),
    ("power", dict(power=1.0), "every rank must pass the same power"),
    ("eps", dict(eps=0.5), "every rank must pass the same eps"),
    ("layer count", dict(layers=2), "every rank must pass the same layer widths"),
    ("dtype", dict(dtype=torch.float64), "every rank must pass the same student dtypes"),
    ("weights given", dict(weights=True), "every rank must pass the same weights given"),
    ("bad mask value", dict(bad_mask=True), r"mask\[0\]: a torch.float32 mask must hold only"),
    ("wrong weights shape", dict(bad_weights=True), r"weights\[0\]: expected shape"),
]


def _call(rank, power=0.5, eps=0.0, d=8, layers=1, dtype=torch.float32, weights=False,
          bad_mask=False, bad_weights=False, backend="auto"):
    s, t = torch.randn(2, 3, d, dtype=dtype), torch.randn(2, 3, d, dtype=dtype)
    mask = torch.tensor([[1, 1, 0], [1, 0.5 if bad_mask else 1, 1]])
    given = None
    if weights or bad_weights:
        given = [torch.ones(d + 1 if bad_weights else d)] * layers
    return ek.eofd_loss([s] * layers, [t] * layers, mask=mask, power=power, eps=eps,
                        weights=given, backend=backend, process_group=dist.group.WORLD)


def _disagreement_worker(rank, world):
    for name, kwargs, message in DISAGREEMENTS:
        with pytest.raises((ValueError, RuntimeError, TypeError), match=message):
            _call(rank, **(kwargs if rank == 1 else {}))
        # The group is still usable: the next call of every rank agrees and works.
        assert torch.isfinite(_call(rank)), name


def test_ranks_that_disagree_all_get_the_same_error_not_a_hang():
    _run(2, _disagreement_worker)


def _subgroup_worker(rank, world):
    group = dist.new_group([0])
    if rank == 1:
        with pytest.raises(ValueError, match="is not a member of the group"):
            ek.eofd_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), process_group=group)


def test_rank_outside_the_group_gets_a_clear_error():
    _run(2, _subgroup_worker)


def _padding_shard_worker(rank, world):
    """Rank 1 holds one token or only padding (NaN there too): the loss, the gradients and the
    weights are those of rank 0's tokens alone, on every backend."""
    students, teachers, mask = _batch()
    for backend in BACKENDS:
        for shard_kind in ("padding", "one token"):
            s, t, m = (_shard(x, rank, world) for x in (students[0], teachers[0], mask))
            if rank == 1:
                s, t, m = s.clone(), t.clone(), m.clone()
                if shard_kind == "padding":
                    m[:] = False
                    s[:], t[:] = torch.nan, torch.nan
                else:
                    s, t, m = s[:1, :1], t[:1, :1], m[:1, :1] | True
            loss, grads = _loss_and_grads([s], [t], m, backend, True,
                                          process_group=dist.group.WORLD)
            weights = ek.teacher_weights(t, mask=m, backend=backend,
                                         process_group=dist.group.WORLD)
            s0, t0, m0 = (_shard(x, 0, world) for x in (students[0], teachers[0], mask))
            if shard_kind == "one token":
                keep = torch.zeros_like(mask)
                keep[:2] = mask[:2]
                keep[2, 0] = True  # rank 1's token, in the whole batch
                whole, _ = _loss_and_grads([students[0][:3]], [teachers[0][:3]], keep[:3],
                                           backend, True)
            else:
                whole, _ = _loss_and_grads([s0], [t0], m0, backend, True)
            assert rel_err(loss, whole) <= 1e-6, (backend, shard_kind)
            assert torch.isfinite(weights).all(), (backend, shard_kind)
            if rank == 1 and shard_kind == "padding":
                assert all((g == 0).all() for g in grads), backend


def test_a_shard_of_padding_or_one_token_breaks_nothing():
    _run(2, _padding_shard_worker)


def test_bad_group_and_weights_name_the_argument():
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    # Which error depends on whether this process has initialised torch.distributed (another
    # test's one-rank group may have): either names the argument.
    with pytest.raises((ValueError, TypeError), match="process_group: (torch.distributed is not "
                       "initialized|expected a torch.distributed ProcessGroup, got object)"):
        ek.eofd_loss(s, t, process_group=object())
    with pytest.raises(ValueError, match=r"weights\[0\]: expected shape \(4,\)"):
        ek.eofd_loss(s, t, weights=[torch.ones(5)])
    with pytest.raises(ValueError, match="weights: expected one"):
        ek.eofd_loss([s, s], [t, t], weights=[torch.ones(4)])
