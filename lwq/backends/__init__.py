"""Per-layer quantizers, registered by name in ``BACKENDS`` by the explicit imports below."""
from __future__ import annotations

import torch

from lwq.backends import bnb, gptq, rtn  # noqa: F401  (each registers its backends)
from lwq.backends.base import BACKENDS, Backend, QuantizedWeight
from lwq.backends.bnb import bnb_status
from lwq.backends.rtn import keep_fp16
from lwq.spec import GRIDS, LayerSpec

_MSE_TWIN = {"rtn": "rtn-mse", "gptq": "gptq-mse"}
_PLAIN = {v: k for k, v in _MSE_TWIN.items()}


def with_grid(backend: str, grid: str) -> str:
    """The backend of ``backend``'s family that uses the ``grid`` search (``--grid``): ``mse`` maps
    rtn -> rtn-mse and gptq -> gptq-mse; ``minmax`` maps back; bitsandbytes keeps its own grid."""
    from lwq.errors import BadInput

    if grid not in GRIDS:
        raise BadInput(f"--grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    plain = _PLAIN.get(backend, backend)
    return _MSE_TWIN.get(plain, plain) if grid == "mse" else plain


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; unknown names raise ``BadInput`` listing the valid ones."""
    return BACKENDS.get(name)


def needs_hessian(spec: LayerSpec) -> bool:
    """Whether quantizing under ``spec`` needs calibration statistics (GPTQ's Hessian)."""
    return spec.bits < 16 and get_backend(spec.backend).needs_hessian


def quantize_weight(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize one weight (out, in) under ``spec``; 16-bit specs keep the weight in float16."""
    if spec.bits >= 16 or spec.format == "fp16":
        return keep_fp16(weight, spec)
    return get_backend(spec.backend)(weight, spec, hessian)


__all__ = ["BACKENDS", "GRIDS", "with_grid", "Backend", "QuantizedWeight", "bnb_status", "get_backend", "needs_hessian",
           "quantize_weight"]
