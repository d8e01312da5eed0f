"""Teacher cache: run the teacher once, distil from its recorded hidden states many times.

:func:`record_teacher` runs a teacher under inference mode over batches and stores only what
the objective reads: the requested hidden-state layers (HF indexing) at the valid tokens, the
batch's input rows, and optionally the logits ``L_pred`` needs (full, or the top k per row).
:class:`TeacherCache` reads it back as a map-style Dataset whose :meth:`TeacherCache.collate`
yields the models' keyword inputs plus ``teacher``, a :class:`CachedTeacherOutput` that
:class:`DistillationLoss` takes in place of the teacher model's output.

Format (a folder):

* ``shard-r<rank>-<n>.safetensors``: standard safetensors files (``safetensors.torch.load_file``
  reads them), written whole and renamed into place, so a file under its final name is
  complete. Tensors: ``<side>.<t>`` ``(tokens, d)`` for each recorded layer ``t`` of a side
  (``hidden``; ``encoder`` / ``decoder`` for encoder-decoder teachers), in the cache dtype;
  for int8 also ``<side>.<t>.scale`` / ``.offset`` ``(d,)`` float32 (the shard's own ranges);
  ``input.<key>`` / ``length.<key>``: each example's input row, trailing padding trimmed;
  ``valid.<side>``: valid tokens per example; ``batch_sizes``; ``logits`` (full) or
  ``logits.values`` / ``logits.indices`` (top k), per valid token or per example.
* ``index.json``: the teacher's name, class and a hash of its config, the layers, widths,
  dtype, the per-layer per-dim int8 error bound, example / token counts and the shard list
  (file, size, CRC-32, which batches). Written last: a folder without it is unfinished.

Dtypes. ``"fp32"`` / ``"bf16"`` store the states as float32 / bfloat16 (round to nearest);
float32 holds an fp32 (or bf16) teacher's states exactly, so training from it is the same as
training with the live teacher on the same batches. ``"int8"`` stores per-layer, per-dim
affine 8-bit codes: for dim ``d`` of a layer in a shard, ``lo_d`` / ``hi_d`` the shard's range,
``s_d = (hi_d - lo_d) / 255``, code ``q = round((x - lo_d) / s_d)`` in 0..255, read back as
``q s_d + lo_d`` (float32). Per-dim because outlier dims span ranges orders of magnitude wider
than the rest: one scale per layer would round every ordinary dim to a few codes. Each value is
then within ``delta_d = s_d / 2 + 2**-22 max(|lo_d|, |hi_d|)`` of the teacher's (the second
term covers float32 rounding); ``index.json`` holds the largest ``delta_d`` over the shards
(:meth:`TeacherCache.max_abs_error`), and docs/design.md, "Teacher cache", derives the bounds
on sigma_d, the loss and dS from it. Logits are float32 in an fp32 cache and bfloat16 otherwise
(8-bit codes would scale the softmax's ratios by up to ``exp(s / 2 tau)``).

Under torchrun every process passes the same batches; process ``r`` of ``W`` records batches
``r, r + W, ...`` into its own shards, and the first writes one index that orders examples as a
single process would have recorded them. A killed recording resumes from each process's last
complete shard when run again with the same batches (the teacher is not run for those).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import mmap
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..progress import progress
from .prediction_loss import TopKLogits

__all__ = ["CacheError", "CachedTeacherOutput", "TeacherCache", "record_teacher"]

FORMAT, VERSION = "eofd-teacher-cache", 1
INDEX_NAME = "index.json"
DEFAULT_SHARD_BYTES = 256 * 2**20
STORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}
# The float32 rounding share of the int8 bound (see the module docstring).
INT8_ROUNDING = 2.0**-22

# Side -> (model output attribute, mask key). Input keys starting "decoder_" belong to the
# decoder side, the others to the first side.
_SIDES = {"hidden": ("hidden_states", "attention_mask"),
          "encoder": ("encoder_hidden_states", "attention_mask"),
          "decoder": ("decoder_hidden_states", "decoder_attention_mask")}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
                       "F16": torch.float16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class CacheError(ValueError):
    """A teacher cache that is incomplete, corrupt, or does not fit what reads it; the message
    names the file and the mismatch."""


@dataclasses.dataclass
class CachedTeacherOutput:
    """What :class:`DistillationLoss` reads from a teacher's output, from a cache.

    ``hidden_states[t]`` (or ``encoder_hidden_states`` / ``decoder_hidden_states`` for an
    encoder-decoder teacher): ``(B, N, d)`` for each recorded layer ``t`` (HF indexing), zero at
    padding; None for the layers not recorded. ``logits``: ``(B, C)``, ``(B, N, C)`` or a
    :class:`TopKLogits`, when recorded.
    """

    hidden_states: tuple[torch.Tensor | None, ...] | None = None
    encoder_hidden_states: tuple[torch.Tensor | None, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor | None, ...] | None = None
    logits: torch.Tensor | TopKLogits | None = None

    def _map(self, fn) -> CachedTeacherOutput:
        def apply(value):
            if value is None:
                return None
            if isinstance(value, TopKLogits):
                return TopKLogits(fn(value.values), fn(value.indices))
            if isinstance(value, tuple):
                return tuple(apply(v) for v in value)
            return fn(value)

        return CachedTeacherOutput(*(apply(getattr(self, f.name))
                                     for f in dataclasses.fields(self)))

    def to(self, device, non_blocking: bool = False) -> CachedTeacherOutput:
        """On ``device`` (accelerate and the Trainer move batch entries through ``.to``)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CachedTeacherOutput:
        """Pinned copies (DataLoader's ``pin_memory=True`` calls this)."""
        return self._map(torch.Tensor.pin_memory)


