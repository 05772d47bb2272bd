"""The W4A8 and INT6 storage layouts: round trips, exact byte costs, reference forwards, smoothing."""
from __future__ import annotations

import pytest
import torch

from helpers import rtn_quantized
from lwq.backends.base import QuantizedWeight
from lwq.backends.quant import QParams, dequantize, group_index
from lwq.errors import LwqError
from lwq.formats.bytes import layer_bytes
from lwq.formats.layouts import get_layout
from lwq.backends.smooth import smooth_factors, smooth_weight
from lwq.kernels.w4a8.reference import quantize_activations
from lwq.spec import LayerSpec, make_spec




def expected_weight(qw: QuantizedWeight) -> torch.Tensor:
    """What the layout must dequantize to: the grid with fp16 scales, divided by the smoothing factors."""
    W = dequantize(qw.q, QParams(qw.scale.half().float(), qw.zero), qw.g_idx)
    s = qw.extra.get("smooth")
    return W if s is None else W / s.half().float()[None, :]


SPECS = [
    make_spec(4, 32, act_bits=8), make_spec(4, 128, act_bits=8, act_order=True), make_spec(4, -1, act_bits=8),
    make_spec(6, 64), make_spec(6, 128, sym=True, act_order=True), make_spec(6, -1),
    make_spec(6, 32, act_bits=8), make_spec(6, 64, act_bits=8, act_order=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.label}-ao{int(s.act_order)}")
@pytest.mark.parametrize("shape", [(96, 192), (40, 172)])
def test_round_trip_cost_and_empty(spec, shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    smooth = torch.rand(shape[1]) + 0.5 if spec.act_bits == 8 else None
    qw = rtn_quantized(W, spec, smooth=smooth)
    layout = get_layout(spec.format)
    t = layout.pack(qw)
    nbytes = sum(v.numel() * v.element_size() for v in t.values())
    assert nbytes == layout.cost(*shape, spec) == layer_bytes(*shape, spec)
    torch.testing.assert_close(layout.dequantize(t, spec, shape), expected_weight(qw), rtol=1e-6, atol=1e-6)
    empty = layout.empty(spec, shape)
    assert {k: (v.shape, v.dtype) for k, v in empty.items()} == {k: (v.shape, v.dtype) for k, v in t.items()}
    assert ("perm" in t) == spec.act_order and ("smooth" in t) == (spec.act_bits == 8)


def test_int6_planes_hold_every_code():
    """All 64 codes at every position of a word pair survive pack + dequantize (bit-plane layout)."""
    spec = LayerSpec(bits=6, group_size=-1, format="int6")
    q = (torch.arange(64 * 48).reshape(64, 48) % 64).int()
    qw = QuantizedWeight(spec, q, torch.ones(64, 1), torch.zeros(64, 1, dtype=torch.int32), group_index(48, -1))
    t = get_layout("int6").pack(qw)
    assert torch.equal(get_layout("int6").dequantize(t, spec, (64, 48)), q.float())
    assert t["qweight_lo"].shape == (6, 64) and t["qweight_hi"].shape == (3, 64)


@pytest.mark.parametrize("spec", [make_spec(6, 64), make_spec(6, 32, sym=True, act_order=True)])
def test_w6a16_forward_matches_float(spec):
    W = torch.randn(64, 160, generator=torch.Generator().manual_seed(2))
    qw = rtn_quantized(W, spec, seed=3)
    layout = get_layout("int6")
    t = layout.pack(qw)
    x = torch.randn(5, 160)
    y = layout.forward(x, t, spec, (64, 160))
    torch.testing.assert_close(y, x @ expected_weight(qw).t(), rtol=1e-4, atol=1e-4)
    y16 = layout.forward(x.half(), t, spec, (64, 160))
    assert y16.dtype == torch.float16 and (y16.float() - y).abs().max() < 2e-3 * y.abs().max()


@pytest.mark.parametrize("spec", [make_spec(4, 32, act_bits=8, act_order=True), make_spec(6, -1, act_bits=8)])
def test_a8_forward_is_activation_quantized_float(spec):
    """The int8-activation forward equals the float product up to the int8 activation error (~1%)."""
    W = torch.randn(64, 192, generator=torch.Generator().manual_seed(4))
    qw = rtn_quantized(W, spec, seed=5, smooth=torch.rand(192) + 0.5)
    layout = get_layout(spec.format)
    t = layout.pack(qw)
    x = torch.randn(7, 192)
    y = layout.forward(x, t, spec, (64, 192))
    exact = x @ expected_weight(qw).t()
    rel = ((y - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.02
    for dtype in (torch.float16, torch.bfloat16):
        assert layout.forward(x.to(dtype), t, spec, (64, 192)).dtype == dtype


def test_activation_quantization_definition():
    x = torch.tensor([[254.0, 5.0, -1.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_activations(x, torch.full((5,), 2.0))
    assert q.tolist() == [[127, 2, 0, 2, 0], [0] * 5]  # x / 2 = 127, 2.5 -> 2, -0.5 -> 0, 1.5 -> 2 (half to even)
    assert s[0].item() == 1.0 and s[1].item() > 0


def test_smoothing_preserves_product_and_helps_outliers():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(64, 128, generator=g) * 0.1
    x = torch.randn(32, 128, generator=g)
    x[:, :4] *= 60  # outlier channels, as in LLM activations
    absmax = x.abs().amax(dim=0)
    spec = make_spec(4, 32, act_bits=8)
    Ws, extra = smooth_weight("l", W, absmax, spec)
    s = extra["smooth"]
    assert torch.equal(s, smooth_factors(absmax, W)) and torch.equal(s, s.half().float())
    torch.testing.assert_close((x / s) @ Ws.t(), x @ W.t(), rtol=1e-4, atol=1e-4)
    assert smooth_weight("l", W, absmax, make_spec(4, 32))[1] == {}
    assert smooth_weight("l", W, None, spec)[1] == {}
    layout = get_layout("w4a8")
    errs = []
    for Wq, sm in ((W, None), (Ws, s)):
        qw = rtn_quantized(Wq, spec, smooth=sm)
        y = layout.forward(x, layout.pack(qw), spec, (64, 128))
        exact = x @ expected_weight(qw).t()  # isolates the activation quantization error
        errs.append(((y - exact).norm() / exact.norm()).item())
    assert errs[1] < 0.5 * errs[0]
    assert layout.pre_quantize("l", W, absmax, spec)[1]["smooth"].equal(s)
    with pytest.raises(LwqError, match="absmax"):
        smooth_weight("l", W, absmax[:5], spec)


def test_layouts_refuse_what_they_cannot_store():
    W = torch.randn(32, 64)
    asym = rtn_quantized(W, LayerSpec(bits=4, group_size=32, sym=False, format="w4a8", act_bits=8))
    with pytest.raises(LwqError, match="symmetric"):
        get_layout("w4a8").pack(asym)
    asym6 = rtn_quantized(W, LayerSpec(bits=6, group_size=32, sym=False, format="int6", act_bits=8))
    with pytest.raises(LwqError, match="symmetric"):
        get_layout("int6").pack(asym6)
    spec = make_spec(6, 32)
    qw = rtn_quantized(W, spec.replace(act_order=True), seed=7)
    qw.spec = spec  # permuted g_idx but act_order=False
    with pytest.raises(LwqError, match="act_order"):
        get_layout("int6").pack(qw)
    with pytest.raises(LwqError, match="4-bit"):
        get_layout("w4a8").pack(rtn_quantized(W, LayerSpec(bits=6, group_size=32, sym=True, format="w4a8", act_bits=8)))


def test_specs_route_to_these_formats():
    assert make_spec(4, 128, act_bits=8).format == "w4a8" and make_spec(4, 128, act_bits=8).sym
    assert make_spec(6, 128).format == "int6" and make_spec(6, 128, act_bits=8).format == "int6"
    # 6-bit weights cost 6 bits per weight plus scales (g128, sym, W6A16): 6 + 16/128 bits
    assert layer_bytes(4096, 4096, make_spec(6, 128, sym=True)) * 8 / 4096**2 == pytest.approx(6 + 16 / 128)


def test_smoothing_hook_strengths_and_off():
    from lwq.errors import BadInput
    from lwq.backends.smooth import smoothing

    g = torch.Generator().manual_seed(7)
    W = torch.randn(32, 64, generator=g)
    absmax = torch.rand(64, generator=g) * 10 + 0.1
    a8, a16 = make_spec(4, 32, act_bits=8), make_spec(4, 32)
    assert smoothing(None)("l", W, absmax, a8) == (W, {})
    for alpha in (0.0, 0.5, 0.8, 1.0):
        Ws, extra = smoothing(alpha)("l", W, absmax, a8)
        assert torch.equal(extra["smooth"], smooth_factors(absmax, W, alpha))
        assert torch.equal(Ws, W * extra["smooth"][None, :])
        assert smoothing(alpha)("l", W, absmax, a16) == (W, {})
    s5, s8 = (smoothing(a)("l", W, absmax, a8)[1]["smooth"] for a in (0.5, 0.8))
    assert not torch.equal(s5, s8)
    for bad in (-0.1, 1.5):
        with pytest.raises(BadInput, match="alpha"):
            smoothing(bad)


def test_cli_smooth_alpha_reaches_the_checkpoint(tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from helpers import save_tiny, word_text
    from lwq.cli import run

    model = save_tiny(tmp_path / "m", "llama")
    (tmp_path / "calib.txt").write_text(word_text(2000))
    base = ["quantize", str(model), "--bits", "4", "--act-bits", "8", "--sym", "--group-size", "32",
            "--data", str(tmp_path / "calib.txt"), "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--json"]
    smooth = {}
    for alpha in ("off", "0.5", "0.8"):
        out = tmp_path / f"q-{alpha}"
        assert run([*base, "-o", str(out), "--smooth-alpha", alpha]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["smooth_alpha"] == (None if alpha == "off" else float(alpha))
        tensors = {}
        for f in out.glob("*.safetensors"):
            tensors.update(load_file(str(f)))
        smooth[alpha] = {k: v.float() for k, v in tensors.items() if k.endswith(".smooth")}
        assert len(smooth[alpha]) == 14  # 2 blocks x 7 linears
    assert all(torch.equal(v, torch.ones_like(v)) for v in smooth["off"].values())
    assert all(not torch.equal(smooth["0.5"][k], torch.ones_like(v)) for k, v in smooth["off"].items())
    assert any(not torch.equal(smooth["0.5"][k], smooth["0.8"][k]) for k in smooth["off"])
    assert run([*base, "-o", str(tmp_path / "bad"), "--smooth-alpha", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --smooth-alpha") and "\n" not in err and not (tmp_path / "bad").exists()
