"""The backend interface: ``quantize(weight, spec, hessian=None) -> QuantizedWeight``, by name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lwq.registry import Registry
from lwq.spec import LayerSpec


@dataclass
class QuantizedWeight:
    """A quantized linear weight before packing.

    ``q``: integer codes (out, in) in ``[0, 2**bits)``; ``scale``/``zero``: per-group grid
    (out, groups), ``zero`` integer; ``g_idx``: group of each input column (in,), int32 (act-order
    permutes it); ``extra``: backend-specific tensors (bitsandbytes state, W4A8 smoothing factors, ...).
    """

    spec: LayerSpec
    q: torch.Tensor | None
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        if self.q is not None:
            return int(self.q.shape[0]), int(self.q.shape[1])
        return tuple(self.meta["shape"])  # type: ignore[return-value]


class Backend(Protocol):
    """Quantizes one weight matrix (out, in) under ``spec``; GPTQ uses the Hessian ``H = X^T X``."""

    def __call__(self, weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight: ...


BACKENDS: Registry[Backend] = Registry("backend")
