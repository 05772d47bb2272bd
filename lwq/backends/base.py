"""The backend interface: declared ``Backend`` entries, ``quantize(weight, spec, hessian=None) -> QuantizedWeight``,
by name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

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


Quantize = Callable[[torch.Tensor, LayerSpec, Optional[torch.Tensor]], QuantizedWeight]


@dataclass(frozen=True)
class Backend:
    """A declared backend: ``quantize(weight (out, in), spec, hessian=None) -> QuantizedWeight``;
    ``needs_hessian``: it reads the layer's calibration Hessian ``H = X^T X`` (GPTQ); ``fixed_grid``:
    the (bits, group size) it always stores, or None when the spec chooses; ``package``: an optional
    package it needs (``lwq doctor`` says whether it is there)."""

    name: str
    quantize: Quantize
    needs_hessian: bool = False
    fixed_grid: Optional[tuple[int, int]] = None
    package: Optional[str] = None

    def __call__(self, weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        return self.quantize(weight, spec, hessian)


BACKENDS: Registry[Backend] = Registry("backend")
