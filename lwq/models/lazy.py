"""Lazy loading: a model whose decoder blocks stay on the ``meta`` device until their turn.

``load_lazy`` builds the model from its config on ``meta`` (no memory), then materialises only the
modules outside the block list (embeddings, rotary tables, final norm, head) from the safetensors
files. ``LazyBlocks.acquire(model, i, device)`` reads block ``i``'s tensors straight onto the device
and ``release`` sends the block back to ``meta`` (and returns the freed pages to the OS), so resident memory is
about one block plus the
embeddings and the activations, whatever the depth. Non-persistent buffers (rotary ``inv_freq``)
are recomputed with the model's own ``_init_weights``, as transformers does when it loads on meta.
"""
from __future__ import annotations

import ctypes
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lwq.errors import LwqError
from lwq.models.arch import ArchSpec, arch_for, get_blocks
from lwq.models.load import (CONFIG_ERRORS, check_local_model, invalid_config, looks_local, resolve_device,
                             resolve_dtype, wrong_shape)


class LazyUnsupported(LwqError):
    """This model cannot be loaded lazily (the message says why); load it eagerly instead."""


@dataclass(frozen=True)
class SafetensorsIndex:
    """Which ``*.safetensors`` file of ``root`` holds each tensor name."""

    root: Path
    files: dict[str, str]

    def read(self, keys: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The tensors called ``keys`` (all must exist), read file by file."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for fname, names in by_file.items():
            with safe_open(str(self.root / fname), framework="pt", device=str(device)) as f:
                for k in names:
                    out[k] = f.get_tensor(k)
        return out


def checkpoint_index(path: str | Path) -> SafetensorsIndex:
    """Index of a model folder's safetensors weights (sharded through ``*.index.json`` or not)."""
    from safetensors import safe_open

    root = Path(path).expanduser()
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise LazyUnsupported(f"cannot read {index}: {exc}") from None
        return SafetensorsIndex(root, dict(weight_map))
    files: dict[str, str] = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for k in st.keys():
                files[k] = f.name
    return SafetensorsIndex(root, files)


def _file_key(name: str, index: SafetensorsIndex, base_prefix: str) -> str | None:
    """The checkpoint key of parameter ``name`` (some checkpoints omit the base model's prefix)."""
    if name in index.files:
        return name
    if base_prefix and name.startswith(base_prefix + ".") and name[len(base_prefix) + 1:] in index.files:
        return name[len(base_prefix) + 1:]
    return None


def materialize(model: nn.Module, index: SafetensorsIndex, device: torch.device | str, dtype: torch.dtype,
                keep: Callable[[str], bool]) -> None:
    """Replace every ``meta`` parameter/buffer of ``model`` whose full name passes ``keep`` by real
    tensors on ``device``: from the checkpoint, through a tie, or recomputed (non-persistent buffers).
    Raises ``LazyUnsupported`` for anything left on meta."""
    base = getattr(model, "base_model_prefix", "")
    modules = dict(model.named_modules())
    aliases: dict[int, list[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}  # what config.json makes each tensor, checked against the file
    for name, p in model.named_parameters(remove_duplicate=False):
        if keep(name) and p.is_meta:
            aliases.setdefault(id(p), []).append(name)
            shapes[name] = tuple(p.shape)
    # non-persistent buffers are recomputed, never read from the file (as transformers does)
    recomputed = {name for name, b in _non_persistent(model) if keep(name) and b.is_meta}
    meta_buffers = [(n, b) for n, b in model.named_buffers() if keep(n) and b.is_meta and n not in recomputed]
    shapes.update((n, tuple(b.shape)) for n, b in meta_buffers)
    np_owners = {name.rpartition(".")[0] for name in recomputed}
    for owner in sorted(np_owners):
        mod = modules[owner]
        mod.to_empty(device=device, recurse=False)
        model._init_weights(mod)  # recomputes rotary tables and the like
    wanted = {}
    for names in aliases.values():
        key = next((k for k in (_file_key(n, index, base) for n in names) if k is not None), None)
        if key is not None:
            wanted[key] = names
    for n, _ in meta_buffers:  # non-persistent ones are usually absent from the file
        key = _file_key(n, index, base)
        if key is not None:
            wanted[key] = [n]
    tensors = index.read(list(wanted), device)
    for key, names in wanted.items():
        t = tensors[key]
        if tuple(t.shape) != shapes[names[0]]:
            raise wrong_shape(key, f"in {index.root / index.files[key]}", t.shape, shapes[names[0]])
        if t.is_floating_point():
            t = t.to(dtype)
        param = nn.Parameter(t, requires_grad=False)  # one object for all tied names
        for n in names:
            owner, _, attr = n.rpartition(".")
            mod = modules[owner]
            if attr in mod._parameters:
                mod._parameters[attr] = param
            else:
                mod._buffers[attr] = t
    left = [n for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
            if keep(n) and t.is_meta]
    if left:
        raise LazyUnsupported(f"{left[0]} is not in the checkpoint under that name")


def _non_persistent(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for mname, mod in model.named_modules():
        for bname, buf in mod._buffers.items():
            if buf is not None and bname in mod._non_persistent_buffers_set:
                out.append((f"{mname}.{bname}" if mname else bname, buf))
    return out


@dataclass(frozen=True)
class LazyBlocks:
    """A ``BlockLoader`` (see ``lwq.calib.stats``) that reads each block from safetensors when needed."""

    index: SafetensorsIndex
    spec: ArchSpec
    dtype: torch.dtype

    def acquire(self, model: nn.Module, i: int, device: torch.device) -> nn.Module:
        prefix = f"{self.spec.blocks}.{i}."
        materialize(model, self.index, device, self.dtype, lambda n: n.startswith(prefix))
        return get_blocks(model, self.spec)[i]

    def release(self, model: nn.Module, i: int) -> None:
        get_blocks(model, self.spec)[i].to("meta")
        return_freed_memory()


def return_freed_memory() -> bool:
    """Ask glibc to hand freed heap memory back to the OS (``malloc_trim``). Without it, glibc's
    growing mmap threshold keeps each released block's pages in the heap and resident memory grows
    with depth. Returns False where there is no glibc (macOS, Windows, musl): nothing to do there."""
    if not sys.platform.startswith("linux"):
        return False
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def meta_model(name: str, dtype: str = "auto", device: str = "auto") -> tuple[nn.Module, torch.dtype]:
    """The model of the local folder ``name`` built from its config with every tensor on ``meta`` (no
    weights read: sizes and names only), in the dtype ``resolve_dtype`` picks for ``device``.
    ``LazyUnsupported`` when it cannot be built this way (hub ids, lwq checkpoints, custom code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not looks_local(name):
        raise LazyUnsupported(f"{name} is not a local folder")
    cfg_dict = check_local_model(name)
    if cfg_dict.get("quantization_config"):
        raise LazyUnsupported(f"{name} is a quantized checkpoint")
    if cfg_dict.get("auto_map"):
        raise LazyUnsupported(f"{name} uses custom model code")
    torch_dtype = resolve_dtype(dtype, resolve_device(device), cfg_dict.get("dtype") or cfg_dict.get("torch_dtype"))
    try:
        cfg = AutoConfig.from_pretrained(str(Path(name).expanduser()), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    except CONFIG_ERRORS as exc:  # eager loading would fail the same way
        raise invalid_config(name, exc) from None
    except (ValueError, OSError, KeyError) as exc:
        raise LazyUnsupported(f"cannot build {name} from its config: {str(exc).splitlines()[0][:200]}") from None
    return model.eval(), torch_dtype


def load_lazy(name: str, dtype: str = "auto", device: str = "auto") -> tuple[nn.Module, LazyBlocks]:
    """A model from the local folder ``name`` with every block on ``meta`` and the rest on CPU in the
    dtype ``resolve_dtype`` picks for ``device``; plus the loader that materialises blocks.
    ``LazyUnsupported`` when the model cannot be built this way (hub ids, lwq checkpoints, custom code,
    renamed checkpoint keys)."""
    model, torch_dtype = meta_model(name, dtype, device)
    spec = arch_for(model)
    inside = spec.blocks + "."
    index = checkpoint_index(name)
    materialize(model, index, "cpu", torch_dtype, lambda n: not n.startswith(inside))
    return model, LazyBlocks(index, spec, torch_dtype)


def lazy_or_whole(name: str, dtype: str, device: str, trust_remote_code: bool = False
                  ) -> tuple[nn.Module, LazyBlocks | None, str]:
    """``load_lazy`` when ``name`` can be read one block at a time (never with custom code), else the
    whole model on CPU (``load_pretrained``): the model, its block loader (None when whole) and how it was
    loaded (``lazy``, or ``eager`` with the reason). ``dtype`` should be concrete (``float16``...) so
    both ways give the same dtype."""
    from lwq.models.load import load_pretrained

    if not trust_remote_code:
        try:
            model, loader = load_lazy(name, dtype, device)
            return model, loader, "lazy"
        except LazyUnsupported as exc:
            return load_pretrained(name, dtype, "cpu"), None, f"eager ({exc})"
    return load_pretrained(name, dtype, "cpu", trust_remote_code), None, "eager"
