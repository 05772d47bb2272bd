"""W4A8 layout (format ``w4a8``): symmetric int4 weights for int8 activations.

Tensors of one linear (out = N, in = K, G groups along K):

- ``qweight`` int32 [ceil(K/8), N]: unsigned codes ``q = c + 8`` (``c`` in [-8, 7]), 8 per word along
  the input dimension, little-endian nibbles (GPTQ's word layout): the kernel unpacks a tile with one
  shift and mask and subtracts 8 to get the int8 operand of the int8 tensor-core dot.
- ``scales`` fp16 [G, N]: per-output-channel (group -1: G = 1) or per-group scales. Per-group scales
  multiply per-group int32 partial sums (the kernel keeps one int32 accumulator per group and flushes
  it into fp32 times the group's scale). This keeps the quantizer's grid exactly (the backend's codes
  and scales are stored as they are) at the cost of one FMA per accumulator element per group;
  QServe's progressive two-level scheme (int8 group scales times an fp16 channel scale, products
  kept in int8) would requantize the group scales to at most 16 levels (int4 code x scale must fit
  int8), adding error on top of GPTQ, for a loop saving that matters only with small groups.
- ``smooth`` fp16 [K]: SmoothQuant factors ``s`` (ones when not smoothed; always stored so ``cost``
  is exact). The weights were multiplied by ``s`` before quantization; activations are divided by it.
- ``perm`` int32 [K] (only when ``spec.act_order``): act-order is stored as a column permutation that
  makes the groups contiguous (columns sorted by ``g_idx``); activations are gathered by it.

Forward (reference, the kernel's function): ``v = x[..., perm] * (1 / smooth)``, per-token
``int8 = round_half_even(v * 127 / absmax)``, exact int32 group sums of int8 x int4, times group
scales, times ``absmax / 127``, in ``x``'s dtype (``lwq.kernels.w4a8.reference``).
"""
from __future__ import annotations

import torch

from lwq.backends.base import QuantizedWeight
from lwq.kernels.pack import group_index
from lwq.errors import LwqError
from lwq.formats.layout import LAYOUTS, Layout, Tensors, check_sym, column_order, num_groups  # noqa: F401 (re-exported)
from lwq.kernels.pack import pack, packed_len, unpack
from lwq.backends.smooth import smooth_weight
from lwq.kernels.w4a8.reference import w4a8_reference
from lwq.spec import LayerSpec

def smooth_tensor(qw: QuantizedWeight) -> torch.Tensor:
    """The stored smoothing factors (fp16 [in]; ones when the weight was not smoothed)."""
    s = qw.extra.get("smooth")
    K = qw.shape[1]
    s = torch.ones(K) if s is None else s.float().cpu()
    if s.shape != (K,):
        raise LwqError(f"smooth factors have shape {tuple(s.shape)}, expected ({K},)")
    return s.to(torch.float16).contiguous()


def unpermute(W_perm: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Columns of a weight stored in ``perm`` order put back in the original order."""
    if perm is None:
        return W_perm
    W = torch.empty_like(W_perm)
    W[:, perm.long()] = W_perm
    return W


class W4A8Layout(Layout):
    """int4 symmetric weights x int8 per-token activations (see the module docstring)."""

    name = "w4a8"

    def pack(self, qw: QuantizedWeight) -> Tensors:
        assert qw.q is not None and qw.scale is not None and qw.g_idx is not None
        if qw.spec.bits != 4 or qw.spec.act_bits != 8:
            raise LwqError(f"w4a8 stores 4-bit weights with 8-bit activations, got {qw.spec.label}")
        check_sym(qw, self.name)
        perm = column_order(qw, self.name)
        q = qw.q.cpu() if perm is None else qw.q.cpu()[:, perm.long()]
        t = {
            "qweight": pack(q.t().contiguous(), 4, dim=0),
            "scales": qw.scale.t().contiguous().to(torch.float16).cpu(),
            "smooth": smooth_tensor(qw),
        }
        if perm is not None:
            t["perm"] = perm
        return t

    def dequantize(self, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> torch.Tensor:
        out_f, in_f = shape
        c = unpack(t["qweight"], 4, in_f, dim=0).t().float() - 8
        g = group_index(in_f, spec.group_size, c.device).long()
        W = unpermute(c * t["scales"].float().t()[:, g], t.get("perm"))
        return W / t["smooth"].float()[None, :]

    def empty(self, spec: LayerSpec, shape: tuple[int, int]) -> Tensors:
        """Zero tensors with ``pack``'s names, shapes and dtypes (to load a checkpoint into)."""
        out_f, in_f = shape
        t = {"qweight": torch.zeros(packed_len(in_f, 4), out_f, dtype=torch.int32),
             "scales": torch.zeros(num_groups(in_f, spec.group_size), out_f, dtype=torch.float16),
             "smooth": torch.ones(in_f, dtype=torch.float16)}
        if spec.act_order:
            t["perm"] = torch.arange(in_f, dtype=torch.int32)
        return t

    def cost(self, out_features: int, in_features: int, spec: LayerSpec) -> int:
        g = num_groups(in_features, spec.group_size)
        return (4 * packed_len(in_features, 4) * out_features + 2 * g * out_features + 2 * in_features
                + (4 * in_features if spec.act_order else 0))

    def forward(self, x: torch.Tensor, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> torch.Tensor:
        return w4a8_reference(x, t["qweight"], t["scales"], spec.group_size, t["smooth"], t.get("perm"))

    def pre_quantize(self, name: str, W: torch.Tensor, act_absmax: torch.Tensor | None,
                     spec: LayerSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SmoothQuant folding before quantization (``smooth_weight``)."""
        return smooth_weight(name, W, act_absmax, spec)


LAYOUTS.add("w4a8", W4A8Layout())
