"""Exact storage cost of a linear layer under a spec: the bytes of every tensor the checkpoint holds.

This is the cost the allocator budgets with; it comes from the layout that writes the tensors, so
it always matches the checkpoint. Biases are not counted (they stay in 16-bit whatever the spec).
"""
from __future__ import annotations

from lwq.formats.layouts import get_layout
from lwq.spec import LayerSpec


def layer_bytes(out_features: int, in_features: int, spec: LayerSpec) -> int:
    """Exact bytes of one linear's weight tensors under ``spec``."""
    return get_layout("fp16" if spec.bits == 16 else spec.format).cost(out_features, in_features, spec)


def bits_per_weight(out_features: int, in_features: int, spec: LayerSpec) -> float:
    """True bits per weight, scales, zeros and indices included."""
    return 8.0 * layer_bytes(out_features, in_features, spec) / (out_features * in_features)
