"""Teacher cache: recording -> cache -> training equals live-teacher training (fp32, bitwise);
bf16 is the live states rounded; int8 stays within its stated bounds on the states, sigma_d,
the loss and dS; a killed recording resumes; two torchrun ranks write the cache one process
writes; bad caches and mismatching objectives give errors naming the file and the mismatch."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from eofd_kernels import eofd_loss  # noqa: E402
from eofd_kernels.distill import (  # noqa: E402
    CacheError,
    DistillationLoss,
    HiddenProjection,
    TeacherCache,
    TopKLogits,
    attach_projection,
    record_teacher,
    soft_cross_entropy,
    uniform_layer_map,
)
from tests.distill_models import batches, model_pair  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "record_teacher_ranks.py"
# Small shards, so that every recording here spans several (and resumes mid-way).
RECORDING = {"layers": [0, 2, 4], "logits": "full", "shard_bytes": 12_000}


def padded_to_longest(batch: dict) -> dict:
    """The batch as a tokenizer with ``padding=True`` gives it: no all-padding columns."""
    out = dict(batch)
    for ids, mask in (("input_ids", "attention_mask"),
                      ("decoder_input_ids", "decoder_attention_mask")):
        if ids in batch:
            n = int(batch[mask].sum(1).max())
            out[ids], out[mask] = batch[ids][:, :n], batch[mask][:, :n]
    return out


def recording_batches(pair, steps: int = 6) -> list[dict]:
    return [padded_to_longest(b) for b in batches(pair, steps)]


def _objective(pair, *, use_logits=True):
    layer_map = uniform_layer_map(pair.student_layers, pair.teacher_layers)
    attach_projection(pair.student, HiddenProjection(pair.student_width, pair.teacher_width,
                                                     len(layer_map)))
    kwargs = {}
    if pair.seq2seq:
        kwargs["decoder_layer_map"] = layer_map
        kwargs["decoder_projection"] = HiddenProjection(pair.student_width, pair.teacher_width,
                                                        len(layer_map))
        pair.student.add_module("eofd_decoder_projection", kwargs["decoder_projection"])
    return DistillationLoss(layer_map, pair.student.eofd_projection, power=0.5,
                            hidden_weight=1e-2, temperature=2.0, use_logits=use_logits,
                            **kwargs)


def _train(student, objective, steps, teacher_of):
    """A few AdamW steps; returns the per-step losses. ``teacher_of(i)``: (batch, teacher)."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for i in range(steps):
        batch, teacher_out = teacher_of(i)
        out = objective(student(**batch, output_hidden_states=True), teacher_out,
                        batch["attention_mask"], batch.get("decoder_attention_mask"))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.detach())
    return losses


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_fp32_cache_trains_bitwise_like_the_live_teacher(tmp_path, kind):
    """Same batches, teacher in eval: the same losses and parameters, bit for bit (GPT-2 with
    its classification logits, T5 with per-token LM logits and encoder + decoder states)."""
    pair = model_pair(kind)
    recorded = recording_batches(pair, 4)
    decoder = {"decoder_layers": RECORDING["layers"]} if pair.seq2seq else {}
    cache = record_teacher(pair.teacher, recorded, out=tmp_path, print_fn=lambda *_: None,
                           **RECORDING, **decoder)
    objective = _objective(pair)
    start = {k: v.clone() for k, v in pair.student.state_dict().items()}

    def live(i):
        with torch.no_grad():
            return recorded[i], pair.teacher(**recorded[i], output_hidden_states=True)

    live_losses = _train(pair.student, objective, 4, live)
    live_params = {k: v.clone() for k, v in pair.student.state_dict().items()}
    pair.student.load_state_dict(start)

    def cached(i):
        batch = cache.collate([cache[j] for j in range(4 * i, 4 * i + 4)])
        teacher_out = batch.pop("teacher")
        assert batch.keys() == recorded[i].keys()
        for key, value in recorded[i].items():
            assert torch.equal(batch[key], value), key
        return batch, teacher_out

    cached_losses = _train(pair.student, objective, 4, cached)
    assert torch.equal(torch.stack(cached_losses), torch.stack(live_losses))
    for name, value in pair.student.state_dict().items():
        assert torch.equal(value, live_params[name]), name
    assert not torch.equal(live_params["eofd_projection.maps.0.weight"],
                           start["eofd_projection.maps.0.weight"])


