"""The I/O every export shares: read an lwq checkpoint's plan, shapes and tensors (verified against
its manifest), and publish the new folder atomically.

Outputs follow the one rule of ``lwq.outputs`` (kind ``export``, marker ``lwq_export.json``).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lwq.errors import BadInput
from lwq.spec import LayerSpec

MAX_SHARD_BYTES = 2 * 1024**3
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


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


def meta_model(config: dict[str, Any]) -> Any:
    """The transformers model of ``config`` on the meta device (shapes and module names, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = d.pop("model_type", None)
    if not model_type:
        raise BadInput("checkpoint config.json has no model_type")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **d))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"cannot build a {model_type!r} model from the checkpoint config: "
                       f"{str(exc).splitlines()[0][:200]}") from None


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
    model = meta_model(config)
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
    """Build the export beside ``out`` and rename it into place under the output lock (``lwq.outputs``)."""
    from lwq.outputs import OutputLock, publish as publish_folder

    with OutputLock(out):
        return publish_folder(out, write, "export", marker)


def copy_side_files(src: Path, folder: Path) -> None:
    """Tokenizer and generation files of the source, as they are."""
    for fname in COPIED_FILES:
        if (src / fname).is_file():
            shutil.copyfile(src / fname, folder / fname)


def write_shards(state: dict[str, torch.Tensor], folder: Path, max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json`` past ``max_bytes``."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        n = state[key].numel() * state[key].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key].contiguous()
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def half_config(config: dict[str, Any], notes: list[str], why: str) -> dict[str, Any]:
    """``config`` (without quantization_config) with dtype float16 when it was float32 or unset."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    if (out.get("dtype") or out.get("torch_dtype")) in (None, "float32"):
        out["dtype"] = "float16"
        out.pop("torch_dtype", None)
        notes.append(f"config dtype set to float16 ({why})")
    return out
