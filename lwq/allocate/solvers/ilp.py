"""``ilp``: the allocation as a mixed-integer program solved exactly by HiGHS (``highspy``), with the
constraints users ask for.

Binary ``x[i, k]`` = layer ``i`` takes candidate ``k``; one candidate per layer; exact byte row
``sum cost * x <= cap``; minimise the summed error. Constraints: ``tie_groups`` (lists of names that
must share one bit width: all linears of a block, or the fused shards q/k/v and gate/up that serving
engines need), ``pinned`` (name -> the spec it must get, one of its candidates) and ``floor_bits``
(a minimum width, global or per name).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Mapping, Sequence

import numpy as np

from lwq.allocate.types import Allocation, LayerCandidates, allocation, check_layers, infeasible
from lwq.errors import BadInput, LwqError
from lwq.spec import LayerSpec

MAX_RETRIES = 4


def _highspy():
    try:
        import highspy
    except ImportError:
        raise LwqError("the ilp solver needs HiGHS: pip install highspy (or pip install 'lwq[ilp]')") from None
    return highspy


@contextlib.contextmanager
def _stdout_to_devnull() -> Iterator[None]:
    """HiGHS prints a banner on stdout when constructed (before options apply); keep stdout clean for --json."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def allowed_mask(layers: Sequence[LayerCandidates], pinned: Mapping[str, LayerSpec] | None,
                 floor_bits: int | Mapping[str, int] | None) -> list[np.ndarray]:
    """Per layer, which candidates the pins and floors allow; a layer left with none is an error."""
    names = {lc.name for lc in layers}
    for name in list(pinned or {}) + (list(floor_bits) if isinstance(floor_bits, Mapping) else []):
        if name not in names:
            raise BadInput(f"ilp: constraint names unknown layer {name!r}")
    out = []
    for lc in layers:
        ok = np.ones(len(lc.candidates), dtype=bool)
        floor = floor_bits.get(lc.name) if isinstance(floor_bits, Mapping) else floor_bits
        if floor is not None:
            ok &= np.array([c.spec.bits >= floor for c in lc.candidates])
        if pinned and lc.name in pinned:
            ok &= np.array([c.spec == pinned[lc.name] for c in lc.candidates])
            if not ok.any():
                raise BadInput(f"ilp: layer {lc.name} is pinned to {pinned[lc.name].label}, which is not one of its "
                               f"candidates ({', '.join(c.spec.label for c in lc.candidates)}) or is below its floor")
        if not ok.any():
            raise BadInput(f"ilp: no candidate of layer {lc.name} meets its floor of {floor} bits")
        out.append(ok)
    return out


