"""Round-to-nearest backends: ``rtn`` (per-group min/max or absmax) and ``rtn-mse`` (MSE-optimal clipping)."""
from __future__ import annotations

import torch

from lwq.backends.base import BACKENDS, Backend, QuantizedWeight
from lwq.backends.quant import QParams, quantize_with, rtn_params
from lwq.kernels.pack import group_index
from lwq.spec import LayerSpec

FP16_MIN_NORMAL = 2.0**-14


def storable(qp: QParams) -> QParams:
    """The grid exactly as the checkpoint stores it: scales rounded to float16 (and kept above its
    smallest normal), so codes are chosen for the scales that will really be used."""
    return QParams(qp.scale.clamp_min(FP16_MIN_NORMAL).to(torch.float16).float(), qp.zero)


def rtn_quantize(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor | None = None,
                 mse: bool = False) -> QuantizedWeight:
    """Round-to-nearest of ``weight`` (out, in) per group of ``spec.group_size`` input columns
    (ragged last group allowed); ``mse`` shrinks each group's range to minimise the error."""
    W = weight.detach().float()
    qp = storable(rtn_params(W, spec.bits, spec.group_size, spec.sym, mse))
    g_idx = group_index(W.shape[1], spec.group_size, W.device)
    q = quantize_with(W, qp, g_idx, spec.bits)
    return QuantizedWeight(spec, q, qp.scale, qp.zero, g_idx)


def rtn_mse_quantize(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """``rtn`` with the MSE-optimal clipping search (GPTQ's ``mse`` grid search, norm 2.4)."""
    return rtn_quantize(weight, spec, hessian, mse=True)


def keep_fp16(weight: torch.Tensor, spec: LayerSpec) -> QuantizedWeight:
    """A layer the plan keeps in 16-bit (``fp16`` format): the weight itself, in float16."""
    w = weight.detach().to(torch.float16).contiguous()
    return QuantizedWeight(spec, None, None, None, None, extra={"weight": w}, meta={"shape": tuple(w.shape)})


BACKENDS.add("rtn", Backend("rtn", rtn_quantize))
BACKENDS.add("rtn-mse", Backend("rtn-mse", rtn_mse_quantize))
