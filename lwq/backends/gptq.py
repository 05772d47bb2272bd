"""Our GPTQ (Frantar et al., 2022): column-by-column quantization with optimal error feedback.

``W`` is the weight (out, in); ``H = X^T X`` (in, in) the Hessian of the layer's reconstruction
loss over calibration inputs ``X``. Columns are quantized in blocks; each column's rounding error,
scaled by the inverse Hessian's Cholesky factor, is pushed onto the columns not yet quantized.
"""
from __future__ import annotations

import torch

from lwq.backends.base import BACKENDS, Backend, QuantizedWeight
from lwq.backends.quant import QParams, minmax_params, mse_params, quantize_values
from lwq.backends.rtn import storable
from lwq.errors import BadInput, LwqError
from lwq.spec import LayerSpec

DAMP_RETRIES = 6


def inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` with ``damp = percdamp * mean(diag H)``; the
    dampening grows tenfold while the matrix is not positive definite."""
    if percdamp <= 0:
        raise BadInput(f"GPTQ dampening must be positive, got {percdamp}")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    base = float(torch.diag(H).mean()) or 1.0
    for attempt in range(DAMP_RETRIES):
        damp = percdamp * (10**attempt) * base
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U
    raise LwqError(f"GPTQ: Hessian not positive definite even with dampening {percdamp * 10**(DAMP_RETRIES - 1):g}"
                   " of its mean diagonal (too little or degenerate calibration data?)")


def _params(x: torch.Tensor, bits: int, sym: bool, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    s, z = (mse_params if mse else minmax_params)(x, bits, sym)
    qp = storable(QParams(s, z))
    return qp.scale, qp.zero


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: LayerSpec, blocksize: int = 128, percdamp: float = 0.01,
                  static_groups: bool = False, mse: bool = False) -> QuantizedWeight:
    """GPTQ of ``W`` (out, in) given ``H`` (in, in). Groups of ``spec.group_size`` columns (the last
    may be shorter) get min/max grids when the quantizer reaches their first column (or all up front
    with ``static_groups``). ``spec.act_order`` visits columns by decreasing ``diag(H)``; without static
    groups, groups then follow that order and ``g_idx`` maps each column to its group (GPTQ's desc_act).
    ``mse`` shrinks each group's range to minimise its rounding error (``mse_params``) instead.
    Dead columns (``H_ii == 0``) are zeroed. Pure function: inputs are not modified."""
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise BadInput(f"GPTQ: Hessian shape {tuple(H.shape)} does not match weight input size {in_f}")
    bits, gs = spec.bits, (in_f if spec.group_size == -1 else spec.group_size)
    ngroups = -(-in_f // gs)
    W = W.detach().float().clone()
    H = H.detach().float().clone().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scale = torch.zeros(out_f, ngroups, device=W.device)
    zero = torch.zeros(out_f, ngroups, device=W.device)
    if static_groups:
        for g in range(ngroups):
            scale[:, g], zero[:, g] = _params(W[:, g * gs:(g + 1) * gs], bits, spec.sym, mse)

    perm = torch.arange(in_f, device=W.device)
    if spec.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    # group of the column at each (permuted) position
    pos = torch.arange(in_f, device=W.device)
    col_group = (perm // gs) if static_groups else (pos // gs)

    U = inverse_cholesky(H, percdamp)
    Q = torch.zeros(out_f, in_f, dtype=torch.int32, device=W.device)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static_groups and col % gs == 0:
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                g = col // gs
                scale[:, g], zero[:, g] = _params(ahead, bits, spec.sym, mse)
            g = int(col_group[col])
            s, z = scale[:, g], zero[:, g]
            w = W1[:, i]
            q = quantize_values(w, s, z, bits)
            Q[:, col] = q.to(torch.int32)
            err = (w - s * (q - z)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    invperm = torch.argsort(perm)
    g_idx = col_group[invperm].to(torch.int32)
    return QuantizedWeight(spec, Q[:, invperm].contiguous(), scale, zero.to(torch.int32), g_idx)


def gptq_backend(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """The ``gptq`` backend: needs the layer's Hessian from calibration data."""
    if hessian is None:
        raise BadInput("the gptq backend needs calibration data (a Hessian per layer): pass --data PATH")
    return gptq_quantize(weight, hessian, spec)


def gptq_mse_backend(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """``gptq`` with MSE-optimal clipping of each group's grid (``--grid mse``)."""
    if hessian is None:
        raise BadInput("the gptq-mse backend needs calibration data (a Hessian per layer): pass --data PATH")
    return gptq_quantize(weight, hessian, spec, mse=True)


BACKENDS.add("gptq", Backend("gptq", gptq_backend, needs_hessian=True))
BACKENDS.add("gptq-mse", Backend("gptq-mse", gptq_mse_backend, needs_hessian=True))
