"""Storage layouts: how a ``QuantizedWeight`` becomes checkpoint tensors, and back.

A layout (registered by format name, the ``LayerSpec.format``) packs a quantized weight into named
tensors (``qweight``, ``scales``, ...), dequantizes them for the pure-torch reference path, runs the
reference forward (which for int8-activation formats also emulates the activation quantization, so
kernels and reference compute the same function), and gives its exact byte cost.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lwq.backends.base import QuantizedWeight
from lwq.backends.quant import QParams, dequantize
from lwq.kernels.pack import group_index
from lwq.errors import LwqError
from lwq.kernels.pack import pack, packed_len, unpack
from lwq.registry import Registry
from lwq.spec import LayerSpec

Tensors = dict[str, torch.Tensor]


class Layout(ABC):
    """One storage format. Subclasses implement ``pack``, ``dequantize`` and ``cost``."""

    name: str = ""

    @abstractmethod
    def pack(self, qw: QuantizedWeight) -> Tensors:
        """Checkpoint tensors of one linear (names without the module prefix)."""

    @abstractmethod
    def dequantize(self, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> torch.Tensor:
        """The float32 weight (out, in) these tensors stand for."""

    @abstractmethod
    def cost(self, out_features: int, in_features: int, spec: LayerSpec) -> int:
        """Exact bytes of ``pack``'s tensors for a layer of this shape (what the allocator budgets)."""

    def forward(self, x: torch.Tensor, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> torch.Tensor:
        """Reference ``x @ W^T`` (no bias) in ``x``'s dtype."""
        w = self.dequantize(t, spec, shape).to(x.dtype)
        return torch.nn.functional.linear(x, w)

    def codes(self, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> QuantizedWeight | None:
        """The integer grid these tensors hold (codes, zero points, scales, ``g_idx``, in the weight's
        own column order) when the weight is exactly ``(q - zero) * scale``; None for formats that are
        not such a grid (bitsandbytes, int8-activation formats with smoothing)."""
        return None


LAYOUTS: Registry[Layout] = Registry("storage format")


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along the input dimension; the last one may be shorter (``g_idx = i // group_size``)."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def check_sym(qw: QuantizedWeight, fmt: str) -> None:
    """Formats that store no zero points (symmetric gptq, the int8-activation formats' signed codes):
    every zero point must be ``2**(bits-1)``."""
    mid = 1 << (qw.spec.bits - 1)
    if qw.zero is None or not bool((qw.zero == mid).all()):
        raise LwqError(f"{fmt} needs symmetric weights (zero point {mid}); quantize with sym=True")


def column_order(qw: QuantizedWeight, fmt: str) -> torch.Tensor | None:
    """``perm`` making groups contiguous under act-order (None without act-order), after checking ``g_idx``."""
    spec, (_, K) = qw.spec, qw.shape
    want = group_index(K, spec.group_size).long()
    g = qw.g_idx.long().cpu()
    if not spec.act_order:
        if not torch.equal(g, want):
            raise LwqError(f"{fmt}: g_idx is permuted but the spec has act_order=False")
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], want):
        raise LwqError(f"{fmt}: act-order g_idx does not form groups of {spec.group_size} columns")
    return perm.to(torch.int32)


class GptqLayout(Layout):
    """GPTQ's layout: ``qweight`` int32 [words(in), out] (codes packed along the input dimension),
    ``qzeros`` int32 [groups, words(out)], ``scales`` fp16 [groups, out], and ``g_idx`` int32 [in]
    only under act-order: without it the group of column ``i`` is implied (``i // group_size``), so
    lwq stores no bytes for it; symmetric layers store no ``qzeros`` either (every zero point is
    ``2**(bits-1)``). Format version 2; version 1 stored both always, and still loads.

    lwq stores the zero points as they are (GPTQModel's ``gptq_v2``); the GPTQ v1 export subtracts one.
    """

    name = "gptq"

    def pack(self, qw: QuantizedWeight) -> Tensors:
        assert qw.q is not None and qw.scale is not None and qw.zero is not None and qw.g_idx is not None
        bits = qw.spec.bits
        t = {"qweight": pack(qw.q.t().contiguous(), bits, dim=0)}
        if qw.spec.sym:
            check_sym(qw, self.name)
        else:
            t["qzeros"] = pack(qw.zero.t().contiguous(), bits, dim=1)
        t["scales"] = qw.scale.t().contiguous().to(torch.float16)
        if qw.spec.act_order:
            t["g_idx"] = qw.g_idx.to(torch.int32).contiguous()
        else:
            column_order(qw, self.name)  # checks that g_idx is the implied i // group_size
        return t

    def dequantize(self, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> torch.Tensor:
        out_f, in_f = shape
        q = unpack(t["qweight"], spec.bits, in_f, dim=0).t()
        scales = t["scales"].float().t()
        zero = unpack(t["qzeros"], spec.bits, out_f, dim=1).t() if "qzeros" in t else \
            torch.full(scales.shape, 1 << (spec.bits - 1), dtype=torch.int32, device=scales.device)
        qp = QParams(scales, zero)
        g_idx = t.get("g_idx")
        return dequantize(q, qp, group_index(in_f, spec.group_size, q.device) if g_idx is None else g_idx)

    def codes(self, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> QuantizedWeight:
        out_f, in_f = shape
        q = unpack(t["qweight"], spec.bits, in_f, dim=0).t()
        scales = t["scales"].t()
        zero = unpack(t["qzeros"], spec.bits, out_f, dim=1).t() if "qzeros" in t else \
            torch.full(scales.shape, 1 << (spec.bits - 1), dtype=torch.int32)
        g_idx = t["g_idx"] if "g_idx" in t else group_index(in_f, spec.group_size)
        return QuantizedWeight(spec, q.contiguous(), scales.contiguous(), zero.contiguous(), g_idx.to(torch.int32))

    def cost(self, out_features: int, in_features: int, spec: LayerSpec) -> int:
        g = num_groups(in_features, spec.group_size)
        return (4 * packed_len(in_features, spec.bits) * out_features
                + (0 if spec.sym else 4 * g * packed_len(out_features, spec.bits))
                + 2 * g * out_features + (4 * in_features if spec.act_order else 0))


class Fp16Layout(Layout):
    """An unquantized 16-bit weight (a plan may keep a layer in 16-bit)."""

    name = "fp16"

    def pack(self, qw: QuantizedWeight) -> Tensors:
        return {"weight": qw.extra["weight"].to(torch.float16).contiguous()}

    def dequantize(self, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> torch.Tensor:
        return t["weight"].float()

    def cost(self, out_features: int, in_features: int, spec: LayerSpec) -> int:
        return 2 * out_features * in_features


LAYOUTS.add("gptq", GptqLayout())
LAYOUTS.add("fp16", Fp16Layout())
