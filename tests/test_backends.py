"""Backends: RTN error bound, GPTQ against RTN on a synthetic Hessian, act-order g_idx, bitsandbytes."""
from __future__ import annotations

import pytest
import torch

from lwq.backends import BACKENDS, bnb_status, get_backend, quantize_weight
from lwq.backends.gptq import gptq_quantize
from lwq.backends.quant import QParams, dequantize
from lwq.errors import BadInput, LwqError
from lwq.formats.layouts import get_layout
from lwq.spec import LayerSpec, make_spec

FP16_EPS = 2.0**-11  # relative rounding of the float16 scales the checkpoint stores


def deq(qw):
    return dequantize(qw.q, QParams(qw.scale, qw.zero), qw.g_idx)


def correlated_problem(out_f=48, in_f=256, n=2048, seed=0):
    """A weight and ``H = X^T X`` from inputs with strongly correlated, unequally scaled channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    X = torch.randn(n, 32, generator=g) @ torch.randn(32, in_f, generator=g) + 0.1 * torch.randn(n, in_f, generator=g)
    X = (X @ mix) * torch.linspace(0.2, 3.0, in_f)
    return W, X.t() @ X


def output_error(W, Wq, H):
    dW = (W - Wq).double()
    return float(torch.trace(dW @ H.double() @ dW.t()))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_within_half_a_step(bits, group_size, sym):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(24, 192, generator=g) * torch.rand(24, 1, generator=g)
    qw = get_backend("rtn")(W, LayerSpec(bits=bits, group_size=group_size, sym=sym))
    assert qw.q.min() >= 0 and qw.q.max() < 2**bits
    step = qw.scale[:, qw.g_idx.long()]
    bound = step / 2 + step * (2**bits - 1) * FP16_EPS + 1e-6
    assert bool(((deq(qw) - W).abs() <= bound).all())
    expected_groups = 1 if group_size == -1 else -(-192 // group_size)  # ragged last group for 128
    assert qw.scale.shape == (24, expected_groups)
    assert torch.equal(qw.g_idx, torch.arange(192, dtype=torch.int32) // (192 if group_size == -1 else group_size))


def test_rtn_mse_clipping_lowers_error_on_heavy_tails():
    torch.manual_seed(0)  # StudentT samples from the global generator
    W = torch.distributions.StudentT(2.0).sample((32, 256))
    spec = LayerSpec(bits=3, group_size=128)
    plain = (deq(get_backend("rtn")(W, spec)) - W).pow(2).sum()
    mse = (deq(get_backend("rtn-mse")(W, spec.replace(backend="rtn-mse"))) - W).pow(2).sum()
    assert mse < plain


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_beats_rtn_on_output_error(bits, act_order, static):
    W, H = correlated_problem()
    spec = LayerSpec(bits=bits, group_size=64, backend="gptq", act_order=act_order)
    rtn = output_error(W, deq(get_backend("rtn")(W, spec.replace(backend="rtn", act_order=False))), H)
    gptq = output_error(W, deq(gptq_quantize(W, H, spec, static_groups=static)), H)
    assert gptq < 0.8 * rtn


def test_gptq_with_identity_hessian_is_rtn():
    # no correlation: nothing to compensate, GPTQ must pick exactly the round-to-nearest codes
    W, _ = correlated_problem(in_f=192)
    spec = LayerSpec(bits=4, group_size=128, backend="gptq")
    g = gptq_quantize(W, torch.eye(192), spec, blocksize=64)
    r = get_backend("rtn")(W, spec.replace(backend="rtn"))
    assert torch.equal(g.q, r.q) and torch.equal(g.zero, r.zero) and torch.allclose(g.scale, r.scale)


def test_gptq_ragged_groups_and_blocks():
    W, H = correlated_problem(in_f=192)
    qw = gptq_quantize(W, H, LayerSpec(bits=4, group_size=128, backend="gptq"), blocksize=48)
    assert qw.scale.shape == (48, 2)
    assert torch.equal(qw.g_idx, torch.arange(192, dtype=torch.int32) // 128)


def test_act_order_g_idx_is_a_consistent_mapping():
    W, H = correlated_problem(in_f=192)
    gs = 64
    qw = gptq_quantize(W, H, LayerSpec(bits=3, group_size=gs, backend="gptq", act_order=True))
    order = torch.argsort(torch.diag(H), descending=True)
    # groups are consecutive runs of gs columns in the act-order permutation
    assert torch.equal(qw.g_idx[order].long(), torch.arange(192) // gs)
    assert not torch.equal(qw.g_idx, torch.arange(192, dtype=torch.int32) // gs)  # really permuted here
    # dequantization through g_idx is exact, and the stored layout reproduces it
    manual = torch.stack([qw.scale[:, int(g)] * (qw.q[:, i].float() - qw.zero[:, int(g)].float())
                          for i, g in enumerate(qw.g_idx)], dim=1)
    assert torch.equal(deq(qw), manual)
    layout = get_layout("gptq")
    stored = layout.dequantize(layout.pack(qw), qw.spec, qw.shape)
    assert torch.equal(stored, deq(qw))  # scales were chosen as float16 values


def test_gptq_static_groups_keep_natural_g_idx():
    W, H = correlated_problem(in_f=192)
    qw = gptq_quantize(W, H, LayerSpec(bits=4, group_size=64, backend="gptq", act_order=True), static_groups=True)
    assert torch.equal(qw.g_idx, torch.arange(192, dtype=torch.int32) // 64)


def test_gptq_dead_columns_and_rank_deficient_hessian():
    W, _ = correlated_problem(in_f=64)
    X = torch.randn(16, 64)  # fewer samples than columns: H is singular, dampening makes it PD
    X[:, 5] = 0
    qw = gptq_quantize(W, X.t() @ X, LayerSpec(bits=4, group_size=32, backend="gptq"))
    assert torch.all(deq(qw)[:, 5] == 0)
    assert torch.isfinite(deq(qw)).all()


def test_gptq_refuses_bad_inputs():
    W = torch.randn(8, 32)
    with pytest.raises(LwqError, match="positive definite"):
        gptq_quantize(W, -torch.eye(32), LayerSpec(bits=4, group_size=32, backend="gptq"))
    with pytest.raises(BadInput, match="Hessian shape"):
        gptq_quantize(W, torch.eye(16), LayerSpec(bits=4, group_size=32, backend="gptq"))
    with pytest.raises(BadInput, match="calibration"):
        get_backend("gptq")(W, LayerSpec(bits=4, backend="gptq"))


def test_registry_and_fp16_passthrough():
    assert {"rtn", "rtn-mse", "gptq", "bnb-nf4", "bnb-fp4", "bnb-int8"} <= set(BACKENDS.names())
    with pytest.raises(BadInput, match="valid: .*gptq"):
        get_backend("nope")
    W = torch.randn(4, 8)
    qw = quantize_weight(W, make_spec(16))
    assert qw.q is None and torch.equal(qw.extra["weight"], W.half())


needs_bnb = pytest.mark.skipif(bnb_status() is not None, reason=f"bitsandbytes unusable: {bnb_status()}")


@needs_bnb
@pytest.mark.parametrize("backend", ["bnb-nf4", "bnb-fp4"])
def test_bnb_4bit_matches_bitsandbytes(backend):
    import bitsandbytes.functional as F

    W = torch.randn(40, 172)  # 6880 weights: the last 64-block is partial
    spec = make_spec(4, 64, backend=backend)
    qw = get_backend(backend)(W, spec)
    layout = get_layout("bnb")
    t = layout.pack(qw)
    ours = layout.dequantize(t, spec, (40, 172))
    _, state = F.quantize_4bit(W, blocksize=64, quant_type=backend[4:])
    theirs = F.dequantize_4bit(t["qweight"].reshape(-1, 1), state)
    assert torch.allclose(ours, theirs, atol=1e-6)
    rel = (ours - W).norm() / W.norm()
    assert 0.01 < rel < 0.2  # a real 4-bit error: neither exact nor garbage
    assert layout.cost(40, 172, spec) == sum(v.numel() * v.element_size() for v in t.values())


@needs_bnb
def test_bnb_int8_row_absmax():
    W = torch.randn(16, 96) * torch.linspace(0.1, 4, 16)[:, None]
    spec = make_spec(8, -1, backend="bnb-int8")
    qw = get_backend("bnb-int8")(W, spec)
    layout = get_layout("bnb")
    t = layout.pack(qw)
    back = layout.dequantize(t, spec, (16, 96))
    step = W.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((back - W).abs() <= step / 2 + 1e-6).all())
    assert t["qweight"].dtype == torch.int8
    assert layout.cost(16, 96, spec) == sum(v.numel() * v.element_size() for v in t.values())


@needs_bnb
def test_bnb_refuses_wrong_bits():
    with pytest.raises(BadInput, match="4-bit"):
        get_backend("bnb-nf4")(torch.randn(4, 64), LayerSpec(bits=3, backend="bnb-nf4", format="bnb"))