def test_trainer_from_a_cache_equals_trainer_with_the_teacher(tmp_path):
    """EOFDTrainer(teacher=None, train_dataset=cache) against EOFDTrainer(teacher=...) on the
    recorded batches (sequential sampling): the same logged losses and parameters, bitwise;
    with DataLoader workers (the cache's memory maps reopen in each)."""
    from transformers import TrainingArguments

    from eofd_kernels.distill import EOFDTrainer

    pair = model_pair("bert")
    recorded = recording_batches(pair, 4)
    cache = record_teacher(pair.teacher, recorded, out=tmp_path / "cache",
                           print_fn=lambda *_: None, **RECORDING)
    objective = _objective(pair)
    start = {k: v.clone() for k, v in pair.student.state_dict().items()}
    rows = [dict(zip(b, values)) for b in recorded for values in zip(*b.values())]

    def run(**kwargs):
        pair.student.load_state_dict(start)
        args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4,
                                 per_device_train_batch_size=4, learning_rate=1e-3,
                                 use_cpu=True, report_to=[], logging_steps=1,
                                 save_strategy="no", seed=0, remove_unused_columns=False,
                                 disable_tqdm=True, train_sampling_strategy="sequential",
                                 dataloader_num_workers=kwargs.pop("workers", 0))
        trainer = EOFDTrainer(model=pair.student, args=args, objective=objective, **kwargs)
        trainer.train()
        losses = [(e["loss"], e["eofd 1<-2"]) for e in trainer.state.log_history if "loss" in e]
        return losses, {k: v.clone() for k, v in pair.student.state_dict().items()}

    live = run(teacher=pair.teacher, train_dataset=rows,
               data_collator=lambda items: {k: torch.stack([i[k] for i in items])
                                            for k in items[0]})
    from_cache = run(teacher=None, train_dataset=cache, workers=2)
    assert len(live[0]) == 4 and from_cache[0] == live[0]
    for name, value in from_cache[1].items():
        assert torch.equal(value, live[1][name]), name


def test_bf16_cache_is_the_live_states_rounded(tmp_path):
    pair = model_pair("t5")
    recorded = recording_batches(pair, 2)
    cache = record_teacher(pair.teacher, recorded, out=tmp_path, dtype="bf16", layers=[1, 4],
                           decoder_layers=[0, 3], print_fn=lambda *_: None)
    batch = cache.collate([cache[j] for j in range(4)])
    with torch.no_grad():
        live = pair.teacher(**recorded[0], output_hidden_states=True)
    for attribute, layers, mask in (
            ("encoder_hidden_states", [1, 4], batch["attention_mask"]),
            ("decoder_hidden_states", [0, 3], batch["decoder_attention_mask"])):
        got = getattr(batch["teacher"], attribute)
        assert len(got) == 5 and all(got[t] is None for t in range(5) if t not in layers)
        keep = mask.bool()
        for t in layers:
            want = getattr(live, attribute)[t]
            assert got[t].dtype == torch.bfloat16
            assert torch.equal(got[t][keep], want[keep].to(torch.bfloat16))
            assert not got[t][~keep].any()  # zero at padding
    assert cache.index["tokens"]["decoder"] == int(sum(b["decoder_attention_mask"].sum()
                                                       for b in recorded))


def _bounds(student, teacher, delta, power):
    """Worst-case bounds of the EOFD loss and dS of one layer when every teacher value of dim
    d may be off by delta_d (docs/design.md, "Teacher cache"): returns (sigma error bound,
    (loss low, loss high), elementwise dS error bound) around the live teacher's values."""
    s, t, delta = student.double(), teacher.double(), delta.double()
    n, d = t.shape
    sigma = t.std(0)
    d_sigma = math.sqrt(n / (n - 1)) * delta
    sbar, d_sbar = sigma.mean(), d_sigma.mean()
    w = (sigma / sbar) ** power
    w_hi = ((sigma + d_sigma) / (sbar - d_sbar).clamp_min(0)) ** power
    w_lo = ((sigma - d_sigma).clamp_min(0) / (sbar + d_sbar)) ** power
    root = ((s - t) ** 2).sum(0).sqrt()
    spread = math.sqrt(n) * delta
    loss_lo = (w_lo * (root - spread).clamp_min(0) ** 2).sum() / (n * d)
    loss_hi = (w_hi * (root + spread) ** 2).sum() / (n * d)
    d_w = torch.maximum(w_hi - w, w - w_lo)
    ds_error = 2 / (n * d) * (d_w * (s - t).abs() + w_hi * delta)
    return d_sigma, (loss_lo, loss_hi), ds_error


