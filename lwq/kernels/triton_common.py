"""``@triton.jit`` helpers shared by the GEMM kernels (``w4a16.kernel``, ``w4a8.kernel``).

``load_k_tile`` loads a K tile of activations and unpacks its weight codes in registers (GPTQ
words of 32/BITS codes, or the int6 4-bit and 2-bit planes); ``tile_offsets`` gives a program's
output tile and its share of the K tiles (split-K); ``store_tile`` writes or ``atomic_add``s the
fp32 accumulator; ``round_bf16`` is the interpreter's bf16 rounding. This module imports
``triton``: like the ``kernel.py`` modules it is imported lazily (only by them), after
``TRITON_INTERPRET`` is set, so ``lwq`` still imports without Triton.

The helpers use only Triton builtins, no ``triton.language.standard`` function (``tl.cdiv``,
``tl.zeros``, ``tl.max``): those are jitted when ``triton`` is first imported, so under an interpreter
switched on after that import they would not run.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_k_tile(x_ptr, stride_xm, w_ptr, hi_ptr, offs_m, offs_n, mask_m, mask_n, t, K, N,
                BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """K tile ``t``: the activations [BLOCK_M, BLOCK_K] (zero where masked) and the unsigned weight
    codes [BLOCK_K, BLOCK_N] (int32) unpacked in registers: ``(x, q, offs_k, mask_k, mask_w)``."""
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=mask_m[:, None] & mask_k[None, :], other=0)
    mask_w = mask_k[:, None] & mask_n[None, :]
    if BITS == 6:
        lo = tl.load(w_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=mask_w, other=0)
        hi = tl.load(hi_ptr + (offs_k[:, None] // 16) * N + offs_n[None, :], mask=mask_w, other=0)
        q = ((lo >> ((offs_k[:, None] % 8) * 4)) & 15) | (((hi >> ((offs_k[:, None] % 16) * 2)) & 3) << 4)
    else:
        PER: tl.constexpr = 32 // BITS
        w = tl.load(w_ptr + (offs_k[:, None] // PER) * N + offs_n[None, :], mask=mask_w, other=0)
        q = (w >> ((offs_k[:, None] % PER) * BITS)) & ((1 << BITS) - 1)
    return x, q, offs_k, mask_k, mask_w


@triton.jit
def round_bf16(v):
    """fp32 values rounded to the nearest bf16 (ties to even), kept in fp32: the interpreter's own
    fp32 -> bf16 cast truncates, so under ``EMULATE_BF16`` casts go through this exact bit trick."""
    b = v.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def tile_offsets(M, N, K, SPLIT_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's rows and columns with their masks, and its K tiles ``[t0, t1)``:
    ``(offs_m, offs_n, mask_m, mask_n, t0, t1)``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tiles = (K + BLOCK_K - 1) // BLOCK_K
    per_split = (tiles + SPLIT_K - 1) // SPLIT_K
    t0 = tl.program_id(2) * per_split
    t1 = tl.minimum(t0 + per_split, tiles)
    return offs_m, offs_n, offs_m < M, offs_n < N, t0, t1


@triton.jit
def store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, N, SPLIT_K: tl.constexpr,
               EMULATE_BF16: tl.constexpr, ROUNDING: tl.constexpr):
    """Store the fp32 ``acc`` in ``out_ptr``'s dtype (``SPLIT_K == 1``) or ``atomic_add`` it into an
    fp32 output (split-K)."""
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask_o = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if EMULATE_BF16:
            acc = round_bf16(acc)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty, fp_downcast_rounding=ROUNDING), mask=mask_o)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask_o)
