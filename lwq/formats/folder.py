"""A Hugging Face model folder's files, as every writer of lwq writes them: safetensors shards
streamed one tensor at a time (plus the index past one shard), the tokenizer and generation files
copied from the source, checksums, and the transformers model rebuilt from a ``config.json``.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lwq.errors import BadInput, LwqError, one_line
from lwq.models.load import CONFIG_ERRORS

INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
SIDE_FILES = TOKENIZER_FILES + ("generation_config.json",)


@dataclass(frozen=True)
class TensorRef:
    """A tensor to write: its dtype and shape now, its data only when its turn comes (``read``), so a
    checkpoint can be streamed from files without holding it in memory."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorRef":
        return cls(t.dtype, tuple(t.shape), lambda: t)


# safetensors' dtype names, in the order its writer sorts them (descending alignment, then name)
_ST_DTYPES = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32",
              torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.uint16: "U16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3",
              torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_ST_RANK = {dt: i for i, dt in enumerate(_ST_DTYPES)}


def write_safetensors(path: str | Path, tensors: dict[str, TensorRef], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time (the bytes ``safetensors.torch.save_file``
    writes for the same tensors: same order, header and padding); memory stays one tensor."""
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
        raise LwqError("writing safetensors needs a little-endian machine")
    bad = sorted({str(r.dtype) for r in tensors.values() if r.dtype not in _ST_RANK})
    if bad:
        raise LwqError(f"cannot write tensors of dtype {bad[0]} to safetensors")
    order = sorted(tensors, key=lambda k: (_ST_RANK[tensors[k].dtype], k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in order:
        ref = tensors[k]
        header[k] = {"dtype": _ST_DTYPES[ref.dtype], "shape": list(ref.shape),
                     "data_offsets": [offset, offset + ref.nbytes]}
        offset += ref.nbytes
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for k in order:
            ref = tensors[k]
            t = ref.read().detach().to("cpu").contiguous()
            if t.dtype != ref.dtype or tuple(t.shape) != ref.shape:
                raise LwqError(f"tensor {k} changed: {t.dtype} {tuple(t.shape)}, expected {ref.dtype} {ref.shape}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


def split_shards(state: dict[str, TensorRef], max_bytes: int) -> list[dict[str, TensorRef]]:
    """``state`` cut in order into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[dict[str, TensorRef]] = [{}]
    size = 0
    for key, ref in state.items():
        n = ref.nbytes
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = ref
        size += n
    return shards


def write_shards(state: dict[str, TensorRef], folder: Path, max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json`` past
    ``max_bytes``, in the order of ``state``; returns the shard names."""
    shards = split_shards(state, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        write_safetensors(folder / name, shard, metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(r.nbytes for s in shards for r in s.values())
        write_json(folder / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (inside a folder that is published whole: no rename of its own)."""
    path.write_text(json.dumps(obj, indent=2) + "\n")


def copy_side_files(src: Path, folder: Path, names: tuple[str, ...] = SIDE_FILES) -> None:
    """The tokenizer and generation files of the source folder ``src``, as they are."""
    for fname in names:
        if (src / fname).is_file():
            shutil.copyfile(src / fname, folder / fname)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def model_from_config(config: dict[str, Any], dtype: torch.dtype | None = None, meta: bool = False) -> nn.Module:
    """The transformers model of a ``config.json`` (its ``quantization_config`` left out): on the
    ``meta`` device (names and shapes, no memory), or with uninitialised weights in ``dtype`` (no
    random init cost; tied weights tied)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    d = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = d.pop("model_type", None)
    if not model_type:
        raise BadInput("checkpoint config.json has no model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **d)
        if meta:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(cfg)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    except (ValueError, KeyError, TypeError, *CONFIG_ERRORS) as exc:
        raise BadInput(f"cannot build a {model_type!r} model from config.json (edited?): {one_line(exc)}") from None
    model.tie_weights()  # no_init_weights skips init_weights, which is where transformers ties them
    return model
