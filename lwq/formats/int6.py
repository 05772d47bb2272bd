"""INT6 layout (format ``int6``): 6-bit weights for W6A16 and W6A8, as 4 + 2 bit planes.

Tensors of one linear (out = N, in = K, G groups along K):

- ``qweight_lo`` int32 [ceil(K/8), N]: the low 4 bits of each code, 8 per word along K (the int4
  word layout); ``qweight_hi`` int32 [ceil(K/16), N]: the high 2 bits, 16 per word along K.
  Code ``k`` is ``(lo[k//8] >> 4*(k%8)) & 15 | ((hi[k//16] >> 2*(k%16)) & 3) << 4``: two aligned loads,
  no value straddles a word and every shift is constant per row, unlike a packed 6-bit stream (16
  values in three words, where 4 of 16 values span two words and need a second load and a variable
  two-word shift). Same bytes as the stream (6 bits per weight, K a multiple of 16), and the 4-bit
  plane reuses the int4 unpacking of the W4A16/W4A8 kernels (FlexQ-style).
- ``scales`` fp16 [G, N]; ``zeros`` uint8 [G, N] only when ``spec.sym`` is False (asymmetric, as
  GPTQ); symmetric weights use the zero 32 implicitly.
- ``smooth`` fp16 [K] only for ``act_bits == 8`` (W6A8, symmetric required): SmoothQuant factors as in
  ``lwq.formats.w4a8`` (ones when not smoothed).
- ``perm`` int32 [K] only when ``spec.act_order``: the column permutation that makes act-order
  groups contiguous; activations are gathered by it.

W6A16 forward: ``x[..., perm] @ dequant(W)`` with the weight rounded to ``x``'s dtype and fp32
accumulation; W6A8 forward: the W4A8 activation quantization and group-wise int8 product.
"""
from __future__ import annotations

import torch

from lwq.backends.base import QuantizedWeight
from lwq.kernels.pack import group_index
from lwq.errors import LwqError
from lwq.formats.layout import LAYOUTS, Layout, Tensors, num_groups
from lwq.kernels.pack import pack, packed_len
from lwq.backends.smooth import smooth_weight
from lwq.formats.w4a8 import check_sym, column_order, smooth_tensor, unpermute
from lwq.kernels.int6.reference import unpack_int6, w6a8_reference, w6a16_reference
from lwq.spec import LayerSpec


class Int6Layout(Layout):
    """6-bit weights in 4+2 bit planes, 16-bit or int8 activations (see the module docstring)."""

    name = "int6"

    def pack(self, qw: QuantizedWeight) -> Tensors:
        assert qw.q is not None and qw.scale is not None and qw.zero is not None and qw.g_idx is not None
        spec = qw.spec
        if spec.bits != 6:
            raise LwqError(f"int6 stores 6-bit weights, got {spec.bits}-bit")
        if spec.sym or spec.act_bits == 8:
            check_sym(qw, self.name)
        perm = column_order(qw, self.name)
        q = qw.q.cpu() if perm is None else qw.q.cpu()[:, perm.long()]
        qt = q.t().contiguous()
        t = {
            "qweight_lo": pack(qt & 15, 4, dim=0),
            "qweight_hi": pack(qt >> 4, 2, dim=0),
            "scales": qw.scale.t().contiguous().to(torch.float16).cpu(),
        }
        if not (spec.sym or spec.act_bits == 8):
            t["zeros"] = qw.zero.t().contiguous().to(torch.uint8).cpu()
        if spec.act_bits == 8:
            t["smooth"] = smooth_tensor(qw)
        if perm is not None:
            t["perm"] = perm
        return t

    def dequantize(self, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> torch.Tensor:
        out_f, in_f = shape
        q = unpack_int6(t["qweight_lo"], t["qweight_hi"], in_f).t().float()
        g = group_index(in_f, spec.group_size, q.device).long()
        zero = t["zeros"].t().float()[:, g] if "zeros" in t else 32.0
        W = unpermute((q - zero) * t["scales"].float().t()[:, g], t.get("perm"))
        return W / t["smooth"].float()[None, :] if "smooth" in t else W

    def codes(self, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> QuantizedWeight | None:
        if spec.act_bits == 8:
            return None  # smoothed weights for int8 activations: not a plain weight grid
        out_f, in_f = shape
        q = unpermute(unpack_int6(t["qweight_lo"], t["qweight_hi"], in_f).t(), t.get("perm"))
        scales = t["scales"].t()
        zero = t["zeros"].t().to(torch.int32) if "zeros" in t else torch.full(scales.shape, 32, dtype=torch.int32)
        g = group_index(in_f, spec.group_size)
        g_idx = g if "perm" not in t else unpermute(g[None, :], t["perm"])[0]
        return QuantizedWeight(spec, q.to(torch.int32).contiguous(), scales.contiguous(), zero.contiguous(),
                               g_idx.to(torch.int32))

    def empty(self, spec: LayerSpec, shape: tuple[int, int]) -> Tensors:
        """Zero tensors with ``pack``'s names, shapes and dtypes (to load a checkpoint into)."""
        out_f, in_f = shape
        g = num_groups(in_f, spec.group_size)
        a8 = spec.act_bits == 8
        t = {"qweight_lo": torch.zeros(packed_len(in_f, 4), out_f, dtype=torch.int32),
             "qweight_hi": torch.zeros(packed_len(in_f, 2), out_f, dtype=torch.int32),
             "scales": torch.zeros(g, out_f, dtype=torch.float16)}
        if not (spec.sym or a8):
            t["zeros"] = torch.zeros(g, out_f, dtype=torch.uint8)
        if a8:
            t["smooth"] = torch.ones(in_f, dtype=torch.float16)
        if spec.act_order:
            t["perm"] = torch.arange(in_f, dtype=torch.int32)
        return t

    def cost(self, out_features: int, in_features: int, spec: LayerSpec) -> int:
        g = num_groups(in_features, spec.group_size)
        a8 = spec.act_bits == 8
        return (4 * (packed_len(in_features, 4) + packed_len(in_features, 2)) * out_features
                + 2 * g * out_features + (0 if spec.sym or a8 else g * out_features)
                + (2 * in_features if a8 else 0) + (4 * in_features if spec.act_order else 0))

    def forward(self, x: torch.Tensor, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> torch.Tensor:
        if spec.act_bits == 8:
            return w6a8_reference(x, t["qweight_lo"], t["qweight_hi"], t["scales"], spec.group_size,
                                  t.get("smooth"), t.get("perm"))
        return w6a16_reference(x, t["qweight_lo"], t["qweight_hi"], t["scales"], spec.group_size,
                               t.get("zeros"), t.get("perm"))

    def pre_quantize(self, name: str, W: torch.Tensor, act_absmax: torch.Tensor | None,
                     spec: LayerSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SmoothQuant folding for W6A8 (``lwq.backends.smooth.smooth_weight``); W6A16 is unchanged."""
        return smooth_weight(name, W, act_absmax, spec)


LAYOUTS.add("int6", Int6Layout())
