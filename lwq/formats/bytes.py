"""Exact storage cost of a linear layer under a spec: the bytes of every tensor the checkpoint holds.

This is the cost the allocator budgets with, so it must match what ``formats`` writes. Each storage
format registers a cost function ``(out_features, in_features, spec) -> bytes``; biases are not
counted here (they stay in 16-bit whatever the spec).
"""
from __future__ import annotations

import math
from typing import Callable

from lwq.registry import Registry
from lwq.spec import LayerSpec

CostFn = Callable[[int, int, LayerSpec], int]
COSTS: Registry[CostFn] = Registry("storage format")


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along the input dimension; the last one may be shorter (``g_idx = i // group_size``)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def packed_words(n: int, bits: int) -> int:
    """32-bit words needed to pack ``n`` values of ``bits`` bits back to back."""
    return math.ceil(n * bits / 32)


@COSTS.register("gptq")
def gptq_bytes(out_features: int, in_features: int, spec: LayerSpec) -> int:
    """GPTQ layout: qweight int32 [words(in), out], qzeros int32 [groups, words(out)],
    scales fp16 [groups, out], g_idx int32 [in]."""
    g = num_groups(in_features, spec.group_size)
    qweight = 4 * packed_words(in_features, spec.bits) * out_features
    qzeros = 4 * g * packed_words(out_features, spec.bits)
    scales = 2 * g * out_features
    g_idx = 4 * in_features
    return qweight + qzeros + scales + g_idx


@COSTS.register("fp16")
def fp16_bytes(out_features: int, in_features: int, spec: LayerSpec) -> int:
    """Unquantized 16-bit weight."""
    return 2 * out_features * in_features


def layer_bytes(out_features: int, in_features: int, spec: LayerSpec) -> int:
    """Exact bytes of one linear's weight tensors under ``spec``."""
    if spec.bits == 16:
        return fp16_bytes(out_features, in_features, spec)
    return COSTS.get(spec.format)(out_features, in_features, spec)


def bits_per_weight(out_features: int, in_features: int, spec: LayerSpec) -> float:
    """True bits per weight, scales, zeros and indices included."""
    return 8.0 * layer_bytes(out_features, in_features, spec) / (out_features * in_features)
