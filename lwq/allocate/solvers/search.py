"""``search``: EvoPress-style improvement of a plan by evaluating the real loss.

Start from a plan (the ``dp`` plan by default), then for each generation: make ``offspring``
mutants that move bits between layers (raise one layer a level, lower others until the total fits
the cap again, so every mutant stays within the cap), evaluate them on a small ``low_fidelity``
(few tokens), re-evaluate the best ``survivors`` on the full ``fidelity`` and keep the best if it
beats the parent on the full fidelity. The result is never above the cap and never worse than the
start on the full-fidelity loss. Seeded; ``generations`` bounds the work.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from lwq.allocate.solvers import dp
from lwq.allocate.types import Allocation, LayerCandidates, allocation, check_layers, infeasible, min_bytes
from lwq.errors import BadInput
from lwq.spec import LayerSpec

Evaluate = Callable[[Mapping[str, LayerSpec], int], float]


def mutate(pos: np.ndarray, levels: list[np.ndarray], cap_bytes: int, rng: np.random.Generator,
           max_moves: int = 3, tries: int = 64) -> np.ndarray | None:
    """A mutant of ``pos`` (each layer's rank in its cost-sorted candidates) within the cap: up to
    ``max_moves`` times raise a random layer one level and lower random others one level until the
    total fits; ``None`` when no such move was found."""
    child = pos.copy()
    total = int(sum(lv[p] for lv, p in zip(levels, child)))
    n = len(levels)
    moved = False
    for _ in range(int(rng.integers(1, max_moves + 1))):
        ups = [i for i in range(n) if child[i] < len(levels[i]) - 1]
        if not ups:
            break
        up = int(rng.choice(ups))
        trial, t = child.copy(), total + int(levels[up][child[up] + 1] - levels[up][child[up]])
        trial[up] += 1
        for _ in range(tries):
            if t <= cap_bytes:
                break
            downs = [i for i in range(n) if i != up and trial[i] > 0]
            if not downs:
                break
            d = int(rng.choice(downs))
            t -= int(levels[d][trial[d]] - levels[d][trial[d] - 1])
            trial[d] -= 1
        if t <= cap_bytes:
            child, total, moved = trial, t, True
    return child if moved and not np.array_equal(child, pos) else None


def search(layers: Sequence[LayerCandidates], cap_bytes: int, evaluate: Evaluate, *,
           start: Allocation | None = None, generations: int = 20, offspring: int = 8, survivors: int = 2,
           fidelity: int = 4096, low_fidelity: int | None = None, max_moves: int = 3,
           seed: int = 0) -> tuple[Allocation, list[dict]]:
    """Improve ``start`` (default: the ``dp`` plan) under ``cap_bytes`` with ``evaluate(plan,
    fidelity) -> loss`` (lower is better); returns the best allocation and one history row per generation."""
    check_layers(layers, need_errors=start is None)
    if cap_bytes < min_bytes(layers):
        raise infeasible(layers, cap_bytes, min_bytes(layers))
    if start is None:
        start = dp.solve(layers, cap_bytes)
    if start.total_bytes > cap_bytes or len(start.index) != len(layers):
        raise BadInput("search: the start plan does not match the layers or exceeds the cap")
    if generations < 0 or offspring < 1 or survivors < 1 or fidelity < 1:
        raise BadInput("search: generations >= 0, offspring >= 1, survivors >= 1 and fidelity >= 1 are required")
    low = low_fidelity or max(1, fidelity // 8)
    order = [sorted(range(len(lc.candidates)), key=lambda k, lc=lc: (lc.candidates[k].cost_bytes, k)) for lc in layers]
    levels = [np.array([lc.candidates[k].cost_bytes for k in o], dtype=np.int64) for lc, o in zip(layers, order)]
    rank = [{k: r for r, k in enumerate(o)} for o in order]

    def plan(pos: np.ndarray) -> dict[str, LayerSpec]:
        return {lc.name: lc.candidates[order[i][p]].spec for i, (lc, p) in enumerate(zip(layers, pos))}

    rng = np.random.default_rng(seed)
    parent = np.array([rank[i][k] for i, k in enumerate(start.index)], dtype=np.int64)
    parent_loss = float(evaluate(plan(parent), fidelity))
    seen = {parent.tobytes()}
    evals = 1
    history = [{"generation": 0, "loss": parent_loss, "total_bytes": start.total_bytes, "evaluations": evals,
                "improved": False}]
    for gen in range(1, generations + 1):
        children: list[np.ndarray] = []
        for _ in range(offspring * 10):
            if len(children) == offspring:
                break
            child = mutate(parent, levels, cap_bytes, rng, max_moves)
            if child is not None and child.tobytes() not in seen:
                seen.add(child.tobytes())
                children.append(child)
        screened = sorted(((float(evaluate(plan(c), low)), j) for j, c in enumerate(children)))[:survivors]
        evals += len(children)
        best_loss, best = parent_loss, None
        for _, j in screened:
            loss = float(evaluate(plan(children[j]), fidelity))
            evals += 1
            if loss < best_loss:
                best_loss, best = loss, children[j]
        if best is not None:
            parent, parent_loss = best, best_loss
        history.append({"generation": gen, "loss": parent_loss,
                        "total_bytes": int(sum(lv[p] for lv, p in zip(levels, parent))),
                        "evaluations": evals, "improved": best is not None})
    index = [order[i][p] for i, p in enumerate(parent)]
    result = allocation(layers, index, "search", loss=parent_loss, start_loss=history[0]["loss"],
                        evaluations=evals, history=history)
    return result, history


def solve(layers: Sequence[LayerCandidates], cap_bytes: int, *, evaluate: Evaluate | None = None,
          start: Allocation | None = None, generations: int = 20, offspring: int = 8, survivors: int = 2,
          fidelity: int = 4096, low_fidelity: int | None = None, max_moves: int = 3, seed: int = 0) -> Allocation:
    """``search`` as a registered solver: the history is in ``info["history"]``."""
    if evaluate is None:
        raise BadInput("the search solver needs an evaluate(plan, fidelity) -> loss function")
    return search(layers, cap_bytes, evaluate, start=start, generations=generations, offspring=offspring,
                  survivors=survivors, fidelity=fidelity, low_fidelity=low_fidelity, max_moves=max_moves,
                  seed=seed)[0]
