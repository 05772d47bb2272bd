"""The I/O every export shares: read an lwq checkpoint's plan, shapes and tensors (verified against
its manifest), and publish the new folder atomically.

Outputs follow the one rule of ``lwq.fileio`` (kind ``export``, marker ``lwq_export.json``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lwq.errors import BadInput
from lwq.formats.folder import MAX_SHARD_BYTES, TensorRef, model_from_config
from lwq.formats.folder import write_shards as folder_shards
from lwq.spec import LayerSpec



@dataclass(frozen=True)
class Source:
    """An lwq checkpoint opened for export: ``shapes`` of every block linear (out, in) in model order,
    ``conv1d`` the ones stored transposed (GPT-2), ``groups`` the fused shards (full names)."""

    path: Path
    config: dict[str, Any]
    plan: dict[str, LayerSpec]
    shapes: dict[str, tuple[int, int]]
    conv1d: frozenset[str]
    groups: tuple[tuple[str, ...], ...]
    files: tuple[Path, ...]

    def tensors(self) -> "Tensors":
        return Tensors(self.files)


class Tensors:
    """Lazy access to a checkpoint's tensors, grouped by module (``layer(name) -> {leaf: tensor}``)."""

    def __init__(self, files: tuple[Path, ...]) -> None:
        from safetensors import safe_open

        self._handles = [safe_open(str(f), "pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}
        self._by_module: dict[str, list[str]] = {}
        for key in self._where:
            self._by_module.setdefault(key.rpartition(".")[0], []).append(key)

    def layer(self, name: str) -> dict[str, torch.Tensor]:
        t = {k.rpartition(".")[2]: self._where[k].get_tensor(k) for k in self._by_module.get(name, [])}
        if not t:
            raise BadInput(f"the checkpoint has no tensors for layer {name}")
        return t

    def others(self, layers: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor outside ``layers`` (embeddings, norms, head), as stored."""
        for key, h in self._where.items():
            if key.rpartition(".")[0] not in layers:
                yield key, h.get_tensor(key)


def open_source(source: str) -> Source:
    """Read and verify the lwq checkpoint ``source`` (refusing folders that are not one)."""
    from lwq.formats.checkpoint import read_plan, verify_manifest
    from lwq.models.arch import arch_for, get_blocks, linear_shape
    from lwq.models.load import is_lwq_checkpoint, read_config

    src = Path(source).expanduser()
    if src.is_dir() and (src / "config.json").is_file() and not is_lwq_checkpoint(src):
        raise BadInput(f"{source} is not an lwq checkpoint (no lwq quantization_config and manifest); "
                       "export reads what lwq quantize wrote")
    config = read_config(src)
    plan = read_plan(config)
    files = verify_manifest(src)
    model = model_from_config(config, meta=True)
    arch = arch_for(model)
    nblocks = len(get_blocks(model, arch))
    names = [f"{arch.blocks}.{i}.{lin}" for i in range(nblocks) for lin in arch.linears]
    unknown = sorted(set(plan) - set(names))
    if unknown:
        raise BadInput(f"the checkpoint plans {len(unknown)} layer(s) that are not block linears, e.g. {unknown[0]}")
    modules = {n: model.get_submodule(n) for n in names}
    groups = tuple(tuple(f"{arch.blocks}.{i}.{lin}" for lin in g)
                   for i in range(nblocks) for g in arch.groups if len(g) > 1)
    return Source(src, config, plan, {n: linear_shape(m) for n, m in modules.items()},
                  frozenset(n for n, m in modules.items() if type(m).__name__ == "Conv1D"), groups, tuple(files))


def publish(out: Path, write: Callable[[Path], None], marker: dict[str, Any]) -> list[str]:
    """Build the export beside ``out`` and rename it into place under the output lock (``lwq.fileio``)."""
    from lwq.fileio import OutputLock, publish as publish_folder

    with OutputLock(out):
        return publish_folder(out, write, "export", marker)


def write_shards(state: dict[str, torch.Tensor], folder: Path, max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """``state`` written as the checkpoint writes its shards (``lwq.formats.folder``), keys sorted."""
    return folder_shards({k: TensorRef.of(state[k].contiguous()) for k in sorted(state)}, folder, max_bytes)


def half_config(config: dict[str, Any], notes: list[str], why: str) -> dict[str, Any]:
    """``config`` (without quantization_config) with dtype float16 when it was float32 or unset."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    if (out.get("dtype") or out.get("torch_dtype")) in (None, "float32"):
        out["dtype"] = "float16"
        out.pop("torch_dtype", None)
        notes.append(f"config dtype set to float16 ({why})")
    return out
