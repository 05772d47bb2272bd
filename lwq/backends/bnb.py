"""bitsandbytes backends: ``bnb-nf4`` / ``bnb-fp4`` (4-bit, block size 64) and ``bnb-int8`` (LLM.int8's
row-wise absmax int8 weights), quantized with ``bitsandbytes.functional`` (it runs on CPU too).

The tensors are stored in the ``bnb`` layout (``lwq.formats.bnb_layout``), whose dequantization is
pure torch, so loading a checkpoint does not need bitsandbytes.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from lwq.backends.base import BACKENDS, Backend, QuantizedWeight
from lwq.errors import BadInput, LwqError
from lwq.spec import LayerSpec

BNB_BLOCKSIZE = 64


def bnb_status() -> str | None:
    """``None`` when ``bitsandbytes.functional`` imports, else why not (for ``lwq doctor``)."""
    try:
        _functional()
    except LwqError as exc:
        return str(exc)
    return None


def _functional() -> ModuleType:
    # bitsandbytes logs a warning at import about an optional CPU kernel package; keep it off stderr
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return importlib.import_module("bitsandbytes.functional")
    except (ImportError, OSError, RuntimeError) as exc:
        raise LwqError(f"bitsandbytes is not usable: {type(exc).__name__}: {' '.join(str(exc).split())[:200]} "
                       "(pip install bitsandbytes)") from None


def _check(spec: LayerSpec, bits: int) -> None:
    if spec.bits != bits:
        raise BadInput(f"backend {spec.backend} stores {bits}-bit weights, but the spec asks for {spec.bits} bits")
    if spec.format != "bnb":
        raise BadInput(f"backend {spec.backend} needs format 'bnb', got {spec.format!r}")


def _quantize_4bit(weight: torch.Tensor, spec: LayerSpec, quant_type: str) -> QuantizedWeight:
    _check(spec, 4)
    F = _functional()
    W = weight.detach().float().contiguous()
    packed, state = F.quantize_4bit(W, blocksize=BNB_BLOCKSIZE, quant_type=quant_type)
    extra = {
        "qweight": packed.reshape(-1).contiguous(),
        "absmax": state.absmax.float().contiguous(),
        "quant_map": state.code.float().contiguous(),
    }
    return QuantizedWeight(spec, None, None, None, None, extra=extra, meta={"shape": tuple(W.shape)})


def nf4_quantize(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """NF4 (normal-float 4-bit) with one float32 absmax per 64 weights."""
    return _quantize_4bit(weight, spec, "nf4")


def fp4_quantize(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """FP4 (e2m1) with one float32 absmax per 64 weights."""
    return _quantize_4bit(weight, spec, "fp4")


def int8_quantize(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """LLM.int8 weights: int8 codes with one float32 absmax per output row (``w = q * absmax / 127``)."""
    _check(spec, 8)
    F = _functional()
    W = weight.detach().float().contiguous()
    q, row_absmax, _ = F.int8_vectorwise_quant(W)
    extra = {"qweight": q.to(torch.int8).contiguous(), "absmax": row_absmax.float().contiguous()}
    return QuantizedWeight(spec, None, None, None, None, extra=extra, meta={"shape": tuple(W.shape)})


BACKENDS.add("bnb-nf4", Backend("bnb-nf4", nf4_quantize, fixed_grid=(4, 64), package="bitsandbytes"))
BACKENDS.add("bnb-fp4", Backend("bnb-fp4", fp4_quantize, fixed_grid=(4, 64), package="bitsandbytes"))
BACKENDS.add("bnb-int8", Backend("bnb-int8", int8_quantize, fixed_grid=(8, -1), package="bitsandbytes"))
