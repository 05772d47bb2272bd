"""Triton weight-only GEMM: ``out = x @ dequant(W)`` with the dequantization done in registers.

One kernel serves W4A16 over GPTQ's layout (``BITS`` in 2/4/8, codes packed 32/BITS per int32 word
along the input dimension, zero points packed along the output dimension, ``g_idx`` per input
column, act-order included) and W6A16 over the int6 bit-plane layout (``BITS == 6``: a 4-bit plane
and a 2-bit plane, contiguous groups, zero points as uint8 or the symmetric constant).
``SPLIT_K > 1`` splits the K loop across programs that ``atomic_add`` into an fp32 output: the
decode (M <= 16) variant. Imported lazily (see ``lwq.kernels.runtime``).

The weight unpacking, tile offsets and output store are the ``@triton.jit`` helpers of
``lwq.kernels.triton_common``, shared with the int8 GEMM; no ``triton.language.standard`` function is
used (see there).
"""
from __future__ import annotations

import triton
import triton.language as tl

from lwq.kernels.triton_common import load_k_tile, round_bf16, store_tile, tile_offsets


@triton.jit
def wa16_kernel(x_ptr, w_ptr, hi_ptr, s_ptr, z_ptr, gidx_ptr, out_ptr,
                M, N, K, GROUP, ZWORDS, stride_xm,
                BITS: tl.constexpr, ZERO_MODE: tl.constexpr, HAS_GIDX: tl.constexpr, SPLIT_K: tl.constexpr,
                EMULATE_BF16: tl.constexpr, ROUNDING: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """ZERO_MODE 0: symmetric constant 2**(BITS-1); 1: GPTQ qzeros int32 [groups, ZWORDS] packed along N;
    2: uint8 zeros [groups, N]. Without ``HAS_GIDX`` the group of column k is ``k // GROUP``.
    ``EMULATE_BF16`` (set under the interpreter, whose bf16 dot and casts are wrong) rounds to bf16 with
    ``round_bf16`` and multiplies the bf16 values in fp32 (the same products)."""
    offs_m, offs_n, mask_m, mask_n, t0, t1 = tile_offsets(M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for t in range(t0, t1):
        x, q, offs_k, mask_k, mask_w = load_k_tile(x_ptr, stride_xm, w_ptr, hi_ptr, offs_m, offs_n, mask_m, mask_n,
                                                   t, K, N, BITS, BLOCK_K)
        if HAS_GIDX:
            g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
        else:
            g = offs_k // GROUP
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_w, other=0.0).to(tl.float32)
        if ZERO_MODE == 0:
            z = 1 << (BITS - 1)
        elif ZERO_MODE == 1:
            PER: tl.constexpr = 32 // BITS
            zw = tl.load(z_ptr + g[:, None] * ZWORDS + offs_n[None, :] // PER, mask=mask_w, other=0)
            z = (zw >> ((offs_n[None, :] % PER) * BITS)) & ((1 << BITS) - 1)
        else:
            z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=mask_w, other=0).to(tl.int32)
        w = (q - z).to(tl.float32) * s
        if x.dtype == tl.float32:
            acc = tl.dot(x, w, acc=acc, input_precision="ieee")
        elif EMULATE_BF16:
            # Interpreter only: its bf16 dot is wrong; fp32 products of the bf16 values are the same.
            w = round_bf16(w)
            acc = tl.dot(x.to(tl.float32), w, acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype, fp_downcast_rounding="rtne"), acc=acc)
    store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, SPLIT_K, EMULATE_BF16, ROUNDING)
