"""``dp``: exact multiple-choice knapsack over real bytes, minimising the summed error estimate
(EvoPress's ``DPSolver`` idea, in numpy).

Bytes are discretised into units of ``u`` bytes with every cost rounded UP (``ceil(c / u)``), so a
plan that fits in units also fits in bytes: the result never exceeds the cap. Rounding loses at most
``(layers + 1) * (u - 1)`` bytes of the cap, and ``u`` is chosen to keep that within ``tolerance``
(0.5%) of the cap while the table stays near ``max_buckets`` entries: the answer is at least as good
as the exact optimum under ``cap * (1 - tolerance)``, and exact when ``u = 1`` (small caps).
Among plans of equal error the cheapest is returned.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from lwq.allocate.types import (Allocation, LayerCandidates, allocation, check_layers, cost_table, error_table,
                                infeasible, min_bytes)

MAX_BUCKETS = 20000


def byte_unit(cap_bytes: int, n_layers: int, tolerance: float = 0.005, max_buckets: int = MAX_BUCKETS) -> int:
    """The discretisation unit: as coarse as ``max_buckets`` allows but never losing more than
    ``tolerance * cap`` bytes to rounding (which then takes precedence over ``max_buckets``)."""
    coarse = math.ceil(cap_bytes / max_buckets)
    safe = math.floor(tolerance * cap_bytes / (n_layers + 1))
    return max(1, min(coarse, safe))


def knapsack(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], capacity: int) -> list[int] | None:
    """Minimum-error choice of one item per group with integer ``costs`` summing to at most
    ``capacity``; ``None`` when nothing fits. Among optimal choices, the cheapest (in units)."""
    dp = np.zeros(capacity + 1)  # dp[b]: least error of the layers so far with cost <= b
    choice = np.empty((len(costs), capacity + 1), dtype=np.int16)
    for i, (w, e) in enumerate(zip(costs, errors)):
        new = np.full(capacity + 1, np.inf)
        arg = np.full(capacity + 1, -1, dtype=np.int16)
        for k in range(len(w)):
            wk = int(w[k])
            if wk > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[wk:] = dp[:capacity + 1 - wk] + e[k]
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp, choice[i] = new, arg
    best = dp[capacity]
    if not np.isfinite(best):
        return None
    b = int(np.argmax(dp <= best + 1e-12 * max(1.0, abs(best))))  # dp is non-increasing in b
    index = [0] * len(costs)
    for i in range(len(costs) - 1, -1, -1):
        k = int(choice[i, b])
        index[i] = k
        b -= int(costs[i][k])
    return index


def solve(layers: Sequence[LayerCandidates], cap_bytes: int, *, tolerance: float = 0.005,
          unit: int | None = None, max_buckets: int = MAX_BUCKETS,
          tie_groups: Sequence[Sequence[str]] | None = None) -> Allocation:
    """Least summed error with total real bytes <= ``cap_bytes``; ``unit`` overrides the
    discretisation (1 = exact, memory ``layers * cap`` bytes); ``tie_groups``: names that must share
    one spec (solved exactly on merged units, ``lwq.allocate.ties``)."""
    check_layers(layers)
    if tie_groups:
        from lwq.allocate.ties import expand, merge

        units, maps = merge(layers, tie_groups)
        inner = solve(units, cap_bytes, tolerance=tolerance, unit=unit, max_buckets=max_buckets)
        return allocation(layers, expand(layers, units, maps, inner.index), "dp", tie_groups=len(tie_groups),
                          **inner.info)
    smallest = min_bytes(layers)
    if cap_bytes < smallest:
        raise infeasible(layers, cap_bytes, smallest)
    u = unit or byte_unit(cap_bytes, len(layers), tolerance, max_buckets)
    costs = [-(-c // u) for c in cost_table(layers)]  # ceil: a plan within capacity units fits in bytes
    index = knapsack(costs, error_table(layers), cap_bytes // u)
    if index is None:  # the cheapest plans lie in the rounding margin: take the cheapest
        index = [min(range(len(lc.candidates)), key=lambda k, lc=lc: (lc.candidates[k].cost_bytes,
                                                                    lc.candidates[k].error))
                 for lc in layers]
    return allocation(layers, index, "dp", unit=u, buckets=cap_bytes // u + 1)
