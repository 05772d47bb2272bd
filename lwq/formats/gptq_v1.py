"""GPTQ v1 tensors and config for ``lwq export``: ``qweight`` int32 [ceil(in*bits/32), out] (codes
packed along the input dimension), ``qzeros`` int32 [groups, ceil(out*bits/32)] holding ``zero - 1``
(wrapped to ``bits`` bits, as AutoGPTQ writes them), ``scales`` fp16 [groups, out], ``g_idx`` int32 [in].
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from lwq.spec import LayerSpec


def v1_tensors(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int, v2: bool = False) -> dict[str, torch.Tensor]:
    """GPTQ tensors from codes packed along the input dim, integer zero points (groups, out), scales
    and g_idx: zeros are stored minus one, wrapped to ``bits`` bits (v1), or as they are (``v2``),
    packed along the out dim."""
    from lwq.kernels.pack import pack

    stored = zeros.to(torch.int64) if v2 else (zeros.to(torch.int64) - 1) & ((1 << bits) - 1)
    return {"qweight": qweight.to(torch.int32).contiguous(), "qzeros": pack(stored, bits, dim=1),
            "scales": scales.to(torch.float16).contiguous(), "g_idx": g_idx.to(torch.int32).contiguous()}


def gptq_from_lwq(t: Mapping[str, torch.Tensor], bits: int, out_features: int,
                  shape: tuple[int, int] | None = None, group_size: int = -1,
                  v2: bool = False) -> dict[str, torch.Tensor]:
    """Convert lwq's GPTQ-layout tensors (zero points stored as they are) to GPTQ v1. GPTQ readers
    need ``g_idx`` and ``qzeros``: ones lwq did not store (no act-order; symmetric) are written out."""
    from lwq.kernels.pack import group_index
    from lwq.kernels.pack import unpack

    g_idx = t.get("g_idx")
    if "qzeros" in t:
        zeros = unpack(t["qzeros"], bits, out_features, dim=1)
    else:  # symmetric: lwq stores no zero points, GPTQ readers need them
        zeros = torch.full((t["scales"].shape[0], out_features), 1 << (bits - 1), dtype=torch.int32)
    if g_idx is None:
        if shape is None:
            raise ValueError("gptq_from_lwq: a layer without g_idx needs its shape")
        g_idx = group_index(shape[1], group_size)
    return v1_tensors(t["qweight"], zeros, t["scales"], g_idx, bits, v2)


def gptq_requantized(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                     v2: bool = False) -> dict[str, torch.Tensor]:
    """RTN of a float weight (out, in) into GPTQ v1 tensors (scales rounded to fp16 before rounding codes)."""
    from lwq.backends.rtn import rtn_quantize
    from lwq.kernels.pack import pack

    qw = rtn_quantize(weight.float(), LayerSpec(bits=bits, group_size=group_size, sym=sym, format="gptq"))
    assert qw.q is not None and qw.zero is not None and qw.scale is not None and qw.g_idx is not None
    return v1_tensors(pack(qw.q.t().contiguous(), bits, dim=0), qw.zero.t(), qw.scale.t(), qw.g_idx, bits, v2)


def gptq_quantization_config(default: Mapping[str, Any], dynamic: Mapping[str, Any], version: str,
                             checkpoint_format: str = "gptq") -> dict[str, Any]:
    """``quantization_config`` / ``quantize_config.json`` of the export (``format`` and
    ``checkpoint_format`` both: GPTQModel prefers the first, transformers the second)."""
    return {"quant_method": "gptq", "bits": default["bits"], "group_size": default["group_size"],
            "desc_act": default["desc_act"], "sym": default["sym"], "checkpoint_format": checkpoint_format,
            "format": checkpoint_format,
            "pack_dtype": "int32", "lm_head": False, "true_sequential": True, "static_groups": False,
            "dynamic": dict(dynamic), "meta": {"quantizer": [f"lwq:{version}"]}}
