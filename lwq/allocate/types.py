"""Torch-free data the solvers work on: candidates per layer (exact byte cost and an error estimate)
and the allocation a solver returns.

A layer's candidates are the specs it may get; ``cost_bytes`` is the exact size of its checkpoint
tensors under that spec (``lwq.formats.bytes.layer_bytes``) and ``error`` the estimate a solver
minimises (summed over layers). ``importance`` is a scorer's per-layer score, used by ``order``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lwq.errors import BadInput
from lwq.spec import LayerSpec


@dataclass(frozen=True)
class Candidate:
    """One spec a layer may get, with its exact byte cost and error estimate (``nan`` = not estimated)."""

    spec: LayerSpec
    cost_bytes: int
    error: float = math.nan


@dataclass(frozen=True)
class LayerCandidates:
    """The candidates of one linear: module ``name``, weight ``shape`` (out, in), ``numel`` = out * in,
    and the scorer's ``importance`` (higher = more important; ``None`` when not scored)."""

    name: str
    numel: int
    shape: tuple[int, int]
    candidates: tuple[Candidate, ...]
    importance: float | None = None

    def replace_errors(self, errors: Sequence[float]) -> "LayerCandidates":
        """The same layer with new error estimates (one per candidate, in order)."""
        if len(errors) != len(self.candidates):
            raise ValueError(f"{self.name}: {len(errors)} errors for {len(self.candidates)} candidates")
        cands = tuple(Candidate(c.spec, c.cost_bytes, float(e)) for c, e in zip(self.candidates, errors))
        return LayerCandidates(self.name, self.numel, self.shape, cands, self.importance)

    def with_importance(self, importance: float) -> "LayerCandidates":
        return LayerCandidates(self.name, self.numel, self.shape, self.candidates, float(importance))


@dataclass(frozen=True)
class Allocation:
    """A solver's answer: ``index[i]`` is the chosen candidate of layer ``i``; ``specs`` maps module
    name -> spec in layer order; totals are exact bytes, summed error estimate and real bits per
    weight (8 * bytes / weights of the counted layers)."""

    solver: str
    index: tuple[int, ...]
    specs: dict[str, LayerSpec]
    costs: tuple[int, ...]
    errors: tuple[float, ...]
    total_bytes: int
    total_error: float
    bits_per_weight: float
    info: dict = field(default_factory=dict)


def allocation(layers: Sequence[LayerCandidates], index: Sequence[int], solver: str, **info) -> Allocation:
    """Build the ``Allocation`` of choosing candidate ``index[i]`` for layer ``i``."""
    idx = tuple(int(k) for k in index)
    chosen = [lc.candidates[k] for lc, k in zip(layers, idx)]
    costs = tuple(int(c.cost_bytes) for c in chosen)
    errors = tuple(float(c.error) for c in chosen)
    numel = sum(lc.numel for lc in layers)
    total = sum(costs)
    return Allocation(solver=solver, index=idx, specs={lc.name: c.spec for lc, c in zip(layers, chosen)},
                      costs=costs, errors=errors, total_bytes=total, total_error=float(sum(errors)),
                      bits_per_weight=8.0 * total / numel if numel else 0.0, info=dict(info))


class Infeasible(BadInput):
    """No plan fits the cap. ``min_bytes`` is the smallest feasible total (under the constraints)."""

    def __init__(self, message: str, min_bytes: int) -> None:
        super().__init__(message)
        self.min_bytes = min_bytes


def check_layers(layers: Sequence[LayerCandidates], need_errors: bool = True) -> None:
    """Refuse empty inputs, layers without candidates and (when needed) missing error estimates."""
    if not layers:
        raise BadInput("no layers to allocate")
    names = [lc.name for lc in layers]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise BadInput(f"duplicate layer name(s): {', '.join(dup[:5])}")
    for lc in layers:
        if not lc.candidates:
            raise BadInput(f"layer {lc.name} has no candidates")
        if need_errors and any(not math.isfinite(c.error) for c in lc.candidates):
            raise BadInput(f"layer {lc.name} has candidates without a finite error estimate "
                           "(fill them from a scorer, the hessian estimate or an error database)")


def cost_table(layers: Sequence[LayerCandidates]) -> list[np.ndarray]:
    """Per layer, the int64 array of candidate byte costs."""
    return [np.array([c.cost_bytes for c in lc.candidates], dtype=np.int64) for lc in layers]


def error_table(layers: Sequence[LayerCandidates]) -> list[np.ndarray]:
    """Per layer, the float64 array of candidate error estimates."""
    return [np.array([c.error for c in lc.candidates], dtype=np.float64) for lc in layers]


def min_bytes(layers: Sequence[LayerCandidates]) -> int:
    """The smallest total: every layer at its cheapest candidate."""
    return int(sum(min(c.cost_bytes for c in lc.candidates) for lc in layers))


def infeasible(layers: Sequence[LayerCandidates], cap_bytes: int, smallest: int, why: str = "") -> Infeasible:
    """The error for a cap below ``smallest`` bytes (stated in bytes and real bits per weight)."""
    numel = sum(lc.numel for lc in layers)
    extra = f" {why}" if why else ""
    return Infeasible(f"budget of {cap_bytes} bytes for the quantized layers is infeasible: the smallest plan"
                      f"{extra} needs {smallest} bytes ({8.0 * smallest / numel:.4f} bits per weight)", smallest)