def test_int8_cache_within_its_stated_bounds(tmp_path):
    """Per value |T_int8 - T| <= delta_d (the index's bound), and sigma_d, the loss and dS of
    a layer stay within the bounds derived from it, against the live teacher."""
    pair = model_pair("bert")
    recorded = recording_batches(pair, 6)
    cache = record_teacher(pair.teacher, recorded, out=tmp_path, dtype="int8",
                           print_fn=lambda *_: None, **RECORDING)
    assert len(cache.shards) >= 2  # the bound is the worst shard's
    batch = cache.collate([cache[j] for j in range(len(cache))])
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        live = [pair.teacher(**b, output_hidden_states=True) for b in recorded]
    g = torch.Generator().manual_seed(3)
    for t in RECORDING["layers"]:
        want = torch.cat([o.hidden_states[t][b["attention_mask"].bool()]
                          for o, b in zip(live, recorded)])
        got = batch["teacher"].hidden_states[t][keep]
        delta = cache.max_abs_error("hidden", t)
        error = (got.double() - want.double()).abs()
        assert bool((error <= delta).all()) and error.max() > delta.max() / 4
        # A student's projected states near the teacher, as in training.
        student = want + 0.3 * torch.randn(want.shape, generator=g)
        d_sigma, (loss_lo, loss_hi), ds_error = _bounds(student, want, delta, 0.5)
        assert bool(((got.double().std(0) - want.double().std(0)).abs() <= d_sigma).all())
        grads = []
        for teacher in (want, got):
            leaf = student.clone().requires_grad_()
            loss = eofd_loss(leaf, teacher, power=0.5)
            loss.backward()
            grads.append(leaf.grad)
            value = loss.item()
        assert loss_lo * (1 - 1e-5) <= value <= loss_hi * (1 + 1e-5)
        assert bool(((grads[1] - grads[0]).abs().double() <= ds_error * (1 + 1e-5)
                     + 1e-12).all())


class _Interrupted(Exception):
    pass


def _killed_after(items, n):
    for i, item in enumerate(items):
        if i == n:
            raise _Interrupted
        yield item


def _assert_same_items(a: TeacherCache, b: TeacherCache) -> None:
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        x, y = a.collate([a[i]]), b.collate([b[i]])
        for key in x:
            if key != "teacher":
                assert torch.equal(x[key], y[key]), (i, key)
        for t in a.layers["hidden"]:
            assert torch.equal(x["teacher"].hidden_states[t], y["teacher"].hidden_states[t])
        assert torch.equal(x["teacher"].logits, y["teacher"].logits)


def test_killed_recording_resumes_from_its_last_complete_shard(tmp_path):
    pair = model_pair("bert")
    recorded = recording_batches(pair, 6)
    whole = record_teacher(pair.teacher, recorded, out=tmp_path / "whole",
                           print_fn=lambda *_: None, **RECORDING)
    out = tmp_path / "killed"
    with pytest.raises(_Interrupted):
        record_teacher(pair.teacher, _killed_after(recorded, 5), out=out, **RECORDING)
    kept = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert len(kept) >= 2 and not (out / "index.json").exists()
    with pytest.raises(CacheError, match="did not finish"):
        TeacherCache(out)
    # A kill while writing leaves a temporary file; a damaged last shard is recorded again.
    (out / "shard-r000-00009.safetensors.tmp").write_bytes(b"partial")
    last = out / kept[-1]
    last.write_bytes(last.read_bytes()[:-7])
    forwards = []
    pair.teacher.register_forward_hook(lambda *_: forwards.append(1))
    messages = []
    resumed = record_teacher(pair.teacher, recorded, out=out, print_fn=messages.append,
                             **RECORDING)
    assert "resuming" in messages[0]
    done = sum(TeacherCache(tmp_path / "whole").shards[i].tensor("batch_sizes").numel()
               for i in range(len(kept) - 1))
    assert len(forwards) == len(recorded) - done  # only the batches not kept were run
    assert not list(out.glob("*.tmp"))
    _assert_same_items(resumed, whole)
    # Resuming with other batches or settings is refused, naming what differs.
    with pytest.raises(CacheError, match="batch 0 differs"):
        record_teacher(pair.teacher, recorded[::-1], out=out, **RECORDING)
    with pytest.raises(CacheError, match="dtype: 'fp32' there, 'bf16' now"):
        record_teacher(pair.teacher, recorded, out=out, **{**RECORDING, "dtype": "bf16"})


