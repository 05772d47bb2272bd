"""Solvers on toy cost/error tables: known optima, ties, infeasible caps, brute-force agreement,
the cap never exceeded, ilp constraints, search never worse than its start."""
from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lwq.allocate import SOLVERS, allocate, run_solver
from lwq.allocate.groups import block_units, tie_groups
from lwq.allocate.solvers import dp, order, search
from lwq.allocate.types import Candidate, Infeasible, LayerCandidates
from lwq.errors import BadInput
from lwq.spec import make_spec

BITS = (2, 3, 4, 8)


def toy(costs, errors, bits=BITS, importance=None, numel=100):
    """Layers l0, l1, ... with candidate i of each layer at width ``bits[i]``."""
    out = []
    for i, (cs, es) in enumerate(zip(costs, errors)):
        cands = tuple(Candidate(make_spec(b), int(c), float(e)) for b, c, e in zip(bits, cs, es))
        out.append(LayerCandidates(f"l{i}", numel, (10, numel // 10), cands,
                                   None if importance is None else float(importance[i])))
    return out


def random_layers(rng, n_layers, n_cands, lo=1, hi=200, monotone=True):
    costs, errors = [], []
    for _ in range(n_layers):
        c = np.sort(rng.choice(np.arange(lo, hi), size=n_cands, replace=False))
        e = np.sort(rng.random(n_cands))[::-1] if monotone else rng.random(n_cands)
        costs.append(c)
        errors.append(e * rng.uniform(0.1, 10))
    return toy(costs, errors, BITS[:n_cands], importance=rng.random(n_layers))


def brute(layers, cap, allowed=None):
    """Least error (then least bytes) over all choices within ``cap`` that ``allowed(index)`` accepts."""
    best = None
    for idx in itertools.product(*(range(len(lc.candidates)) for lc in layers)):
        cost = sum(lc.candidates[k].cost_bytes for lc, k in zip(layers, idx))
        if cost > cap or (allowed is not None and not allowed(idx)):
            continue
        err = sum(lc.candidates[k].error for lc, k in zip(layers, idx))
        if best is None or (err, cost) < (best[0] - 1e-12, best[1]):
            best = (err, cost, idx)
    return best


KNOWN = toy([[10, 20, 40], [10, 20, 40]], [[100, 10, 1], [8, 4, 2]], BITS[:3], importance=[2.0, 1.0])


@pytest.mark.parametrize("name", ["dp", "ilp", "order"])
def test_known_optimum(name):
    a = run_solver(name, KNOWN, 60)
    assert a.index == (2, 1)  # l0 at 4 bits, l1 at 3 bits: error 1 + 4 = 5 at 60 bytes
    assert a.total_bytes == 60 and a.total_error == pytest.approx(5.0)
    assert a.specs["l0"].bits == 4 and a.specs["l1"].bits == 3
    assert a.bits_per_weight == pytest.approx(8 * 60 / 200)


def test_dp_and_ilp_at_generous_and_tight_caps():
    for name in ("dp", "ilp"):
        assert run_solver(name, KNOWN, 10**6).index == (2, 2)
        assert run_solver(name, KNOWN, 20).index == (0, 0)
        assert run_solver(name, KNOWN, 39).index == (1, 0)  # 30 bytes: l0's 3-bit saves 90 vs l1's 4


def test_ties_pick_an_optimum_and_dp_prefers_fewer_bytes():
    twins = toy([[10, 20], [10, 20]], [[5, 1], [5, 1]], BITS[:2])
    for name in ("dp", "ilp"):
        a = run_solver(name, twins, 35)
        assert a.total_error == pytest.approx(6.0) and a.total_bytes == 30
    flat = toy([[10, 20], [10, 30]], [[3, 3], [2, 2]], BITS[:2])  # more bytes buy nothing
    a = dp.solve(flat, 100)
    assert a.index == (0, 0) and a.total_bytes == 20


@pytest.mark.parametrize("name", ["dp", "ilp", "order", "random"])
def test_infeasible_cap_states_minimum(name):
    with pytest.raises(Infeasible) as e:
        run_solver(name, KNOWN, 19)
    assert e.value.min_bytes == 20
    assert "20 bytes" in str(e.value) and "\n" not in str(e.value)


def test_dp_equals_brute_force_on_random_small_cases():
    rng = np.random.default_rng(0)
    for case in range(50):
        layers = random_layers(rng, 6, 4, monotone=case % 2 == 0)
        lo = sum(lc.candidates[0].cost_bytes for lc in layers)
        hi = sum(lc.candidates[-1].cost_bytes for lc in layers)
        cap = int(rng.integers(lo, hi + 1))
        a = dp.solve(layers, cap)
        assert a.info["unit"] == 1
        err, _, _ = brute(layers, cap)
        assert a.total_bytes <= cap
        assert a.total_error == pytest.approx(err, rel=1e-9, abs=1e-12)


def test_dp_coarse_units_stay_under_cap_and_within_tolerance():
    rng = np.random.default_rng(1)
    for _ in range(15):
        layers = random_layers(rng, 6, 4, lo=100_000, hi=5_000_000)
        lo = sum(lc.candidates[0].cost_bytes for lc in layers)
        hi = sum(lc.candidates[-1].cost_bytes for lc in layers)
        cap = int(rng.integers(lo, hi))
        a = dp.solve(layers, cap)
        assert a.info["unit"] > 1  # rounding really happens
        assert a.total_bytes <= cap
        tighter = brute(layers, int(cap * (1 - 0.005)))
        if tighter is not None:  # at least as good as the exact optimum 0.5% below the cap
            assert a.total_error <= tighter[0] + 1e-9
        assert a.total_error >= brute(layers, cap)[0] - 1e-9  # and never better than the exact optimum


def test_dp_rounding_margin_falls_back_to_cheapest_plan():
    layers = toy([[1001, 3000], [1001, 3000]], [[2, 1], [2, 1]], BITS[:2])
    a = dp.solve(layers, 2002, unit=1000)  # ceil(1001/1000) = 2 units each: 4 units > 2
    assert a.index == (0, 0) and a.total_bytes == 2002


def test_order_promotes_most_important_prefix_and_never_exceeds_cap():
    rng = np.random.default_rng(2)
    for _ in range(40):
        layers = random_layers(rng, 8, 4)
        costs = {b: sum(lc.candidates[BITS.index(b)].cost_bytes for lc in layers) for b in BITS}
        cap = int(rng.integers(costs[2], costs[8] + 50))
        a = order.solve(layers, cap)
        assert a.total_bytes <= cap
        lo, hi = a.info["levels"]
        assert costs[lo] <= cap and (lo == hi or costs[hi] > cap)
        bits = [a.specs[lc.name].bits for lc in layers]
        assert set(bits) <= {lo, hi}
        rank = sorted(range(8), key=lambda i: -layers[i].importance)
        k = a.info["promoted"]
        if lo != hi:
            assert [bits[i] for i in rank] == [hi] * k + [lo] * (8 - k)
            if k < 8:  # the next one really did not fit
                nxt = rank[k]
                assert a.total_bytes + layers[nxt].candidates[BITS.index(hi)].cost_bytes \
                    - layers[nxt].candidates[BITS.index(lo)].cost_bytes > cap


def test_order_units_fill_and_levels():
    layers = toy([[10, 20, 40, 80]] * 4, [[0, 0, 0, 0]] * 4, importance=[1, 4, 3, 2])
    a = order.solve(layers, 120, units=[["l0", "l1"], ["l2", "l3"]])  # unit means 2.5 vs 2.5: tie -> first
    assert [a.specs[f"l{i}"].bits for i in range(4)] == [4, 4, 3, 3]
    a = order.solve(layers, 70, levels=(2, 8))
    assert [a.specs[f"l{i}"].bits for i in range(4)] == [2, 2, 2, 2]  # 8-bit promotion costs 70 > 30 left
    uneven = toy([[10, 20], [10, 100], [10, 20]], [[0, 0]] * 3, BITS[:2], importance=[1, 3, 2])
    assert order.solve(uneven, 50).specs["l0"].bits == 2
    assert order.solve(uneven, 50, fill=True).specs["l0"].bits == 3  # skips l1 (too big), fills l2 then l0
    with pytest.raises(BadInput, match="importance"):
        order.solve(toy([[1, 2]], [[1, 0]], BITS[:2]), 10)


def test_random_order_is_seeded():
    layers = toy([[10, 20]] * 10, [[1, 0]] * 10, BITS[:2])
    a, b = run_solver("random", layers, 150, seed=3), run_solver("random", layers, 150, seed=3)
    assert a.index == b.index and a.total_bytes <= 150 and sum(a.index) == 5
    assert any(run_solver("random", layers, 150, seed=s).index != a.index for s in range(4, 10))


def _constraint_cases(rng):
    for _ in range(12):
        layers = random_layers(rng, 5, 3, monotone=False)
        lo = sum(lc.candidates[0].cost_bytes for lc in layers)
        hi = sum(lc.candidates[-1].cost_bytes for lc in layers)
        yield layers, int(rng.integers(lo, hi + 1))


def test_dp_with_tie_groups_equals_brute_force():
    """dp on merged tie units is exact: the tied layers share a spec and no tied plan is better."""
    rng = np.random.default_rng(11)
    for layers, cap in _constraint_cases(rng):
        bits = lambda i, k: layers[i].candidates[k].spec.bits  # noqa: E731

        def ok(idx):
            return bits(0, idx[0]) == bits(1, idx[1]) == bits(2, idx[2]) and bits(3, idx[3]) == bits(4, idx[4])

        want = brute(layers, cap, ok)
        if want is None:
            with pytest.raises(BadInput):
                run_solver("dp", layers, cap, tie_groups=[["l0", "l1", "l2"], ["l3", "l4"]], unit=1)
            continue
        a = run_solver("dp", layers, cap, tie_groups=[["l0", "l1", "l2"], ["l3", "l4"]], unit=1)
        assert ok(a.index) and a.total_bytes <= cap and a.info["tie_groups"] == 2
        assert a.total_error == pytest.approx(want[0], rel=1e-7, abs=1e-9)
        assert set(a.specs) == {lc.name for lc in layers}
    with pytest.raises(BadInput, match="unknown layer 'nope'"):
        run_solver("dp", KNOWN, 60, tie_groups=[["l0", "nope"]])


def test_ilp_equals_brute_force_with_constraints():
    rng = np.random.default_rng(3)
    for layers, cap in _constraint_cases(rng):
        bits = lambda i, k: layers[i].candidates[k].spec.bits  # noqa: E731
        pin = layers[4].candidates[1].spec
        ties = [["l0", "l1", "l2"]]

        def ok(idx):
            return (bits(0, idx[0]) == bits(1, idx[1]) == bits(2, idx[2]) and idx[4] == 1 and bits(3, idx[3]) >= 3)

        want = brute(layers, cap, ok)
        try:
            a = run_solver("ilp", layers, cap, tie_groups=ties, pinned={"l4": pin}, floor_bits={"l3": 3})
        except Infeasible as e:
            assert want is None
            combos = itertools.product(*(range(len(lc.candidates)) for lc in layers))
            assert e.min_bytes == min(sum(layers[i].candidates[k].cost_bytes for i, k in enumerate(idx))
                                      for idx in combos if ok(idx))
            continue
        assert want is not None and ok(a.index) and a.total_bytes <= cap
        assert a.total_error == pytest.approx(want[0], rel=1e-7, abs=1e-9)
        free = brute(layers, cap)
        assert run_solver("ilp", layers, cap).total_error == pytest.approx(free[0], rel=1e-7, abs=1e-9)


def test_ilp_global_floor_and_bad_constraints():
    a = run_solver("ilp", KNOWN, 10**6, floor_bits=3)
    assert all(s.bits >= 3 for s in a.specs.values())
    with pytest.raises(Infeasible):
        run_solver("ilp", KNOWN, 30, floor_bits=3)  # cheapest at >= 3 bits is 40 bytes
    with pytest.raises(BadInput, match="not one of its candidates"):
        run_solver("ilp", KNOWN, 100, pinned={"l0": make_spec(8)})
    with pytest.raises(BadInput, match="unknown layer"):
        run_solver("ilp", KNOWN, 100, tie_groups=[["l0", "nope"]])
    odd = toy([[10, 20], [10, 20]], [[1, 0], [1, 0]], (2, 4))
    odd = [odd[0], LayerCandidates("l1", 100, (10, 10),
                                   tuple(Candidate(make_spec(b), 10 * b, 1.0 / b) for b in (3, 8)))]
    with pytest.raises(BadInput, match="contradict"):
        run_solver("ilp", odd, 10**6, tie_groups=[["l0", "l1"]])  # no shared width


def synthetic_evaluate(true_errors, calls, cap, layers):
    """A loss from a hidden per-candidate table; low fidelity adds plan-dependent noise."""
    def evaluate(plan, fidelity):
        idx = tuple(next(k for k, c in enumerate(lc.candidates) if c.spec == plan[lc.name]) for lc in layers)
        cost = sum(lc.candidates[k].cost_bytes for lc, k in zip(layers, idx))
        calls.append((fidelity, cost))
        loss = sum(true_errors[i][k] for i, k in enumerate(idx))
        noise = (hash(idx) % 1000) / 1000 * 0.05 / fidelity
        return loss + noise
    return evaluate


def test_search_stays_under_cap_and_never_worse_than_start():
    rng = np.random.default_rng(4)
    improved = 0
    for case in range(6):
        layers = random_layers(rng, 8, 4)
        true = [rng.random(4)[np.argsort(-rng.random(4))] * rng.uniform(0.1, 10) for _ in layers]  # estimates mislead
        lo = sum(lc.candidates[0].cost_bytes for lc in layers)
        hi = sum(lc.candidates[-1].cost_bytes for lc in layers)
        cap = (lo + hi) // 2
        calls: list = []
        start = dp.solve(layers, cap)
        a, history = search.search(layers, cap, synthetic_evaluate(true, calls, cap, layers), generations=15,
                                   offspring=6, survivors=2, fidelity=16, seed=case)
        assert a.total_bytes <= cap
        assert all(cost <= cap for _, cost in calls)  # every evaluated plan was within the cap
        start_loss = sum(true[i][k] for i, k in enumerate(start.index))
        true_loss = sum(true[i][k] for i, k in enumerate(a.index))
        assert true_loss <= start_loss + 1e-12
        assert [h["loss"] for h in history] == sorted((h["loss"] for h in history), reverse=True)
        assert history[0]["loss"] == pytest.approx(start_loss, abs=0.01)
        assert {f for f, _ in calls} == {16, 2}  # screened at 16 // 8, confirmed at the full fidelity
        improved += true_loss < start_loss - 1e-9
    assert improved >= 3  # the estimate misleads dp; the real loss finds better plans


def test_search_is_seeded_and_registered():
    rng = np.random.default_rng(5)
    layers = random_layers(rng, 6, 4)
    cap = sum(lc.candidates[1].cost_bytes for lc in layers)
    true = [rng.random(4) for _ in layers]
    runs = [run_solver("search", layers, cap, evaluate=synthetic_evaluate(true, [], cap, layers), generations=5,
                       seed=7) for _ in range(2)]
    assert runs[0].index == runs[1].index
    assert runs[0].info["history"][-1]["generation"] == 5
    with pytest.raises(BadInput, match="evaluate"):
        run_solver("search", layers, cap)


def test_registry_and_option_errors():
    assert set(SOLVERS.names()) >= {"order", "dp", "ilp", "search", "random"}
    with pytest.raises(BadInput, match="solvers taking it: ilp"):
        run_solver("dp", KNOWN, 60, floor_bits={"l0": 3})
    with pytest.raises(BadInput, match="unknown solver"):
        allocate(KNOWN, "3bit", solver="nope")
    with pytest.raises(BadInput, match="error estimate"):
        dp.solve(toy([[1, 2]], [[float("nan"), 0]], BITS[:2]), 10)


def test_groups_for_blocks_and_fused_shards():
    names = [f"model.layers.{b}.{s}" for b in range(2) for s in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]
    groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    assert block_units(names, "model.layers") == [names[:7], names[7:]]
    fused = tie_groups(names, "model.layers", groups, "fused")
    assert fused == [names[0:3], names[4:6], names[7:10], names[11:13]]
    assert tie_groups(names, "model.layers", groups, "block") == [names[:7], names[7:]]
    assert tie_groups(names, "model.layers", groups, "none") == []


def test_dp_ilp_order_do_not_use_torch():
    root = Path(__file__).resolve().parent.parent / "lwq" / "allocate" / "solvers"
    for f in ("dp.py", "ilp.py", "order.py", "search.py"):
        assert "torch" not in (root / f).read_text()
    code = "import sys, lwq.allocate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
