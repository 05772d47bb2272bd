"""SmoothQuant (Xiao et al.): move activation outliers into the weights before quantization.

For a linear with int8 activations, per-input-channel factors ``s`` turn ``x @ W^T`` into
``(x / s) @ (W * s)^T``: the weight is multiplied by ``s`` before its backend quantizes it, the
factors are stored with the layer (``smooth`` in the W4A8 / W6A8 layouts) and the kernels divide
the activations by them. Weight-only layers are never changed.
"""
from __future__ import annotations

from typing import Callable

import torch

from lwq.errors import BadInput, LwqError
from lwq.spec import LayerSpec

SMOOTH_MIN, SMOOTH_MAX = 1e-4, 1e4  # inside fp16's normal range
DEFAULT_ALPHA = 0.5  # SmoothQuant's migration strength


def smooth_factors(act_absmax: torch.Tensor, W: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s_j = max|X_j|^alpha / max|W_:j|^(1-alpha)`` (fp32 [in],
    rounded to fp16 as stored; 1 where a channel never fires or its weights are all zero)."""
    a = act_absmax.float().to(W.device)
    w = W.float().abs().amax(dim=0)
    s = a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s)).clamp(SMOOTH_MIN, SMOOTH_MAX)
    return s.to(torch.float16).float()


def smooth_weight(name: str, W: torch.Tensor, act_absmax: torch.Tensor | None,
                  spec: LayerSpec, alpha: float = DEFAULT_ALPHA) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pre-quantize hook: for int8 activations, ``(W * s, {"smooth": s})`` with ``s = smooth_factors``
    (``x @ W^T == (x / s) @ (W * s)^T``); weight-only specs or no statistics: ``(W, {})``."""
    if spec.act_bits != 8 or act_absmax is None:
        return W, {}
    if act_absmax.shape != (W.shape[1],):
        raise LwqError(f"{name}: activation absmax has shape {tuple(act_absmax.shape)}, expected ({W.shape[1]},)")
    s = smooth_factors(act_absmax, W, alpha)
    return (W.float() * s[None, :]).to(W.dtype), {"smooth": s}


def smoothing(alpha: float | None) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """A pre-quantize hook (``lwq.pipeline.blockwise.PreQuantize``) for int8-activation layers: SmoothQuant with
    migration strength ``alpha`` in [0, 1], or none at all (``None``: the stored factors are ones).
    Weight-only layers are left as they are either way."""
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise BadInput(f"smoothing alpha must be in [0, 1], got {alpha}")

    def hook(name: str, W: torch.Tensor, act_absmax: torch.Tensor | None,
             spec: LayerSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if alpha is None:
            return W, {}
        return smooth_weight(name, W, act_absmax, spec, alpha)

    return hook
