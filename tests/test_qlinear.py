"""QuantizedLinear: forward equals x @ dequant(W)^T + b for every layout; empty(); Conv1D replacement."""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_model
from lwq.backends import bnb_status, get_backend, quantize_weight
from lwq.backends.gptq import gptq_quantize
from lwq.backends.quant import QParams, dequantize
from lwq.formats.bytes import layer_bytes
from lwq.formats.qlinear import QuantizedLinear, quantized_from_linear, replace_linear
from lwq.models.arch import linear_weight
from lwq.spec import LayerSpec, make_spec

BNB = bnb_status() is None


def independent_dequant(qw, W):
    """The weight a QuantizedWeight stands for, computed without the layout code."""
    if qw.spec.bits == 16:
        return W.half().float()
    if qw.q is not None:
        return dequantize(qw.q, QParams(qw.scale, qw.zero), qw.g_idx)
    import bitsandbytes.functional as F

    if qw.spec.bits == 8:
        return qw.extra["qweight"].float() * qw.extra["absmax"][:, None] / 127
    _, state = F.quantize_4bit(W, blocksize=64, quant_type=qw.spec.backend[4:])
    return F.dequantize_4bit(qw.extra["qweight"].reshape(-1, 1), state)


def cases():
    out = [("rtn", make_spec(b, g)) for b, g in ((2, 32), (3, 128), (4, 64), (8, -1))]
    out += [("rtn-sym", make_spec(4, 128, sym=True)),
            ("gptq-act-order", make_spec(3, 64, backend="gptq", act_order=True)),
            ("fp16", make_spec(16))]
    if BNB:
        out += [(b, make_spec(bits, 64 if bits == 4 else -1, backend=b))
                for b, bits in (("bnb-nf4", 4), ("bnb-fp4", 4), ("bnb-int8", 8))]
    return out


def quantize(spec, W):
    if spec.backend == "gptq":
        X = torch.randn(256, W.shape[1]) @ torch.randn(W.shape[1], W.shape[1])
        return gptq_quantize(W, X.t() @ X, spec)
    return quantize_weight(W, spec)


@pytest.mark.parametrize("label,spec", cases(), ids=[c[0] for c in cases()])
def test_forward_equals_dequantized_matmul(label, spec):
    torch.manual_seed(0)
    W, b, x = torch.randn(40, 192), torch.randn(40), torch.randn(3, 5, 192)
    qw = quantize(spec, W)
    ql = QuantizedLinear.from_quantized(qw, b)
    ref = independent_dequant(qw, W)
    assert torch.allclose(ql.dequantize(), ref, atol=1e-6)
    assert torch.allclose(ql(x), x @ ref.t() + b, atol=1e-4)
    assert ql.weight_bytes() == layer_bytes(40, 192, spec)
    # the buffers are the checkpoint tensors; empty() has the same names, shapes and dtypes
    empty = QuantizedLinear.empty(spec, 40, 192, bias=True)
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == \
           {k: (v.shape, v.dtype) for k, v in ql.state_dict().items()}
    # loading the tensors into the empty layer reproduces the forward (the CPU weight cache follows)
    assert not torch.allclose(empty(x), ql(x))
    empty.load_state_dict(ql.state_dict())
    assert torch.equal(empty(x), ql(x))


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 128), (6, 128), (8, 256), (3, -1)])
@pytest.mark.parametrize("shape", [(172, 64), (33, 192)])
def test_empty_gptq_shapes_match_pack(bits, group, shape):
    spec = LayerSpec(bits=bits, group_size=group)
    W = torch.randn(*shape)
    packed = QuantizedLinear.from_quantized(get_backend("rtn")(W, spec)).state_dict()
    empty = QuantizedLinear.empty(spec, *shape).state_dict()
    assert {k: (v.shape, v.dtype) for k, v in empty.items()} == {k: (v.shape, v.dtype) for k, v in packed.items()}


def test_kernel_hook_is_used_and_bias_added():
    W, b, x = torch.randn(8, 32), torch.randn(8), torch.randn(2, 32)
    ql = QuantizedLinear.from_quantized(get_backend("rtn")(W, LayerSpec(bits=4, group_size=32)), b)
    seen = []

    def kernel(inp, mod):
        seen.append(mod)
        return torch.full((inp.shape[0], mod.out_features), 2.0)

    ql.kernel = kernel
    assert torch.equal(ql(x), 2.0 + b.expand(2, 8)) and seen == [ql]


def test_cache_follows_in_place_changes():
    W, x = torch.randn(8, 32), torch.randn(2, 32)
    ql = QuantizedLinear.from_quantized(get_backend("rtn")(W, LayerSpec(bits=4, group_size=32)))
    before = ql(x)
    ql.scales.mul_(2)
    assert torch.allclose(ql(x), 2 * before, atol=1e-5)


def test_replace_gpt2_conv1d():
    model = tiny_model("gpt2", layers=1)
    name = "transformer.h.0.attn.c_attn"
    conv = model.get_submodule(name)
    W = linear_weight(conv).detach()  # Conv1D stores (in, out): this is (out, in)
    assert W.shape == (3 * 64, 64)
    ql = quantized_from_linear(conv, get_backend("rtn")(W, LayerSpec(bits=8, group_size=32)))
    x = torch.randn(2, 7, 64)
    expected = x @ ql.dequantize().t() + conv.bias.detach()
    old = replace_linear(model, name, ql)
    assert old is conv and model.get_submodule(name) is ql
    assert torch.allclose(ql(x), expected, atol=1e-5)
    assert torch.allclose(ql(x), conv(x), atol=0.05)  # 8-bit: close to the original layer
    ids = torch.randint(0, 128, (1, 9))
    assert model(input_ids=ids).logits.shape == (1, 9, 128)


def test_fp16_layers_keep_the_model():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 11))
    ref = model(input_ids=ids).logits
    for name in [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]:
        mod = model.get_submodule(name)
        replace_linear(model, name, quantized_from_linear(mod, quantize_weight(mod.weight, make_spec(16))))
    assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-2)
