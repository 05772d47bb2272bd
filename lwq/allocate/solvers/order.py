"""``order``: the paper's method. Rank units (blocks or single layers) by importance; the most
important get the higher of two bit widths, the rest the lower, as many high as the cap allows.

The two widths are the nearest pair of candidate widths around the cap: the widest width whose
uniform plan fits (``lo``) and the next one up (``hi``). Everything starts at ``lo``; units are
promoted to ``hi`` from the most important down while the total stays within the cap (the paper's
prefix; ``fill=True`` keeps going past a unit that does not fit to smaller ones after it).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lwq.allocate.types import Allocation, LayerCandidates, allocation, check_layers, infeasible
from lwq.errors import BadInput


def width_index(layers: Sequence[LayerCandidates]) -> dict[int, list[int]]:
    """For each bit width every layer offers, the index of each layer's cheapest candidate of that width."""
    common = set.intersection(*({c.spec.bits for c in lc.candidates} for lc in layers))
    out: dict[int, list[int]] = {}
    for b in sorted(common):
        out[b] = [min((k for k, c in enumerate(lc.candidates) if c.spec.bits == b),
                      key=lambda k, lc=lc: (lc.candidates[k].cost_bytes, k)) for lc in layers]
    return out


def resolve_units(layers: Sequence[LayerCandidates], units: Sequence[Sequence[str]] | None) -> list[list[int]]:
    """Layer indices per unit; ``None`` = one unit per layer. Units must cover every layer once."""
    pos = {lc.name: i for i, lc in enumerate(layers)}
    if units is None:
        return [[i] for i in range(len(layers))]
    out, seen = [], set()
    for u in units:
        idx = []
        for name in u:
            if name not in pos:
                raise BadInput(f"order: unit member {name!r} is not a layer being allocated")
            if name in seen:
                raise BadInput(f"order: layer {name} appears in two units")
            seen.add(name)
            idx.append(pos[name])
        if idx:
            out.append(idx)
    missing = [lc.name for lc in layers if lc.name not in seen]
    if missing:
        raise BadInput(f"order: {len(missing)} layer(s) in no unit, e.g. {', '.join(missing[:3])}")
    return out


def promote(layers: Sequence[LayerCandidates], cap_bytes: int, scores: Sequence[float],
            units: list[list[int]], levels: tuple[int, int] | None, fill: bool, solver: str) -> Allocation:
    """The ordering allocation given a score per unit (higher = keeps the higher width)."""
    widths = width_index(layers)
    if not widths:
        raise BadInput(f"{solver}: the layers share no candidate bit width")
    cost = {b: np.array([lc.candidates[k].cost_bytes for lc, k in zip(layers, ks)], dtype=np.int64)
            for b, ks in widths.items()}
    avail = sorted(widths)
    if levels is not None:
        lo, hi = sorted(levels)
        if lo not in widths or hi not in widths:
            raise BadInput(f"{solver}: levels {levels} not offered by every layer; common widths: {avail}")
    else:
        fits = [b for b in avail if int(cost[b].sum()) <= cap_bytes]
        if not fits:
            raise infeasible(layers, cap_bytes, int(cost[avail[0]].sum()), f"(all layers at {avail[0]} bits)")
        lo = fits[-1]
        if lo == avail[-1]:
            return allocation(layers, widths[lo], solver, levels=(lo, lo), promoted=len(units))
        hi = avail[avail.index(lo) + 1]
    total = int(cost[lo].sum())
    if total > cap_bytes:
        raise infeasible(layers, cap_bytes, total, f"(all layers at {lo} bits)")
    index = list(widths[lo])
    rank = sorted(range(len(units)), key=lambda u: -scores[u])  # stable: earlier unit first on ties
    promoted = 0
    for u in rank:
        delta = int(sum(cost[hi][i] - cost[lo][i] for i in units[u]))
        if total + delta > cap_bytes:
            if fill:
                continue
            break
        total += delta
        promoted += 1
        for i in units[u]:
            index[i] = widths[hi][i]
    return allocation(layers, index, solver, levels=(lo, hi), promoted=promoted)


def solve(layers: Sequence[LayerCandidates], cap_bytes: int, *, units: Sequence[Sequence[str]] | None = None,
          levels: tuple[int, int] | None = None, fill: bool = False) -> Allocation:
    """Rank ``units`` (lists of layer names, e.g. the linears of each block; default: each layer) by
    the mean ``importance`` of their layers and promote the most important to the higher width."""
    check_layers(layers, need_errors=False)
    missing = [lc.name for lc in layers if lc.importance is None]
    if missing:
        raise BadInput(f"order needs an importance score per layer (from a scorer); missing for {missing[0]}")
    groups = resolve_units(layers, units)
    scores = [float(np.mean([layers[i].importance for i in g])) for g in groups]
    return promote(layers, cap_bytes, scores, groups, levels, fill, "order")


def solve_random(layers: Sequence[LayerCandidates], cap_bytes: int, *, seed: int = 0,
                 units: Sequence[Sequence[str]] | None = None, levels: tuple[int, int] | None = None,
                 fill: bool = False) -> Allocation:
    """``order`` with a random ranking (seeded): the baseline a scorer has to beat."""
    check_layers(layers, need_errors=False)
    groups = resolve_units(layers, units)
    scores = np.random.default_rng(seed).permutation(len(groups)).astype(float).tolist()
    return promote(layers, cap_bytes, scores, groups, levels, fill, "random")