def _milp(layers: Sequence[LayerCandidates], allowed: list[np.ndarray], objective: np.ndarray,
          cap_bytes: int | None, ties: list[list[int]]) -> list[int] | None:
    """Solve one MILP; the chosen candidate per layer, or ``None`` when infeasible."""
    highspy = _highspy()
    offsets = np.cumsum([0] + [len(lc.candidates) for lc in layers])
    n = int(offsets[-1])
    rows: list[tuple[list[int], list[float], float, float]] = []
    for i in range(len(layers)):
        rows.append((list(range(offsets[i], offsets[i + 1])), [1.0] * (offsets[i + 1] - offsets[i]), 1.0, 1.0))
    if cap_bytes is not None:
        scale = float(max(cap_bytes, 1))
        cost = [c.cost_bytes / scale for lc in layers for c in lc.candidates]
        rows.append((list(range(n)), cost, -np.inf, cap_bytes / scale))
    for group in ties:
        first = group[0]
        widths = sorted({c.spec.bits for i in group for c in layers[i].candidates})
        for other in group[1:]:
            for b in widths:
                idx, val = [], []
                for i, sign in ((other, 1.0), (first, -1.0)):
                    for k, c in enumerate(layers[i].candidates):
                        if c.spec.bits == b:
                            idx.append(int(offsets[i] + k))
                            val.append(sign)
                if idx:
                    rows.append((idx, val, 0.0, 0.0))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, len(rows)
    lp.col_cost_ = np.asarray(objective, dtype=np.float64)
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = np.concatenate(allowed).astype(np.float64)
    lp.row_lower_ = np.array([r[2] for r in rows], dtype=np.float64)
    lp.row_upper_ = np.array([r[3] for r in rows], dtype=np.float64)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.cumsum([0] + [len(r[0]) for r in rows]).astype(np.int32)
    lp.a_matrix_.index_ = np.array([j for r in rows for j in r[0]], dtype=np.int32)
    lp.a_matrix_.value_ = np.array([v for r in rows for v in r[1]], dtype=np.float64)
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n
    with _stdout_to_devnull():
        h = highspy.Highs()
    for key, val in (("output_flag", False), ("mip_rel_gap", 0.0), ("mip_abs_gap", 0.0),
                     ("mip_feasibility_tolerance", 1e-9), ("primal_feasibility_tolerance", 1e-9)):
        h.setOptionValue(key, val)
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return None
    if status != highspy.HighsModelStatus.kOptimal:
        raise LwqError(f"ilp: HiGHS stopped without an optimum ({h.modelStatusToString(status)})")
    x = np.asarray(h.getSolution().col_value)
    return [int(np.argmax(x[offsets[i]:offsets[i + 1]])) for i in range(len(layers))]


def resolve_ties(layers: Sequence[LayerCandidates], tie_groups: Sequence[Sequence[str]] | None) -> list[list[int]]:
    """Layer indices per tie group (groups of one are dropped); unknown names are an error."""
    pos = {lc.name: i for i, lc in enumerate(layers)}
    out = []
    for g in tie_groups or ():
        unknown = [n for n in g if n not in pos]
        if unknown:
            raise BadInput(f"ilp: tie group names unknown layer {unknown[0]!r}")
        if len(g) > 1:
            out.append([pos[n] for n in g])
    return out


def solve(layers: Sequence[LayerCandidates], cap_bytes: int, *, tie_groups: Sequence[Sequence[str]] | None = None,
          pinned: Mapping[str, LayerSpec] | None = None,
          floor_bits: int | Mapping[str, int] | None = None) -> Allocation:
    """Least summed error within ``cap_bytes`` under the constraints (exact, by HiGHS)."""
    check_layers(layers)
    allowed = allowed_mask(layers, pinned, floor_bits)
    ties = resolve_ties(layers, tie_groups)
    errors = np.array([c.error for lc in layers for c in lc.candidates], dtype=np.float64)
    spread = float(np.abs(errors).max()) or 1.0
    cap = int(cap_bytes)
    for _ in range(MAX_RETRIES):
        index = _milp(layers, allowed, errors / spread, cap, ties)
        if index is None and cap != cap_bytes:
            raise LwqError(f"ilp: HiGHS could not meet the cap of {cap_bytes} bytes within its tolerance")
        if index is None:
            costs = np.array([c.cost_bytes for lc in layers for c in lc.candidates], dtype=np.float64)
            cheapest = _milp(layers, allowed, costs / costs.max(), None, ties)
            if cheapest is None:
                raise BadInput("ilp: the constraints contradict each other (pins, floors and tie groups "
                               "leave no plan at any budget)")
            smallest = sum(lc.candidates[k].cost_bytes for lc, k in zip(layers, cheapest))
            raise infeasible(layers, cap_bytes, smallest, "under these constraints")
        total = sum(lc.candidates[k].cost_bytes for lc, k in zip(layers, index))
        if total <= cap_bytes:
            return allocation(layers, index, "ilp", tie_groups=len(ties), pinned=len(pinned or {}))
        cap -= total - cap_bytes  # a tolerance-sized overshoot: tighten and solve again
    raise LwqError(f"ilp: HiGHS kept exceeding the cap of {cap_bytes} bytes by its tolerance")
