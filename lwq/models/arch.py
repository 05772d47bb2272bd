"""The declarative architecture table: where decoder blocks and their linears are, per ``model_type``.

Adding a model family means adding a row here, not code. Models not in the table use a generic
fallback that finds the block list (the ``nn.ModuleList`` whose length is the number of layers)
and the linears inside a block in definition order.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    shards in serving engines (q/k/v, gate/up). ``embed``, ``norm``, ``head``: input embedding, final
    norm (empty when none) and output head.
    """

    name: str
    blocks: str
    groups: tuple[tuple[str, ...], ...]
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    head: str = "lm_head"

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
    "gemma": ArchSpec("gemma", "model.layers", _LLAMA_GROUPS),
    "gemma2": ArchSpec("gemma2", "model.layers", _LLAMA_GROUPS),
    "phi3": ArchSpec(
        "phi3", "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    "opt": ArchSpec(
        "opt", "model.decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        embed="model.decoder.embed_tokens", norm="model.decoder.final_layer_norm",
    ),
    "gpt2": ArchSpec(
        "gpt2", "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        embed="transformer.wte", norm="transformer.ln_f",
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
    embed = model.get_input_embeddings()
    embed_name = next((n for n, m in model.named_modules() if m is embed), "")
    return ArchSpec(f"generic:{mt}", name, tuple((n,) for n in linears), embed=embed_name, norm=norm)


def arch_for(model: nn.Module) -> ArchSpec:
    """The table row for this model's ``model_type``, checked against the model, else the fallback."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCH_TABLE.get(mt or "")
    if spec is not None:
        try:
            block0 = get_submodule(model, spec.blocks)[0]
            if all(_has(block0, n) for n in spec.linears):
                return spec
        except (BadInput, IndexError, TypeError):
            pass  # the table row does not fit this variant: use the generic fallback below
    return _generic_spec(model)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


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
