"""Block-by-block execution: capture the inputs of block 0, then run one decoder block at a time.

Only the modules outside the block list (embeddings, rotary tables, final norm, head) and the block
being run need to be on the compute device, so memory is about one block plus the activations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from lwq.models.arch import ArchSpec, arch_for, get_blocks, get_submodule


class BlockLoader(Protocol):
    """Where decoder blocks come from: ``acquire`` puts block ``i`` on ``device`` (materialising it if
    needed), ``release`` frees or parks it again."""

    def acquire(self, model: nn.Module, i: int, device: torch.device) -> nn.Module: ...

    def release(self, model: nn.Module, i: int) -> None: ...


@dataclass(frozen=True)
class ResidentBlocks:
    """Blocks already in memory on ``home``: moved to the device for their turn and back after."""

    home: str = "cpu"

    def acquire(self, model: nn.Module, i: int, device: torch.device) -> nn.Module:
        return get_blocks(model)[i].to(device)

    def release(self, model: nn.Module, i: int) -> None:
        get_blocks(model)[i].to(self.home)


class _StopForward(Exception):
    """Raised by the catcher once block 0's inputs are recorded."""


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module, sink: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        super().__init__()
        self.block = block
        self.sink = sink

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink.append((hidden, dict(kwargs)))
        raise _StopForward


@dataclass
class BlockInputs:
    """Hidden states entering a block, one tensor per batch, and the keyword arguments the model
    passes to every block (attention mask, position ids/embeddings) for that batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    reference: list[torch.Tensor] | None = None  # the full-precision model's states here (refinement)

    def __len__(self) -> int:
        return len(self.hidden)

    def with_hidden(self, hidden: list[torch.Tensor], reference: list[torch.Tensor] | None = None) -> "BlockInputs":
        return BlockInputs(hidden, self.kwargs, reference)


def move_outside_blocks(model: nn.Module, spec: ArchSpec, device: torch.device | str) -> None:
    """Move every parameter and buffer that is not inside the block list to ``device``."""
    prefix = spec.blocks + "."
    for name, module in model.named_modules():
        if name == spec.blocks or name.startswith(prefix):
            continue
        module._apply(lambda t: t.to(device), recurse=False)


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu",
    spec: ArchSpec | None = None, store: torch.device | str | None = None,
) -> BlockInputs:
    """Run the model up to block 0 for each batch of token ids and record what block 0 receives.

    The blocks stay where they are (usually CPU); the rest of the model is moved to ``device``.
    Hidden states are kept on ``store`` (default: ``device``).
    """
    spec = spec or arch_for(model)
    blocks = get_blocks(model, spec)
    move_outside_blocks(model, spec, device)
    store = store or device
    sink: list[tuple[torch.Tensor, dict[str, Any]]] = []
    first = blocks[0]
    blocks[0] = _Catcher(first, sink)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        blocks[0] = first
    return BlockInputs([h.to(store) for h, _ in sink], [_to(k, device) for _, k in sink])


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One block's output hidden states (blocks return a tensor or a tuple whose first item it is)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def block_norms(block: nn.Module) -> list[nn.Parameter]:
    """The weights of ``block``'s normalization layers (modules whose class name ends in ``Norm``:
    RMSNorm, LayerNorm, Qwen3's per-head q/k norms), in module order; layers without a weight are skipped."""
    return [m.weight for m in block.modules()
            if type(m).__name__.endswith("Norm") and isinstance(getattr(m, "weight", None), nn.Parameter)]


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: BlockInputs, device: torch.device | str) -> list[torch.Tensor]:
    """Outputs of ``block`` for every batch in ``inputs``, stored where the inputs are."""
    return [run_block(block, h.to(device), k).to(h.device) for h, k in zip(inputs.hidden, inputs.kwargs)]


@torch.no_grad()
def forward_blocks(model: nn.Module, inputs: BlockInputs, device: torch.device | str, loader: Any = None,
                   on_block: Callable[[int, list[torch.Tensor]], None] | None = None) -> list[torch.Tensor]:
    """The hidden states of ``inputs`` after the last decoder block, run one block at a time:
    ``loader`` (a ``BlockLoader``; default: blocks stay where they are) brings each
    block to ``device`` once for all batches, and hidden states wait on the CPU in between.
    ``on_block(i, hidden)`` receives the states leaving block ``i``."""
    if loader is None:
        loader = ResidentBlocks(str(next(get_blocks(model)[0].parameters()).device))
    hidden = inputs.hidden
    for i in range(len(get_blocks(model))):
        block = loader.acquire(model, i, torch.device(device))
        hidden = [run_block(block, h.to(device), kw).cpu() for h, kw in zip(hidden, inputs.kwargs)]
        loader.release(model, i)
        if on_block is not None:
            on_block(i, hidden)
    return hidden


def head_logits(model: nn.Module, hidden: torch.Tensor, spec: ArchSpec | None = None) -> torch.Tensor:
    """Logits from final hidden states: the final norm (if any) then the output head."""
    spec = spec or arch_for(model)
    if spec.norm:
        hidden = get_submodule(model, spec.norm)(hidden)
    project_out = getattr(getattr(model, "model", None), "decoder", None)
    project_out = getattr(project_out, "project_out", None)  # OPT-350m projects back to the embed size
    if project_out is not None:
        hidden = project_out(hidden)
    return model.get_output_embeddings()(hidden)
