"""What every scorer shares: its inputs, its options, the registry entry, ranks and aggregation.

A scorer maps layers to importance scores: **higher score = more important** (should keep more
bits). Granularity ``block`` names decoder blocks (``model.layers.3``); ``linear`` names the full
linear modules (``model.layers.3.mlp.down_proj``). Results are ordered as in the model.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from lwq.errors import BadInput

if TYPE_CHECKING:  # the declarations below load no torch: ``lwq --help`` lists the scorers cheaply
    import torch
    from torch import nn

    from lwq.calib.stats import CalibStats

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
class EstimateInputs:
    """What a planning estimate may use to price the candidates ``layers`` (``lwq.allocate.types``)
    under ``recipe``: the model, calibration windows, statistics, an error database to reuse, how
    measurements run (``measure``: ``lwq.score.workers``) and where the model computes (``placement``)."""

    model: nn.Module
    samples: torch.Tensor | None
    layers: list[Any]
    recipe: Any
    stats: CalibStats | None = None
    on_step: Callable[[int, int], None] | None = field(default=None, compare=False)
    db: Any = None
    measure: Any = None
    placement: Any = None


def _resolve(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Scorer:
    """A declared scorer. ``run`` (``module:function``, loaded on first use) scores layers:
    ``run(inputs, config) -> {layer: score}``; ``needs``: what it reads among ``model``, ``stats``,
    ``hessians`` (stats with Hessians) and ``samples``; ``estimate`` (``module:function``) prices the
    planning candidates: ``estimate(scorer, EstimateInputs) -> (layers, error database or None)``
    (default: block importance times ``4**-bits``, what the paper's ``order`` solver needs);
    ``streams``: planning can read the model one block at a time for it; ``prices_grids``: its
    estimate quantizes each candidate, so it tells a symmetric grid from an asymmetric one (the
    default importance estimate does not: it would always take the cheaper grid)."""

    name: str
    run: str
    needs: frozenset[str]
    help: str
    estimate: str = "lwq.score.base:importance_errors"
    streams: bool = False
    prices_grids: bool = False

    @property
    def fn(self) -> Callable[[ScoreInputs, ScoreConfig], Scores]:
        return _resolve(self.run)

    def errors(self, inputs: EstimateInputs) -> tuple[list[Any], Any]:
        """The candidates of ``inputs.layers`` with this scorer's error estimates, and its database."""
        return _resolve(self.estimate)(self, inputs)


def planning_stats(scorer: Scorer, inputs: EstimateInputs, hessians: bool) -> CalibStats:
    """The statistics a planning estimate reads: the given ones, else collected on the windows."""
    if inputs.stats is not None:
        return inputs.stats
    if inputs.samples is None:
        raise BadInput(f"scorer {scorer.name} needs calibration text: pass --data PATH")
    from lwq.calib.stats import collect_stats
    from lwq.models.placement import where

    at = inputs.placement or where(inputs.model)
    return collect_stats(inputs.model, inputs.samples, at.device, on_block=inputs.on_step, hessians=hessians,
                         loader=at.loader)


def importance_errors(scorer: Scorer, inputs: EstimateInputs) -> tuple[list[Any], None]:
    """Every candidate priced by its block's importance score times ``4**-bits``."""
    from lwq.allocate.candidates import with_importance
    from lwq.models.arch import arch_for, block_name
    from lwq.models.placement import where

    stats = planning_stats(scorer, inputs, False) if scorer.needs & {"stats", "hessians"} else inputs.stats
    if "samples" in scorer.needs and inputs.samples is None:
        raise BadInput(f"scorer {scorer.name} needs calibration text: pass --data PATH")
    at = inputs.placement or where(inputs.model)
    scores = scorer.fn(ScoreInputs(inputs.model, stats, inputs.samples, str(at.device), inputs.on_step),
                       ScoreConfig(granularity="block"))
    arch = arch_for(inputs.model)
    return with_importance(inputs.layers, {lc.name: scores[block_name(lc.name, arch)] for lc in inputs.layers}), None


def block_names(model: nn.Module) -> list[str]:
    """``model.layers.0``, ``model.layers.1``, ... for ``model``."""
    from lwq.models.arch import arch_for, get_blocks

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
