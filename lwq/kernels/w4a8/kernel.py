"""Triton kernels for int8 activations: per-token activation quantization and the int8 GEMM.

``quant_act_kernel`` (``ROWS`` rows per program): ``v = x * inv_smooth`` in fp32, ``amax = max|v|``
(at least ``reference.EPS`` = 1e-12), ``q = rint(v * (127 / amax))`` clamped to +-127 (round half to even with the
1.5 * 2**23 trick, IEEE divisions via ``div_rn``), ``scale = amax / 127``; bit-identical to
``lwq.kernels.w4a8.reference.quantize_activations``.

``wa8_kernel``: int8 activations times signed weight codes (``code - 2**(BITS-1)``, 4- or 6-bit,
unpacked in registers to int8) by ``tl.dot`` into int32, one int32 accumulator per group of input
columns (groups contiguous; ``GROUP`` a multiple of ``BLOCK_K``), each flushed into the fp32
accumulator times that group's fp16 scale; rows scaled by the token scales at the end.
``SPLIT_K > 1`` splits the K tiles across programs that ``atomic_add`` into an fp32 output.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lwq.kernels.w4a16.kernel import load_codes, round_bf16


# ``tl.max`` is a jitted standard-library function (see ``w4a16.kernel``); its combine function is given
# to ``tl.reduce`` directly: the interpreter recognises it and reduces with numpy instead of calling it per element.
@triton.jit
def quant_act_kernel(x_ptr, inv_ptr, xq_ptr, xs_ptr, M, K, stride_xm,
                     HAS_SMOOTH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_r = rows < M
    vmax = tl.full((ROWS, BLOCK), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = mask_r[:, None] & (offs < K)[None, :]
        v = tl.load(x_ptr + rows[:, None] * stride_xm + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            v = v * tl.load(inv_ptr + offs, mask=offs < K, other=0.0)[None, :]
        vmax = tl.maximum(vmax, tl.abs(v))
    amax = tl.maximum(tl.reduce(vmax, 1, tl.standard._elementwise_max), 1e-12)
    inv = tl.math.div_rn(tl.full((ROWS,), 127.0, tl.float32), amax)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = mask_r[:, None] & (offs < K)[None, :]
        v = tl.load(x_ptr + rows[:, None] * stride_xm + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            v = v * tl.load(inv_ptr + offs, mask=offs < K, other=0.0)[None, :]
        r = (v * inv[:, None] + 12582912.0) - 12582912.0
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(xq_ptr + rows[:, None] * K + offs[None, :], r.to(tl.int8), mask=mask)
    tl.store(xs_ptr + rows, tl.math.div_rn(amax, tl.full((ROWS,), 127.0, tl.float32)), mask=mask_r)


@triton.jit
def wa8_kernel(xq_ptr, xs_ptr, w_ptr, hi_ptr, s_ptr, out_ptr, M, N, K, GROUP,
               BITS: tl.constexpr, SPLIT_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               ROUNDING: tl.constexpr, EMULATE_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    tiles = (K + BLOCK_K - 1) // BLOCK_K
    tiles_per_group = GROUP // BLOCK_K
    per_split = (tiles + SPLIT_K - 1) // SPLIT_K
    t = pid_k * per_split
    t1 = tl.minimum(t + per_split, tiles)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    while t < t1:
        g = t // tiles_per_group
        t_end = tl.minimum((g + 1) * tiles_per_group, t1)
        iacc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        for tt in range(t, t_end):
            offs_k = tt * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(xq_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0)
            q = load_codes(w_ptr, hi_ptr, offs_k, offs_n, mask_k[:, None] & mask_n[None, :], N, BITS)
            b = (q - (1 << (BITS - 1))).to(tl.int8)
            iacc = tl.dot(a, b, acc=iacc)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += iacc.to(tl.float32) * s[None, :]
        t = t_end
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    acc = acc * xs[:, None]
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask_o = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if EMULATE_BF16:
            acc = round_bf16(acc)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty, fp_downcast_rounding=ROUNDING), mask=mask_o)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask_o)
