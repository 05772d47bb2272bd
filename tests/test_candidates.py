"""Candidates: exact costs from the layouts, importance/Hessian/measured error estimates, the error DB."""
from __future__ import annotations

import json

import pytest
import torch

from lwq.allocate.candidates import (ErrorDB, db_errors, fill_error_db,
                                     load_error_db, make_candidates, save_error_db, spec_key, with_importance)
from lwq.backends.quant import rtn_fake_quant
from lwq.errors import BadInput
from lwq.formats.bytes import layer_bytes
from lwq.score.hessian import hessian_error, hessian_errors
from lwq.spec import make_spec

SHAPES = {"a.q_proj": (64, 192), "a.down_proj": (192, 512)}
BITS = (2, 3, 4, 8)


def test_make_candidates_exact_costs_in_order():
    layers = make_candidates(SHAPES, bits=(8, 2, 4, 3), backend="gptq", group_size=128, extra_specs=[make_spec(16)])
    assert [lc.name for lc in layers] == list(SHAPES)
    for lc in layers:
        o, i = SHAPES[lc.name]
        assert lc.shape == (o, i) and lc.numel == o * i and lc.importance is None
        assert [c.spec.bits for c in lc.candidates] == [2, 3, 4, 8, 16]
        for c in lc.candidates:
            assert c.cost_bytes == layer_bytes(o, i, c.spec)
            if c.spec.bits < 16:
                assert c.spec.backend == "gptq" and c.spec.group_size == 128 and c.spec.format == "gptq"
        costs = [c.cost_bytes for c in lc.candidates]
        assert costs == sorted(costs)
        assert costs[-1] == 2 * o * i  # 16-bit: the plain fp16 weight


def test_with_importance_scales_by_bits():
    layers = with_importance(make_candidates(SHAPES, BITS), {"a.q_proj": 2.0, "a.down_proj": 0.5})
    assert layers[0].importance == 2.0
    assert [c.error for c in layers[0].candidates] == [2.0 / 4**b for b in BITS]
    with pytest.raises(BadInput, match="a.down_proj"):
        with_importance(make_candidates(SHAPES, BITS), {"a.q_proj": 1.0})


def test_hessian_error_equals_output_error():
    torch.manual_seed(0)
    W = torch.randn(64, 192)
    X = torch.randn(300, 192)
    H = X.T @ X
    spec = make_spec(3, 64)
    dW = W - rtn_fake_quant(W, 3, 64)
    direct = float(((X @ dW.T) ** 2).sum())  # || X dW^T ||_F^2 = trace(dW H dW^T)
    assert hessian_error(W, H, spec.bits, spec.group_size, spec.sym) == pytest.approx(direct, rel=1e-4)
    sixteen = hessian_errors(make_candidates({"a.q_proj": (64, 192)}, (3, 16), "rtn", 64),
                             {"a.q_proj": W}, {"a.q_proj": H})
    assert [c.error for c in sixteen[0].candidates] == [pytest.approx(direct, rel=1e-4), 0.0]


def test_hessian_errors_fall_with_bits_and_check_shapes():
    torch.manual_seed(1)
    layers = make_candidates(SHAPES, BITS)
    weights = {n: torch.randn(o, i) for n, (o, i) in SHAPES.items()}
    hess = {n: (lambda X: X.T @ X)(torch.randn(256, i)) for n, (o, i) in SHAPES.items()}
    filled = hessian_errors(layers, weights, hess)
    for lc in filled:
        errs = [c.error for c in lc.candidates]
        assert all(e > 0 for e in errs) and errs == sorted(errs, reverse=True)
    with pytest.raises(BadInput, match="do not match"):
        hessian_errors(layers, {**weights, "a.q_proj": torch.randn(3, 3)}, hess)
    with pytest.raises(BadInput, match="no weight or Hessian"):
        hessian_errors(layers, weights, {})


def test_error_db_fill_reuse_save_load(tmp_path):
    layers = make_candidates(SHAPES, BITS)
    calls = []

    def measure(name, spec):
        calls.append((name, spec.bits))
        return len(name) / spec.bits

    db = fill_error_db(ErrorDB(meta={"model": "toy"}), layers, measure)
    assert len(calls) == 8
    filled = db_errors(layers, db)
    assert [c.error for c in filled[0].candidates] == [len("a.q_proj") / b for b in BITS]
    path = tmp_path / "db.json"
    save_error_db(db, path)
    again = load_error_db(path)
    assert again.meta == {"model": "toy"} and again.entries == db.entries
    more = make_candidates(SHAPES, BITS, group_size=64)
    fill_error_db(again, layers, measure)
    assert len(calls) == 8  # everything reused across budgets
    fill_error_db(again, more, measure)
    assert len(calls) == 16  # a new group size is a new spec key
    with pytest.raises(BadInput, match="no entry"):
        db_errors(more, again)
    assert spec_key(make_spec(4, 128)) != spec_key(make_spec(4, 128, act_order=True))


def test_error_db_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1,\n "entries": {"x": {"k": }}}')
    with pytest.raises(BadInput, match=r"bad.json:2:\d+: invalid JSON"):
        load_error_db(bad)
    bad.write_text(json.dumps({"version": 1, "entries": {"x": {"k": "big"}}}))
    with pytest.raises(BadInput, match="finite number"):
        load_error_db(bad)
    bad.write_text(json.dumps({"entries": {}}))
    with pytest.raises(BadInput, match="not an lwq error database"):
        load_error_db(bad)
    with pytest.raises(BadInput, match="no such"):
        load_error_db(tmp_path / "missing.json")


def test_both_grids_offer_each_width_with_and_without_zero_points():
    layers = make_candidates(SHAPES, (2, 4), "gptq", 64, (False, True))
    for lc in layers:
        assert [(c.spec.bits, c.spec.sym) for c in lc.candidates] == [(2, False), (2, True), (4, False), (4, True)]
        for asym, sym in zip(lc.candidates[::2], lc.candidates[1::2]):  # no zero points: fewer bytes
            assert sym.cost_bytes < asym.cost_bytes
            assert sym.cost_bytes == layer_bytes(*lc.shape, sym.spec)
    one = make_candidates(SHAPES, (2, 4), "gptq", 64, True)
    assert [c.spec for c in one[0].candidates] == [c.spec for c in layers[0].candidates[1::2]]
    w4a8 = make_candidates(SHAPES, (4,), "gptq", 64, (False, True), act_bits=8)  # int8 activations force sym
    assert [c.spec.sym for c in w4a8[0].candidates] == [True]
    with pytest.raises(BadInput, match="grid"):
        make_candidates(SHAPES, (4,), "gptq", 64, ())
