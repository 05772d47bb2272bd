"""The declarative architecture table: where decoder blocks and their linears are, per ``model_type``.

Adding a model family means adding a row here, not code. Models not in the table use a generic
fallback that finds the block list (the ``nn.ModuleList`` whose length is the number of layers)
and the linears inside a block in definition order.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch
from torch import nn

from lwq.errors import BadInput

try:  # GPT-2 style models use Conv1D (weight stored as in x out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always ships it
    Conv1D = ()  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model family.

    ``blocks``: dotted path of the decoder-block ``ModuleList``. ``groups``: ordered groups of linear
    names inside a block; a group's members see the same input (so share a Hessian) and are fused
    shards in serving engines (q/k/v, gate/up). ``norm``: the final norm (empty when none).
    ``why_generic``: for the generic fallback, why the table row of the model type did not fit.
    ``norm_offset``: what a normalization layer adds to its weight before scaling (Gemma's
    ``1 + weight``: 1.0), so refinement steps its norms in proportion to the real multiplier.
    """

    name: str
    blocks: str
    groups: tuple[tuple[str, ...], ...]
    norm: str = "model.norm"
    why_generic: str = ""
    norm_offset: float = 0.0

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ARCH_TABLE: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "model.layers", _LLAMA_GROUPS),
    "mistral": ArchSpec("mistral", "model.layers", _LLAMA_GROUPS),
    "qwen2": ArchSpec("qwen2", "model.layers", _LLAMA_GROUPS),
    "qwen3": ArchSpec("qwen3", "model.layers", _LLAMA_GROUPS),
    "gemma": ArchSpec("gemma", "model.layers", _LLAMA_GROUPS, norm_offset=1.0),
    "gemma2": ArchSpec("gemma2", "model.layers", _LLAMA_GROUPS, norm_offset=1.0),
    "phi3": ArchSpec(
        "phi3", "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    "opt": ArchSpec(
        "opt", "model.decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        norm="model.decoder.final_layer_norm",
    ),
    "gpt2": ArchSpec(
        "gpt2", "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        norm="transformer.ln_f",
    ),
}


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` with a clear error."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise BadInput(f"model has no module {path!r}") from exc


def _generic_spec(model: nn.Module) -> ArchSpec:
    """Fallback: the ModuleList with ``num_hidden_layers`` entries, linears in definition order."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
    ]
    if not candidates:
        mt = getattr(getattr(model, "config", None), "model_type", "?")
        raise BadInput(f"unsupported architecture {mt!r}: no decoder block list found")
    name, blocks = max(candidates, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    linears = tuple(n for n, m in blocks[0].named_modules() if isinstance(m, LINEAR_TYPES))
    if not linears:
        raise BadInput(f"unsupported architecture: no linear layers in {name}.0")
    mt = getattr(model.config, "model_type", "generic")
    norm = next((n for n in ("model.norm", "model.final_layernorm", "transformer.ln_f") if _has(model, n)), "")
    return ArchSpec(f"generic:{mt}", name, tuple((n,) for n in linears), norm=norm)


def arch_for(model: nn.Module) -> ArchSpec:
    """The table row for this model's ``model_type``, checked against the model, else the fallback."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCH_TABLE.get(mt or "")
    if spec is None:
        return _generic_spec(model)
    try:
        block0 = get_submodule(model, spec.blocks)[0]
    except (BadInput, IndexError, TypeError) as exc:
        why = f"no block list at {spec.blocks} ({type(exc).__name__}: {exc})"
    else:
        missing = [n for n in spec.linears if not _has(block0, n)]
        if not missing:
            return spec
        why = f"block 0 has no {', '.join(missing)}"
    return replace(_generic_spec(model), why_generic=f"the {mt} row does not fit: {why}")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def block_index(name: str, blocks: str) -> int | None:
    """The index of the block holding module or tensor ``name`` under the block list ``blocks``
    (``model.layers.3.mlp.up_proj`` -> 3 under ``model.layers``), else None."""
    if not name.startswith(blocks + "."):
        return None
    head = name[len(blocks) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def block_name(name: str, spec: ArchSpec) -> str:
    """The block module holding ``name`` (``model.layers.3``); ``KeyError`` outside the blocks."""
    i = block_index(name, spec.blocks)
    if i is None:
        raise KeyError(name)
    return f"{spec.blocks}.{i}"


def get_blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or arch_for(model)
    return get_submodule(model, spec.blocks)  # type: ignore[return-value]


def linear_names(model: nn.Module, spec: ArchSpec | None = None) -> list[str]:
    """Full module names of every quantizable linear in the decoder blocks, in model order."""
    spec = spec or arch_for(model)
    n = len(get_blocks(model, spec))
    return [f"{spec.blocks}.{i}.{lin}" for i in range(n) for lin in spec.linears]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear as ``(out_features, in_features)`` (Conv1D stores it transposed)."""
    if isinstance(Conv1D, type) and isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear-like module."""
    w = linear_weight(module)
    return int(w.shape[0]), int(w.shape[1])


def model_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every block linear, in model order."""
    return {n: linear_shape(model.get_submodule(n)) for n in linear_names(model)}


def rest_bytes(model: nn.Module, shapes: Mapping[str, tuple[int, int]], itemsize: int = 2) -> int:
    """Checkpoint bytes of what is not quantized (embeddings, lm_head, norms, biases: all parameters but
    the counted linears, a tied one once), stored ``itemsize`` bytes each (the source's dtype)."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return itemsize * (total - sum(o * i for o, i in shapes.values()))

