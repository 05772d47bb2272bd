"""What every scorer shares: its inputs, its options, the registry entry, ranks and aggregation.

A scorer maps layers to importance scores: **higher score = more important** (should keep more
bits). Granularity ``block`` names decoder blocks (``model.layers.3``); ``linear`` names the full
linear modules (``model.layers.3.mlp.down_proj``). Results are ordered as in the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lwq.calib.stats import CalibStats
from lwq.errors import BadInput
from lwq.models.arch import arch_for, get_blocks

GRANULARITIES = ("block", "linear")
Scores = dict[str, float]


@dataclass(frozen=True)
class ScoreConfig:
    """Options shared by the scorers. ``bits=None`` lets each scorer use its own default (hessian 3,
    sensitivity 2). ``zd_order``: which z-score share counts as important (see ``lwq.score.zd``);
    ``metric``: ``kl`` or ``nll`` for sensitivity."""

    version: int = 1
    granularity: str = "block"
    bits: int | None = None
    group_size: int = 128
    sym: bool = False
    zd_order: str = "descending"
    metric: str = "kl"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise BadInput(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.bits is not None and not 1 <= self.bits <= 8:
            raise BadInput(f"--bits must be between 1 and 8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise BadInput(f"--group-size must be positive or -1 (per channel), got {self.group_size}")
        if self.zd_order not in ("ascending", "descending"):
            raise BadInput(f"--zd-order must be ascending or descending, got {self.zd_order!r}")
        if self.metric not in ("kl", "nll"):
            raise BadInput(f"--metric must be kl or nll, got {self.metric!r}")


@dataclass(frozen=True)
class ScoreInputs:
    """What a scorer may use: the model (weights), calibration statistics, calibration token ids
    ``samples`` (nsamples, seqlen), the compute device and a progress callback ``on_step(i, n)``."""

    model: nn.Module | None = None
    stats: CalibStats | None = None
    samples: torch.Tensor | None = None
    device: str = "cpu"
    on_step: Callable[[int, int], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Scorer:
    """A registry entry: ``fn(inputs, config) -> {layer: score}`` and what it ``needs`` among
    ``model``, ``stats``, ``hessians`` (stats with Hessians) and ``samples``."""

    name: str
    fn: Callable[[ScoreInputs, ScoreConfig], Scores]
    needs: frozenset[str]
    help: str


def block_names(model: nn.Module) -> list[str]:
    """``model.layers.0``, ``model.layers.1``, ... for ``model``."""
    spec = arch_for(model)
    return [f"{spec.blocks}.{i}" for i in range(len(get_blocks(model, spec)))]


def block_of(linear: str, blocks: list[str]) -> str:
    """The block (from ``blocks``) that contains ``linear``."""
    for b in blocks:
        if linear.startswith(b + "."):
            return b
    raise KeyError(linear)


def per_block(linear_scores: Scores, blocks: list[str], reduce: str) -> Scores:
    """Aggregate linear scores to their blocks by ``sum`` or ``mean``."""
    acc: dict[str, list[float]] = {b: [] for b in blocks}
    for name, s in linear_scores.items():
        acc[block_of(name, blocks)].append(s)
    if reduce == "sum":
        return {b: float(sum(v)) for b, v in acc.items()}
    return {b: float(sum(v) / len(v)) for b, v in acc.items()}


def at_granularity(linear_scores: Scores, model: nn.Module, granularity: str, reduce: str) -> Scores:
    """``linear_scores`` as they are, or aggregated per block."""
    if granularity == "linear":
        return linear_scores
    return per_block(linear_scores, block_names(model), reduce)


def ranks(scores: Scores) -> dict[str, int]:
    """Rank 1 = highest score (most important); ties keep model order."""
    order = sorted(scores, key=lambda n: -scores[n])
    return {n: i + 1 for i, n in enumerate(order)}
