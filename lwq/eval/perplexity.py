"""Perplexity of a causal LM over a token stream, with the standard sliding window.

The text is tokenized once. Windows of ``seqlen`` tokens start every ``stride`` tokens; a final
partial window is dropped. The first window scores every token after its first; each later window
scores only its last ``min(stride, seqlen - 1)`` tokens, so with ``stride == seqlen`` the windows are
disjoint and each scores every token after its first. Perplexity is ``exp(total NLL / scored tokens)``.

``perplexity`` runs the whole model per batch of windows; ``perplexity_by_blocks`` computes the same
number one decoder block at a time over all windows (every block fetched once, hidden states kept on
the CPU), for a model whose blocks do not all fit on the device (``lwq.models.placement``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lwq.errors import BadInput


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window in the stream
    first_scored: int  # first position inside the window whose token is scored (>= 1)


@dataclass(frozen=True)
class PplResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    seqlen: int
    stride: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def window_plan(n_tokens: int, seqlen: int, stride: int | None = None, max_windows: int | None = None) -> list[Window]:
    """The windows of the sliding-window method (see module docstring)."""
    stride = seqlen if stride is None else stride
    if seqlen < 2:
        raise BadInput(f"seqlen must be at least 2, got {seqlen}")
    if not 1 <= stride <= seqlen:
        raise BadInput(f"stride must be between 1 and seqlen ({seqlen}), got {stride}")
    if n_tokens < seqlen:
        raise BadInput(f"the text has {n_tokens} tokens, fewer than one window of {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise BadInput(f"max-samples must be positive, got {max_windows}")
    first_later = max(1, seqlen - stride)
    plan = [Window(b, 1 if b == 0 else first_later) for b in range(0, n_tokens - seqlen + 1, stride)]
    return plan[:max_windows] if max_windows is not None else plan


@torch.no_grad()
def window_nll(logits: torch.Tensor, ids: torch.Tensor, first_scored: int) -> torch.Tensor:
    """Summed NLL of ``ids[:, first_scored:]`` given ``logits`` of shape (batch, seqlen, vocab)."""
    pred = logits[:, first_scored - 1:-1].float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, first_scored:].reshape(-1), reduction="sum")


def _batches(ids: torch.Tensor, plan: list[Window], seqlen: int, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """(first scored position, token ids) per batch: windows with the same ``first_scored`` together."""
    out = []
    for start in range(0, len(plan), batch_size):
        chunk = plan[start:start + batch_size]
        for first in sorted({w.first_scored for w in chunk}):
            group = [w for w in chunk if w.first_scored == first]
            out.append((first, torch.stack([ids[w.begin:w.begin + seqlen] for w in group])))
    return out


def _result(total: float, count: int, plan: list[Window], seqlen: int, stride: int | None) -> PplResult:
    nll = total / count
    return PplResult(math.exp(nll), nll, count, len(plan), seqlen, seqlen if stride is None else stride)


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: torch.Tensor, seqlen: int, stride: int | None = None, max_windows: int | None = None,
    batch_size: int = 4, on_step: Callable[[int, int], None] | None = None,
) -> PplResult:
    """Perplexity of ``model`` on the 1-D token stream ``ids`` (see module docstring)."""
    plan = window_plan(ids.numel(), seqlen, stride, max_windows)
    device = next(model.parameters()).device
    total, count, done = 0.0, 0, 0
    for first, batch in _batches(ids, plan, seqlen, batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total += float(window_nll(logits, batch, first))
        count += batch.shape[0] * (seqlen - first)
        done += batch.shape[0]
        if on_step is not None:
            on_step(done, len(plan))
    return _result(total, count, plan, seqlen, stride)


@torch.no_grad()
def perplexity_by_blocks(
    model: nn.Module, ids: torch.Tensor, seqlen: int, stride: int | None = None, max_windows: int | None = None,
    batch_size: int = 4, on_step: Callable[[int, int], None] | None = None, device: torch.device | str = "cpu",
    loader: Any = None,
) -> PplResult:
    """``perplexity`` one decoder block at a time: ``loader`` (``lwq.models.blocks.BlockLoader``) brings
    each block to ``device`` once for all windows; the modules outside the blocks must be on
    ``device``. ``on_step`` counts blocks, then the head."""
    from lwq.models.arch import arch_for, get_blocks
    from lwq.models.blocks import capture_block_inputs, forward_blocks, head_logits

    plan = window_plan(ids.numel(), seqlen, stride, max_windows)
    spec = arch_for(model)
    steps = len(get_blocks(model, spec)) + 1  # the blocks, then the head
    batches = _batches(ids, plan, seqlen, batch_size)
    inputs = capture_block_inputs(model, [b for _, b in batches], device, spec, store="cpu")
    hidden = forward_blocks(model, inputs, device, loader,
                            None if on_step is None else lambda i, _h: on_step(i + 1, steps))
    total, count = 0.0, 0
    for (first, batch), h in zip(batches, hidden):
        for r in range(batch.shape[0]):  # one window at a time: the logits of a large vocabulary are big
            logits = head_logits(model, h[r:r + 1].to(device), spec)
            total += float(window_nll(logits, batch[r:r + 1].to(device), first))
        count += batch.shape[0] * (seqlen - first)
    if on_step is not None:
        on_step(steps, steps)
    return _result(total, count, plan, seqlen, stride)
