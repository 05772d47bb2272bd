"""The ``bnb`` layout: bitsandbytes' quantized state as plain tensors, dequantized in pure torch.

4-bit (NF4/FP4): ``qweight`` uint8 [ceil(n/2)] (two codes a byte, first in the high nibble, over the
row-major flattened weight), ``absmax`` float32 [ceil(n/64)], ``quant_map`` float32 [16] (the code
book: NF4 or FP4). 8-bit (LLM.int8): ``qweight`` int8 [out, in], ``absmax`` float32 [out].
"""
from __future__ import annotations

import torch

from lwq.backends.base import QuantizedWeight
from lwq.formats.layout import LAYOUTS, Layout, Tensors
from lwq.spec import LayerSpec

BLOCKSIZE = 64
CODEBOOK = 16


def _blocks(n: int) -> int:
    return -(-n // BLOCKSIZE)


class BnbLayout(Layout):
    """bitsandbytes NF4/FP4 (``bits == 4``) or LLM.int8 (``bits == 8``) weights."""

    name = "bnb"

    def pack(self, qw: QuantizedWeight) -> Tensors:
        return {k: v.contiguous() for k, v in qw.extra.items() if k in ("qweight", "absmax", "quant_map")}

    def dequantize(self, t: Tensors, spec: LayerSpec, shape: tuple[int, int]) -> torch.Tensor:
        out_f, in_f = shape
        if spec.bits == 8:
            return t["qweight"].float() * (t["absmax"].float()[:, None] / 127.0)
        n = out_f * in_f
        b = t["qweight"].reshape(-1).to(torch.int32) & 0xFF
        codes = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()
        scale = t["absmax"].float().repeat_interleave(BLOCKSIZE)[:n]
        return (t["quant_map"].float()[codes] * scale).reshape(out_f, in_f)

    def cost(self, out_features: int, in_features: int, spec: LayerSpec) -> int:
        n = out_features * in_features
        if spec.bits == 8:
            return n + 4 * out_features
        return -(-n // 2) + 4 * _blocks(n) + 4 * CODEBOOK

    def empty(self, spec: LayerSpec, shape: tuple[int, int]) -> Tensors:
        """Zero tensors of the right shapes and dtypes (to load a checkpoint into)."""
        out_f, in_f = shape
        n = out_f * in_f
        if spec.bits == 8:
            return {"qweight": torch.zeros(out_f, in_f, dtype=torch.int8), "absmax": torch.zeros(out_f)}
        return {"qweight": torch.zeros(-(-n // 2), dtype=torch.uint8), "absmax": torch.zeros(_blocks(n)),
                "quant_map": torch.zeros(CODEBOOK)}


LAYOUTS.add("bnb", BnbLayout())
