"""Triton weight-only GEMM: ``out = x @ dequant(W)`` with the dequantization done in registers.

One kernel serves W4A16 over GPTQ's layout (``BITS`` in 2/4/8, codes packed 32/BITS per int32 word
along the input dimension, zero points packed along the output dimension, ``g_idx`` per input
column, act-order included) and W6A16 over the int6 bit-plane layout (``BITS == 6``: a 4-bit plane
and a 2-bit plane, contiguous groups, zero points as uint8 or the symmetric constant).
``SPLIT_K > 1`` splits the K loop across programs that ``atomic_add`` into an fp32 output: the
decode (M <= 16) variant. Imported lazily (see ``lwq.kernels.runtime``).

The kernels use only Triton builtins and their own ``@triton.jit`` helpers, no ``triton.language.standard``
function (``tl.cdiv``, ``tl.zeros``, ``tl.max``): those are jitted when ``triton`` is first imported, so
under an interpreter switched on after that import they would not run.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_codes(w_ptr, hi_ptr, offs_k, offs_n, mask, N, BITS: tl.constexpr):
    """Unsigned codes [BLOCK_K, BLOCK_N] of rows ``offs_k`` and columns ``offs_n`` (int32)."""
    if BITS == 6:
        lo = tl.load(w_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=mask, other=0)
        hi = tl.load(hi_ptr + (offs_k[:, None] // 16) * N + offs_n[None, :], mask=mask, other=0)
        q = ((lo >> ((offs_k[:, None] % 8) * 4)) & 15) | (((hi >> ((offs_k[:, None] % 16) * 2)) & 3) << 4)
    else:
        PER: tl.constexpr = 32 // BITS
        w = tl.load(w_ptr + (offs_k[:, None] // PER) * N + offs_n[None, :], mask=mask, other=0)
        q = (w >> ((offs_k[:, None] % PER) * BITS)) & ((1 << BITS) - 1)
    return q


@triton.jit
def round_bf16(v):
    """fp32 values rounded to the nearest bf16 (ties to even), kept in fp32: the interpreter's own
    fp32 -> bf16 cast truncates, so under ``EMULATE_BF16`` casts go through this exact bit trick."""
    b = v.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


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
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    tiles = (K + BLOCK_K - 1) // BLOCK_K
    per_split = (tiles + SPLIT_K - 1) // SPLIT_K
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, tiles)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for t in range(t0, t1):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_w = mask_k[:, None] & mask_n[None, :]
        q = load_codes(w_ptr, hi_ptr, offs_k, offs_n, mask_w, N, BITS)
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
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask_o = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if EMULATE_BF16:
            acc = round_bf16(acc)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty, fp_downcast_rounding=ROUNDING), mask=mask_o)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask_o)
