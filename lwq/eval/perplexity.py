"""Perplexity of a causal LM over a token stream, with the standard sliding window.

The text is tokenized once. Windows of ``seqlen`` tokens start every ``stride`` tokens; a final
partial window is dropped. The first window scores every token after its first; each later window
scores only its last ``min(stride, seqlen - 1)`` tokens, so with ``stride == seqlen`` the windows are
disjoint and each scores every token after its first. Perplexity is ``exp(total NLL / scored tokens)``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

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


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: torch.Tensor, seqlen: int, stride: int | None = None, max_windows: int | None = None,
    batch_size: int = 4, on_step: Callable[[int, int], None] | None = None,
) -> PplResult:
    """Perplexity of ``model`` on the 1-D token stream ``ids`` (see module docstring)."""
    plan = window_plan(ids.numel(), seqlen, stride, max_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    # windows with the same first_scored are batched together
    for start in range(0, len(plan), batch_size):
        chunk = plan[start:start + batch_size]
        for first in sorted({w.first_scored for w in chunk}):
            group = [w for w in chunk if w.first_scored == first]
            batch = torch.stack([ids[w.begin:w.begin + seqlen] for w in group]).to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            total += float(window_nll(logits, batch, first))
            count += batch.shape[0] * (seqlen - first)
        if on_step is not None:
            on_step(min(start + batch_size, len(plan)), len(plan))
    nll = total / count
    return PplResult(math.exp(nll), nll, count, len(plan), seqlen, seqlen if stride is None else stride)
