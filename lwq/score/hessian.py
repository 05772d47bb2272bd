"""``hessian``: the expected output error of quantizing a layer with round-to-nearest,
``trace(dW H dW^T)`` with ``dW = W - RTN(W)`` and ``H = X^T X / n`` from calibration (so the score
is the mean squared output error per token, ``E ||dW x||^2``). A block scores the sum over its
linears. **Higher score = more important** (more damage if quantized).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lwq.allocate.types import LayerCandidates
from lwq.backends.quant import rtn_fake_quant
from lwq.calib.stats import CalibStats
from lwq.errors import BadInput
from lwq.models.arch import linear_weight
from lwq.score.base import ScoreConfig, ScoreInputs, Scores, at_granularity

DEFAULT_BITS = 3


def hessian_error(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False) -> float:
    """``trace(dW H dW^T)`` for ``W`` (out, in), ``H`` (in, in), ``dW = W - rtn_fake_quant(W)``.
    With ``H = X^T X`` this is ``||dW X^T||_F^2``, the squared output error on the rows of ``X``."""
    W = W.detach().float()
    dW = W - rtn_fake_quant(W, bits, group_size, sym)
    Hf = H.to(device=W.device, dtype=torch.float32)
    return float(((dW @ Hf) * dW).sum())


def hessian_errors(layers: Sequence[LayerCandidates], weights: Mapping[str, torch.Tensor],
                   hessians: Mapping[str, torch.Tensor]) -> list[LayerCandidates]:
    """Every candidate's error ``hessian_error`` at its spec (0 for 16-bit), weights and H per linear name."""
    out = []
    for lc in layers:
        if lc.name not in weights or lc.name not in hessians:
            raise BadInput(f"no weight or Hessian for layer {lc.name}")
        W, H = weights[lc.name], hessians[lc.name]
        if tuple(W.shape) != lc.shape or tuple(H.shape) != (lc.shape[1], lc.shape[1]):
            raise BadInput(f"layer {lc.name}: weight {tuple(W.shape)} / Hessian {tuple(H.shape)} do not match "
                           f"shape {lc.shape}")
        out.append(lc.replace_errors([0.0 if c.spec.bits >= 16 else
                                      hessian_error(W, H, c.spec.bits, c.spec.group_size, c.spec.sym)
                                      for c in lc.candidates]))
    return out


def hessian_scores(model: nn.Module, stats: CalibStats, granularity: str = "block", bits: int = DEFAULT_BITS,
                   group_size: int = 128, sym: bool = False) -> Scores:
    """Output-error estimate per linear, or summed per block."""
    scores = {}
    for name, st in stats.linears.items():
        if st.hessian is None:
            raise ValueError(f"no Hessian for {name} in the calibration statistics")
        scores[name] = hessian_error(linear_weight(model.get_submodule(name)), st.hessian, bits, group_size, sym)
    return at_granularity(scores, model, granularity, "sum")


def run(inputs: ScoreInputs, cfg: ScoreConfig) -> Scores:
    assert inputs.model is not None and inputs.stats is not None
    return hessian_scores(inputs.model, inputs.stats, cfg.granularity, cfg.bits or DEFAULT_BITS, cfg.group_size,
                          cfg.sym)


def hessian_estimate(scorer: Any, inputs: Any) -> tuple[list[Any], None]:
    """The ``hessian`` scorer's planning estimate: ``trace(dW H dW^T)`` of every candidate."""
    from lwq.score.base import planning_stats

    stats = planning_stats(scorer, inputs, True)
    weights = {lc.name: linear_weight(inputs.model.get_submodule(lc.name)).detach().float() for lc in inputs.layers}
    hessians = {lc.name: stats.linears[lc.name].hessian for lc in inputs.layers}
    if any(h is None for h in hessians.values()):
        raise BadInput("the calibration statistics hold no Hessians; recalibrate")
    return hessian_errors(inputs.layers, weights, hessians), None