# ---------------------------------------------------------------------------------------------
# Recording


def _config_hash(teacher) -> str | None:
    """sha256 of the teacher's config without its path and library version: two loads of the
    same model hash alike."""
    config = getattr(teacher, "config", None)
    if config is None:
        return None
    fields = {k: v for k, v in config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(value) -> list:
    """Every process's ``value`` in rank order (the value itself in one process)."""
    rank, world = _dist_rank_world()
    if world == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _logits_setting(logits) -> str | int | None:
    if logits is None or logits == "full":
        return logits
    if isinstance(logits, bool) or not isinstance(logits, int) or logits < 1:
        raise ValueError(f"logits: expected None, 'full' or a top-k count >= 1, got {logits!r}")
    return logits


def _side_of(key: str, sides: Sequence[str]) -> str:
    return sides[-1] if key.startswith("decoder_") else sides[0]


class _BatchRecord:
    """One batch's tensors as a shard stores them (on the CPU, in the cache dtype; int8 states
    stay in the teacher's dtype until their shard's ranges are known)."""

    def __init__(self, batch: dict, teacher_out, settings: dict, sides: Sequence[str]):
        self.tensors: dict[str, torch.Tensor] = {}
        first = next(v for v in batch.values() if torch.is_tensor(v))
        self.examples = first.shape[0]
        masks = {side: self._mask(batch, side, teacher_out) for side in sides}
        for key, value in batch.items():
            if key == "labels" or not torch.is_tensor(value):
                continue
            if value.dim() not in (1, 2) or value.shape[0] != self.examples:
                raise ValueError(f"batches: {key!r} has shape {tuple(value.shape)}; a cache "
                                 f"stores (B,) or (B, N) inputs of B={self.examples}")
            value = value.cpu()
            if value.dim() == 1:
                self.tensors[f"input.{key}"] = value
                continue
            mask = masks[_side_of(key, sides)]
            # Trailing padding dropped; collate pads to the longest row again (padding=True).
            lengths = _row_extents(mask) if mask.shape == value.shape else torch.full(
                (self.examples,), value.shape[1])
            self.tensors[f"input.{key}"] = torch.cat([row[:n] for row, n in
                                                      zip(value, lengths.tolist())])
            self.tensors[f"length.{key}"] = lengths
        for side in sides:
            attribute, _ = _SIDES[side]
            states = getattr(teacher_out, attribute, None)
            if states is None:
                raise ValueError(f"teacher: its output has no {attribute}; call it with "
                                 f"output_hidden_states=True and pass {side} layers only "
                                 f"for a model that has them")
            keep = masks[side].bool()
            self.tensors[f"valid.{side}"] = keep.sum(1)
            store = None if settings["dtype"] == "int8" else STORE_DTYPES[settings["dtype"]]
            for t in settings["layers"][side]:
                if not -len(states) <= t < len(states):
                    raise ValueError(f"layers: {side} layer {t} does not exist; the teacher "
                                     f"has {len(states)} hidden states (0 = embeddings)")
                self.tensors[f"{side}.{t}"] = states[t][keep].to("cpu", store)
        self._add_logits(teacher_out, masks[sides[-1]], settings)
        self.tokens = {side: int(masks[side].sum()) for side in sides}
        self.fingerprint = _fingerprint(batch)
        self.int8 = settings["dtype"] == "int8"
        self.state_names = {f"{side}.{t}" for side in sides for t in settings["layers"][side]}

    def _mask(self, batch, side, teacher_out) -> torch.Tensor:
        mask = batch.get(_SIDES[side][1])
        attribute = _SIDES[side][0]
        states = getattr(teacher_out, attribute, None)
        shape = states[0].shape[:2] if states is not None else None
        if mask is None:
            if shape is None:
                raise ValueError(f"teacher: its output has no {attribute}")
            return torch.ones(shape, dtype=torch.long)
        return mask.cpu()

    def _add_logits(self, teacher_out, mask, settings) -> None:
        setting = settings["logits"]
        if setting is None:
            return
        logits = getattr(teacher_out, "logits", None)
        if logits is None:
            raise ValueError("logits: the teacher's output has no logits (a model with a head "
                             "gives them; or pass logits=None)")
        per_token = logits.dim() == 3 and logits.shape[:2] == mask.shape
        rows = logits[mask.bool()] if per_token else logits
        if settings["logits_per"] is None:
            settings["logits_per"] = "token" if per_token else "example"
            settings["num_classes"] = logits.shape[-1]
        store = torch.float32 if settings["dtype"] == "fp32" else torch.bfloat16
        if setting != "full" and setting >= logits.shape[-1]:
            raise ValueError(f"logits: the top {setting} of the teacher's {logits.shape[-1]} "
                             f"classes is all of them; record logits='full'")
        if setting == "full":
            self.tensors["logits"] = rows.to(store).cpu()
        else:
            values, indices = rows.topk(min(setting, rows.shape[-1]), dim=-1)
            self.tensors["logits.values"] = values.to(store).cpu()
            self.tensors["logits.indices"] = indices.to(torch.int32).cpu()

    def stored_bytes(self) -> int:
        """Bytes in the shard (int8 states at one byte per value)."""
        return sum(t.numel() * (1 if self.int8 and name in self.state_names else
                                t.element_size()) for name, t in self.tensors.items())


def _fingerprint(batch: dict) -> int:
    """CRC-32 of a batch's input tensors: a resumed recording checks it is given the same
    batches as the shards it keeps."""
    crc = 0
    for key in sorted(k for k, v in batch.items() if torch.is_tensor(v) and k != "labels"):
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(batch[key].detach().cpu().contiguous().view(-1).view(torch.uint8)
                         .numpy().tobytes(), crc)
    return crc


def _row_extents(mask: torch.Tensor) -> torch.Tensor:
    """Per row, 1 + the last valid position (0 for an all-padding row)."""
    positions = torch.arange(1, mask.shape[1] + 1)
    return (mask.bool() * positions).amax(1)


def _encode_int8(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8, scale, offset) of per-dim affine codes; arithmetic in float64 so the only
    roundings are the stored scale's and offset's (covered by the bound's second term)."""
    if not bool(torch.isfinite(states).all()):
        raise ValueError("dtype: int8 needs finite teacher states; this batch has NaN/Inf "
                         "(use fp32 or bf16)")
    if states.shape[0] == 0:
        zeros = torch.zeros(states.shape[1], dtype=torch.float32)
        return states.to(torch.uint8), zeros, zeros
    x = states.double()
    lo, hi = x.amin(0), x.amax(0)
    scale = ((hi - lo) / 255).float()
    offset = lo.float()
    step = torch.where(scale > 0, scale.double(), torch.ones_like(lo))
    codes = ((x - offset.double()) / step).round().clamp_(0, 255).to(torch.uint8)
    return codes, scale, offset


def _decode_int8(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    return torch.addcmul(offset, codes.float(), scale).to(dtype)


def _int8_error(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """delta_d of one shard's codes (module docstring)."""
    top = (offset.double() + 255 * scale.double()).abs()
    return scale.double() / 2 + INT8_ROUNDING * torch.maximum(offset.double().abs(), top)


class _ShardWriter:
    """Buffers batch records of one process and writes them as shards of ``shard_bytes``."""

    def __init__(self, folder: Path, rank: int, world: int, settings: dict, shard_bytes: int):
        self.folder, self.rank, self.world = folder, rank, world
        self.settings, self.shard_bytes = settings, shard_bytes
        self.records: list[_BatchRecord] = []
        self.summaries: list[dict] = []
        self.next_local_batch = 0
        self.kept_fingerprints: list[int] = []  # of the batches in the shards kept on resume

    def path(self, number: int) -> Path:
        return self.folder / f"shard-r{self.rank:03d}-{number:05d}.safetensors"

    def resume(self) -> int:
        """Keep this process's complete shards (in order) and remove the rest; returns the
        number of its batches they hold."""
        number = 0
        while self.path(number).exists():
            path = self.path(number)
            try:
                summary = _summarize_shard(path)
            except CacheError:
                break  # torn by a kill (or damaged): recorded again from here
            recorded = {k: summary["settings"][k] for k in _RESUME_KEYS}
            wanted = {k: self.settings[k] for k in _RESUME_KEYS}
            if recorded != wanted:
                raise CacheError(f"{path}: recorded with other settings "
                                 f"({_difference(recorded, wanted)}); record into a new folder "
                                 f"or remove this one")
            self.summaries.append(summary)
            self.next_local_batch += summary["batches"]
            self.kept_fingerprints += _Shard(path).tensor("batch_crc32").tolist()
            number += 1
        for stale in self.folder.glob(f"shard-r{self.rank:03d}-*.safetensors*"):
            if stale.name.endswith(".tmp") or int(stale.name.split("-")[2][:5]) >= number:
                stale.unlink()
        return self.next_local_batch

    def add(self, record: _BatchRecord) -> None:
        self.records.append(record)
        if sum(r.stored_bytes() for r in self.records) >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        from safetensors.torch import save

        names = self.records[0].tensors
        tensors = {name: torch.cat([r.tensors[name] for r in self.records]) for name in names}
        tensors["batch_sizes"] = torch.tensor([r.examples for r in self.records])
        tensors["batch_crc32"] = torch.tensor([r.fingerprint for r in self.records])
        if self.settings["dtype"] == "int8":
            for side, layers in self.settings["layers"].items():
                for t in layers:
                    codes, scale, offset = _encode_int8(tensors[f"{side}.{t}"])
                    tensors[f"{side}.{t}"] = codes
                    tensors[f"{side}.{t}.scale"], tensors[f"{side}.{t}.offset"] = scale, offset
        meta = {"format": FORMAT, "version": VERSION, "settings": self.settings,
                "rank": self.rank, "world_size": self.world,
                "first_local_batch": self.next_local_batch, "batches": len(self.records)}
        blob = save({k: v.contiguous() for k, v in tensors.items()},
                    metadata={"eofd": json.dumps(meta)})
        path = self.path(len(self.summaries))
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # under its final name only when whole
        self.summaries.append(_summarize_shard(path))
        self.next_local_batch += len(self.records)
        self.records = []


# Settings a resumed recording must share with the shards already written.
_RESUME_KEYS = ("teacher", "config_sha256", "layers", "dtype", "logits", "world_size")
# What reading a cache takes from its index (_write_index writes them all).
_INDEX_KEYS = ("teacher", "config_sha256", "seq2seq", "pad_token_id", "layers", "dtype",
               "logits", "world_size", "widths", "num_hidden_states", "compute_dtype",
               "logits_per", "shards")


def _difference(recorded: dict, wanted: dict) -> str:
    return ", ".join(f"{k}: {recorded[k]!r} there, {wanted[k]!r} now"
                     for k in recorded if recorded[k] != wanted[k])


def _announce_size(record: _BatchRecord, batches, sides, print_fn, folder: Path,
                   settings: dict) -> None:
    """Print the cache's size before its first shard is written: exact when the batches are a
    list or tuple (every process holds them all; their masks are summed), else estimated from
    the first batch."""
    per_token = record.stored_bytes() / max(sum(record.tokens.values()), 1)
    widths = ", ".join(f"{s} {t}: d={w}" for s, layers in settings["widths"].items()
                       for t, w in layers.items())
    if isinstance(batches, (list, tuple)):
        amount = _size(per_token * sum(_mask_sum(b, s) for b in batches for s in sides))
    elif hasattr(batches, "__len__"):
        amount = "~" + _size(record.stored_bytes() * len(batches))
    else:
        amount = _size(record.stored_bytes()) + " per batch"
    print_fn(f"teacher cache: {per_token:,.0f} bytes per token ({settings['dtype']}; "
             f"{widths}); {amount} -> {folder}")


def _size(nbytes: float) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(max(nbytes, 1), 1024)), len(units) - 1)
    return f"{nbytes / 1024**power:.1f} {units[power]}"


def _mask_sum(batch: dict, side: str) -> int:
    mask = batch.get(_SIDES[side][1])
    if mask is not None:
        return int(mask.sum())
    key = "decoder_input_ids" if side == "decoder" else "input_ids"
    return batch[key].numel()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def record_teacher(teacher: torch.nn.Module, batches: Iterable[dict], *, layers: Sequence[int],
                   out: str | Path, dtype: str = "fp32", logits: str | int | None = None,
                   decoder_layers: Sequence[int] | None = None, name: str | None = None,
                   shard_bytes: int = DEFAULT_SHARD_BYTES, print_fn=print) -> TeacherCache:
    """Run ``teacher`` once over ``batches`` and record what distillation reads into ``out``.

    teacher: a Hugging Face model (called with ``output_hidden_states=True``, in eval mode,
        under inference mode, on its own device).
    batches: dicts of the model's keyword inputs (``input_ids``, ``attention_mask``, ...;
        encoder-decoder batches with ``decoder_input_ids`` / ``decoder_attention_mask``);
        ``labels`` is not recorded. To resume a killed recording, pass the same batches again.
    layers: hidden-state indices to keep (HF indexing, 0 = embeddings); of the encoder for an
        encoder-decoder teacher, whose decoder layers are ``decoder_layers``.
    dtype: ``"fp32"``, ``"bf16"`` or ``"int8"`` (per-layer, per-dim affine codes; bound in the
        module docstring). logits: None, ``"full"`` or an int k (the top k per row).
    name: the teacher's name in the index (default: its config's ``_name_or_path``).
    shard_bytes: a shard is written once its batches hold this much.
    Returns the :class:`TeacherCache` of ``out``.
    """
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    seq2seq = getattr(getattr(teacher, "config", None), "is_encoder_decoder", False)
    if seq2seq and decoder_layers is None:
        raise ValueError("decoder_layers: required for an encoder-decoder teacher")
    if not seq2seq and decoder_layers is not None:
        raise ValueError("decoder_layers: only for an encoder-decoder teacher")
    sides = ("encoder", "decoder") if seq2seq else ("hidden",)
    requested = (layers, decoder_layers) if seq2seq else (layers,)
    rank, world = _dist_rank_world()
    config = getattr(teacher, "config", None)
    settings = {
        "teacher": name or getattr(config, "_name_or_path", None) or type(teacher).__name__,
        "teacher_class": type(teacher).__name__, "config_sha256": _config_hash(teacher),
        "seq2seq": bool(seq2seq), "pad_token_id": getattr(config, "pad_token_id", None) or 0,
        "layers": {side: sorted({int(t) for t in ts}) for side, ts in zip(sides, requested)},
        "dtype": dtype, "logits": _logits_setting(logits), "world_size": world,
        # Filled from the first batch: what the teacher gives.
        "widths": None, "num_hidden_states": None, "compute_dtype": None,
        "logits_per": None, "num_classes": None,
    }
    if any(not ts for ts in settings["layers"].values()):
        raise ValueError(f"layers: expected at least one layer per side, got "
                         f"{settings['layers']}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(folder, rank, world, settings, shard_bytes)
    done = writer.resume()
    if done and rank == 0:
        print_fn(f"teacher cache: resuming {folder}: {done} batches of this process already in "
                 f"complete shards")
    if done and writer.summaries:
        settings.update({k: writer.summaries[0]["settings"][k] for k in (
            "widths", "num_hidden_states", "compute_dtype", "logits_per", "num_classes")})
    total = len(batches) if hasattr(batches, "__len__") else None
    mine = None if total is None else len(range(rank, total, world))
    device = next(teacher.parameters()).device
    # The first process speaks for the run; a resumed one has already said it.
    announced = rank != 0 or bool(done)
    steps = progress(enumerate(batches), total, "recording teacher") if rank == 0 else \
        enumerate(batches)
    with torch.inference_mode(), _eval_mode(teacher):
        for i, batch in steps:
            if i % world != rank:
                continue  # another process's batch
            if i // world < done:  # in a complete shard already
                if _fingerprint(batch) != writer.kept_fingerprints[i // world]:
                    raise CacheError(f"{folder}: batch {i} differs from the one its shards "
                                     f"recorded; resuming needs the same batches (or record "
                                     f"into a new folder)")
                continue
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
                      if k != "labels"}
            teacher_out = teacher(**inputs, output_hidden_states=True)
            if settings["widths"] is None:
                _describe_teacher(settings, teacher_out, sides)
            record = _BatchRecord(batch, teacher_out, settings, sides)
            if not announced:
                _announce_size(record, batches, sides, print_fn, folder, settings)
                announced = True
            writer.add(record)
    writer.flush()
    if mine is not None and writer.next_local_batch != mine:
        raise CacheError(f"batches: {writer.next_local_batch} recorded by process {rank}, "
                         f"expected {mine}")
    summaries = [s for rank_summaries in _all_gather(writer.summaries) for s in rank_summaries]
    if rank == 0:
        _write_index(folder, summaries, world)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the index exists before any process opens the cache
    return TeacherCache(folder)


def _describe_teacher(settings: dict, teacher_out, sides) -> None:
    widths, counts = {}, {}
    for side in sides:
        states = getattr(teacher_out, _SIDES[side][0], None)
        if states is None:
            continue  # _BatchRecord raises, naming the side
        counts[side] = len(states)
        widths[side] = {str(t): states[t].shape[-1] for t in settings["layers"][side]
                        if -len(states) <= t < len(states)}
        settings["compute_dtype"] = str(states[0].dtype).removeprefix("torch.")
    settings["widths"], settings["num_hidden_states"] = widths, counts


def _write_index(folder: Path, summaries: list[dict], world: int) -> None:
    if not summaries:
        raise CacheError(f"{folder}: no batches were recorded")
    settings = summaries[0]["settings"]
    index = {"format": FORMAT, "version": VERSION, **settings,
             "examples": sum(s["examples"] for s in summaries),
             "tokens": {side: sum(s["tokens"][side] for s in summaries)
                        for side in settings["layers"]},
             "batches": sum(s["batches"] for s in summaries), "world_size": world}
    if settings["dtype"] == "int8":
        index["int8_max_abs_error"] = {
            side: {str(t): torch.stack([torch.tensor(s["int8_error"][f"{side}.{t}"])
                                        for s in summaries]).amax(0).tolist() for t in layers}
            for side, layers in settings["layers"].items()}
    index["shards"] = [{k: s[k] for k in ("file", "bytes", "crc32", "rank",
                                          "first_local_batch", "batches", "examples",
                                          "tokens")} for s in summaries]
    tmp = folder / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, folder / INDEX_NAME)


# ---------------------------------------------------------------------------------------------
# Reading


class _Shard:
    """A memory-mapped shard: tensors are zero-copy views of the file (copy-on-write pages,
    never written, so torch sees a writable buffer)."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CacheError(f"{path}: {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                raise CacheError(f"{path}: header of {header_len} bytes in a file of {size} "
                                 f"(truncated or not a safetensors file)")
            try:
                self.header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise CacheError(f"{path}: unreadable safetensors header ({error})") from None
        self.data_start = 8 + header_len
        entries = {k: v for k, v in self.header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in entries.values()), default=0)
        if self.data_start + end != size:
            raise CacheError(f"{path}: {size} bytes, its header describes "
                             f"{self.data_start + end} (truncated or damaged)")
        try:
            self.meta = json.loads(self.header["__metadata__"]["eofd"])
        except (KeyError, TypeError, json.JSONDecodeError):
            raise CacheError(f"{path}: not a teacher-cache shard (no eofd metadata)") from None
        self.entries = entries
        self._map = None

    def __getstate__(self):
        return {**self.__dict__, "_map": None}  # mmaps do not pickle: reopened per process

    def tensor(self, name: str) -> torch.Tensor:
        try:
            entry = self.entries[name]
        except KeyError:
            raise CacheError(f"{self.path}: no tensor {name!r}") from None
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        start, stop = entry["data_offsets"]
        count = (stop - start) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            return torch.empty(entry["shape"], dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count,
                                offset=self.data_start + start)
        return flat.view(entry["shape"])


def _summarize_shard(path: Path) -> dict:
    """The index entry of a shard, after checking that it is whole and self-consistent."""
    shard = _Shard(path)
    meta = shard.meta
    settings = meta["settings"]
    examples = int(shard.tensor("batch_sizes").sum())
    tokens = {}
    for side, layers in settings["layers"].items():
        valid = shard.tensor(f"valid.{side}")
        tokens[side] = int(valid.sum())
        if valid.shape[0] != examples:
            raise CacheError(f"{path}: valid.{side} has {valid.shape[0]} examples, "
                             f"batch_sizes {examples}")
        for t in layers:
            shape = list(shard.entries.get(f"{side}.{t}", {}).get("shape", []))
            want = [tokens[side], settings["widths"][side][str(t)]]
            if shape != want:
                raise CacheError(f"{path}: {side}.{t} has shape {shape}, expected {want}")
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read())
    summary = {"file": path.name, "bytes": path.stat().st_size, "crc32": crc,
               "examples": examples, "tokens": tokens, "settings": settings,
               **{k: meta[k] for k in ("rank", "first_local_batch", "batches")}}
    if settings["dtype"] == "int8":
        summary["int8_error"] = {
            f"{side}.{t}": _int8_error(shard.tensor(f"{side}.{t}.scale"),
                                       shard.tensor(f"{side}.{t}.offset")).tolist()
            for side, layers in settings["layers"].items() for t in layers}
    return summary


class TeacherCache(torch.utils.data.Dataset):
    """A recorded teacher (:func:`record_teacher`) as a map-style Dataset: item ``i`` is the
    ``i``-th recorded example (in recording order), a dict of its input rows and ``teacher``
    (its recorded states); :meth:`collate` pads items into a batch. Works with any sampler
    (``DistributedSampler`` included) and DataLoader workers.

    Opening checks every shard's size against the index and its header; ``verify=True`` also
    checks each shard's CRC-32 (reads the whole cache). Errors are :class:`CacheError`.
    """

    def __init__(self, path: str | Path, *, verify: bool = False):
        self.path = Path(path)
        index_path = self.path / INDEX_NAME
        if not index_path.exists():
            unfinished = any(self.path.glob("shard-*.safetensors"))
            raise CacheError(f"{index_path}: missing; " + (
                "the recording did not finish (run it again with the same batches to resume)"
                if unfinished else "not a teacher cache"))
        try:
            self.index = json.loads(index_path.read_text())
        except json.JSONDecodeError as error:
            raise CacheError(f"{index_path}: unreadable ({error})") from None
        if not isinstance(self.index, dict):
            raise CacheError(f"{index_path}: expected a JSON object, got "
                             f"{type(self.index).__name__}")
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise CacheError(f"{index_path}: format {self.index.get('format')!r} version "
                             f"{self.index.get('version')!r}, expected {FORMAT!r} {VERSION}")
        missing = [key for key in _INDEX_KEYS if key not in self.index]
        if missing:
            raise CacheError(f"{index_path}: no {', '.join(missing)} (damaged?)")
        self.sides = tuple(self.index["layers"])
        self.shards: list[_Shard] = []
        for entry in self.index["shards"]:
            shard_path = self.path / entry["file"]
            if not shard_path.exists():
                raise CacheError(f"{shard_path}: missing (listed in {index_path})")
            size = shard_path.stat().st_size
            if size != entry["bytes"]:
                raise CacheError(f"{shard_path}: {size} bytes, {index_path} says "
                                 f"{entry['bytes']} (truncated?)")
            if verify:
                with open(shard_path, "rb") as f:
                    crc = zlib.crc32(f.read())
                if crc != entry["crc32"]:
                    raise CacheError(f"{shard_path}: CRC-32 {crc:#010x}, {index_path} says "
                                     f"{entry['crc32']:#010x} (damaged)")
            self.shards.append(_Shard(shard_path))
        self._build_table()

    def _build_table(self) -> None:
        """Per example: (shard, example in shard); per shard: row / token offsets."""
        world = self.index["world_size"]
        batches = []  # (global batch index, shard number, first example in shard, size)
        self._offsets = []
        for number, (entry, shard) in enumerate(zip(self.index["shards"], self.shards)):
            sizes = shard.tensor("batch_sizes").tolist()
            starts = [0]
            for n in sizes:
                starts.append(starts[-1] + n)
            for j, n in enumerate(sizes):
                batch = entry["rank"] + world * (entry["first_local_batch"] + j)
                batches.append((batch, number, starts[j], n))
            self._offsets.append({name: _starts(shard.tensor(name)) for name in shard.entries
                                  if name.startswith(("length.", "valid."))})
        batches.sort()
        self._examples = [(number, first + k) for _, number, first, n in batches
                          for k in range(n)]

    # What the objective sees -----------------------------------------------------------------
    @property
    def layers(self) -> dict[str, list[int]]:
        """Recorded layers per side (``hidden``, or ``encoder`` / ``decoder``)."""
        return self.index["layers"]

    @property
    def dtype(self) -> str:
        return self.index["dtype"]

    def max_abs_error(self, side: str, layer: int) -> torch.Tensor:
        """``(d,)`` float64: the largest ``delta_d`` of an int8 cache's codes over its shards
        (0 for fp32; for bf16, values are the states rounded to bfloat16)."""
        if self.dtype != "int8":
            return torch.zeros(self.index["widths"][side][str(layer)], dtype=torch.float64)
        return torch.tensor(self.index["int8_max_abs_error"][side][str(layer)],
                            dtype=torch.float64)

    def check_teacher(self, teacher: torch.nn.Module) -> None:
        """Raise a :class:`CacheError` unless the cache was recorded from a model with
        ``teacher``'s config (its hash; the model class and head may differ)."""
        recorded, here = self.index["config_sha256"], _config_hash(teacher)
        if recorded != here:
            raise CacheError(f"{self.path / INDEX_NAME}: recorded from "
                             f"{self.index['teacher']!r} (config sha256 {str(recorded)[:12]}), "
                             f"not from this teacher (config sha256 {str(here)[:12]})")

    def check(self, objective) -> None:
        """Raise a :class:`CacheError` unless ``objective`` (a :class:`DistillationLoss`) can
        train from this cache: its teacher layers recorded, its projections' output widths the
        recorded widths, logits recorded when it uses them."""
        index_path = self.path / INDEX_NAME
        maps = [("decoder" if self.index["seq2seq"] and tag == "dec" else self.sides[0],
                 pairs, objective._projections[tag])
                for tag, pairs in (("enc", objective.layer_map),
                                   ("dec", objective.decoder_layer_map)) if pairs is not None]
        for side, pairs, projection in maps:
            if side not in self.index["layers"]:
                raise CacheError(f"{index_path}: no {side} layers recorded, the objective maps "
                                 f"{list(pairs)}")
            recorded = self.index["layers"][side]
            missing = sorted({t for _, t in pairs} - set(recorded))
            if missing:
                raise CacheError(f"{index_path}: the objective's layer map needs {side} teacher "
                                 f"layers {missing}, the cache recorded {recorded}")
            if projection is not None:
                for (s, t), linear in zip(pairs, projection.layer_maps()):
                    width = self.index["widths"][side][str(t)]
                    if linear.out_features != width:
                        raise CacheError(f"{index_path}: {side} layer {t} is d={width}, the "
                                         f"objective projects student layer {s} to "
                                         f"d={linear.out_features}")
        if objective.use_logits and self.index["logits"] is None:
            raise CacheError(f"{index_path}: no logits recorded, the objective uses them "
                             f"(use_logits=False, or record with logits=)")

    # Dataset -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, i: int) -> dict:
        number, k = self._examples[i]
        shard, offsets = self.shards[number], self._offsets[number]
        item, teacher = {}, {}
        for name in shard.entries:
            if name.startswith("input."):
                key = name[len("input."):]
                starts = offsets.get(f"length.{key}")
                values = shard.tensor(name)
                item[key] = values[k] if starts is None else values[starts[k]:starts[k + 1]]
        for side, layers in self.index["layers"].items():
            a, b = offsets[f"valid.{side}"][k:k + 2]
            for t in layers:
                states = shard.tensor(f"{side}.{t}")[a:b]
                if self.dtype == "int8":
                    states = _decode_int8(states, shard.tensor(f"{side}.{t}.scale"),
                                          shard.tensor(f"{side}.{t}.offset"),
                                          getattr(torch, self.index["compute_dtype"]))
                teacher[(side, t)] = states
        if self.index["logits"] is not None:
            if self.index["logits_per"] == "token":
                a, b = offsets[f"valid.{self.sides[-1]}"][k:k + 2]
            else:
                a, b = k, k + 1
            if self.index["logits"] == "full":
                teacher["logits"] = shard.tensor("logits")[a:b]
            else:
                teacher["logits"] = TopKLogits(shard.tensor("logits.values")[a:b],
                                               shard.tensor("logits.indices")[a:b])
        item["teacher"] = teacher
        return item

    def collate(self, items: Sequence[dict]) -> dict:
        """Pad ``items`` into a batch: each input key to its side's longest row (input ids with
        the teacher's pad id, others with 0), and ``teacher``: a :class:`CachedTeacherOutput`
        whose states are zero at padding."""
        batch = {}
        for key in items[0]:
            if key == "teacher":
                continue
            rows = [item[key] for item in items]
            if rows[0].dim() == 0:
                batch[key] = torch.stack(rows)
                continue
            pad = self.index["pad_token_id"] if key.endswith("input_ids") else 0
            out = rows[0].new_full((len(rows), max(len(r) for r in rows)), pad)
            for row, values in zip(out, rows):
                row[:len(values)] = values
            batch[key] = out
        sides = {}
        for side in self.sides:
            attribute, mask_key = _SIDES[side]
            keep = self._side_mask(batch, side, mask_key, items)
            states = [None] * self.index["num_hidden_states"][side]
            for t in self.index["layers"][side]:
                states[t] = _scatter(keep, [item["teacher"][(side, t)] for item in items])
            sides[attribute] = tuple(states)
        logits = None
        if self.index["logits"] is not None:
            parts = [item["teacher"]["logits"] for item in items]
            if self.index["logits_per"] == "token":
                keep = self._side_mask(batch, self.sides[-1], _SIDES[self.sides[-1]][1], items)
                logits = (TopKLogits(_scatter(keep, [p.values for p in parts]),
                                     _scatter(keep, [p.indices for p in parts]).long())
                          if self.index["logits"] != "full" else _scatter(keep, parts))
            else:
                logits = (TopKLogits(torch.cat([p.values for p in parts]),
                                     torch.cat([p.indices for p in parts]).long())
                          if self.index["logits"] != "full" else torch.cat(parts))
        batch["teacher"] = CachedTeacherOutput(**sides, logits=logits)
        return batch

    def _side_mask(self, batch, side, mask_key, items) -> torch.Tensor:
        if mask_key in batch:
            return batch[mask_key].bool()
        key = "decoder_input_ids" if side == "decoder" else "input_ids"
        lengths = {len(item[key]) for item in items}
        if len(lengths) > 1:
            raise CacheError(f"{self.path / INDEX_NAME}: items of {sorted(lengths)} {side} "
                             f"tokens and no {mask_key} recorded: cannot pad them")
        return torch.ones(batch[key].shape, dtype=torch.bool)

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.path)!r}: {len(self)} examples, "
                f"layers {self.layers}, {self.dtype})")


def _starts(lengths: torch.Tensor) -> list[int]:
    """Prefix offsets ``[0, l0, l0 + l1, ...]`` as Python ints (cheap to index per item)."""
    return [0, *torch.cumsum(lengths, 0).tolist()]


def _scatter(keep: torch.Tensor, rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B, N, ...)`` zeros with the concatenated per-item ``rows`` at the valid positions."""
    values = torch.cat(list(rows))
    valid = int(keep.sum())  # on the host: collate runs in data loading
    if values.shape[0] != valid:
        raise CacheError(f"the batch's masks select {valid} tokens, its items hold "
                         f"{values.shape[0]} (a damaged cache?)")
    out = values.new_zeros((*keep.shape, *values.shape[1:]))
    # masked_scatter_ fills the valid positions in row-major order, as the rows were cut;
    # unlike out[keep] = values it needs no index list of the positions.
    return out.masked_scatter_(keep.view(*keep.shape, *(1,) * (values.dim() - 1)), values)