def test_two_torchrun_ranks_write_the_cache_one_process_writes(tmp_path):
    pair = model_pair("bert")
    single = record_teacher(pair.teacher, recording_batches(pair), out=tmp_path / "one",
                            print_fn=lambda *_: None, **RECORDING)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parents[2]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(29600 + os.getpid() % 1000), str(SCRIPT),
         str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    two = TeacherCache(tmp_path / "two", verify=True)
    assert {s["rank"] for s in two.index["shards"]} == {0, 1}
    assert two.index["world_size"] == 2 and two.index["examples"] == single.index["examples"]
    _assert_same_items(two, single)


def test_top_k_logits_are_the_renormalised_top_k_distribution(tmp_path):
    """Top-k per-token LM logits (T5): the cache holds the live top k at valid tokens, and the
    soft cross-entropy on them is the one on logits that are -inf outside the top k."""
    pair = model_pair("t5")
    recorded = recording_batches(pair, 2)
    cache = record_teacher(pair.teacher, recorded, out=tmp_path, layers=[4], decoder_layers=[4],
                           logits=8, print_fn=lambda *_: None)
    batch = cache.collate([cache[j] for j in range(4)])
    top = batch["teacher"].logits
    assert isinstance(top, TopKLogits) and top.values.shape[-1] == 8
    keep = batch["decoder_attention_mask"].bool()
    with torch.no_grad():
        live = pair.teacher(**recorded[0]).logits
    values, indices = live.topk(8, dim=-1)
    assert torch.equal(top.values[keep], values[keep])
    assert torch.equal(top.indices[keep], indices[keep])
    student = torch.randn(live.shape, generator=torch.Generator().manual_seed(0))
    dense = torch.full_like(live, -math.inf).scatter(-1, indices, values)
    got = soft_cross_entropy(student, top, temperature=2.0, mask=keep)
    want = soft_cross_entropy(student, dense, temperature=2.0, mask=keep)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_bad_caches_and_mismatching_objectives_give_clear_errors(tmp_path):
    pair = model_pair("bert")
    recorded = recording_batches(pair, 3)
    out = tmp_path / "cache"
    cache = record_teacher(pair.teacher, recorded, out=out, print_fn=lambda *_: None,
                           **{**RECORDING, "layers": [0, 4], "logits": None})
    shard = out / cache.index["shards"][0]["file"]
    blob = shard.read_bytes()

    with pytest.raises(CacheError, match="needs hidden teacher layers \\[2\\]"):
        cache.check(_objective(pair, use_logits=False))  # the uniform map reads layer 2
    objective = DistillationLoss([(0, 0), (2, 4)], HiddenProjection(32, 48, 2),
                                 use_logits=False)
    with pytest.raises(CacheError, match="hidden layer 0 is d=64, the objective projects "
                                         "student layer 0 to d=48"):
        cache.check(objective)
    with pytest.raises(CacheError, match="no logits recorded"):
        cache.check(DistillationLoss([(0, 0)], HiddenProjection(32, 64, 1)))

    shard.write_bytes(blob[:-100])
    with pytest.raises(CacheError, match=f"{shard}: {len(blob) - 100} bytes, .*says "
                                         f"{len(blob)}"):
        TeacherCache(out)
    shard.write_bytes(b"\xff" * 8 + blob[8:])
    with pytest.raises(CacheError, match=f"{shard}: header of"):
        TeacherCache(out)
    damaged = bytearray(blob)
    damaged[-5] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    TeacherCache(out)  # the sizes and header are intact: only the checksum sees it
    with pytest.raises(CacheError, match=f"{shard}: CRC-32 .* \\(damaged\\)"):
        TeacherCache(out, verify=True)
    shard.unlink()
    with pytest.raises(CacheError, match=f"{shard}: missing"):
        TeacherCache(out)
    with pytest.raises(CacheError, match="not a teacher cache"):
        TeacherCache(tmp_path)
