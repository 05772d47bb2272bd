"""``hessian``: the expected output error of quantizing a layer with round-to-nearest,
``trace(dW H dW^T)`` with ``dW = W - RTN(W)`` and ``H = X^T X / n`` from calibration (so the score
is the mean squared output error per token, ``E ||dW x||^2``). A block scores the sum over its
linears. **Higher score = more important** (more damage if quantized).
"""
from __future__ import annotations

import torch
from torch import nn

from lwq.backends.quant import rtn_fake_quant
from lwq.calib.stats import CalibStats
from lwq.models.arch import linear_weight
from lwq.score.base import Scorer, ScoreConfig, ScoreInputs, Scores, at_granularity

DEFAULT_BITS = 3


def hessian_error(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False) -> float:
    """``trace(dW H dW^T)`` for ``W`` (out, in), ``H`` (in, in), ``dW = W - rtn_fake_quant(W)``.
    With ``H = X^T X`` this is ``||dW X^T||_F^2``, the squared output error on the rows of ``X``."""
    W = W.detach().float()
    dW = W - rtn_fake_quant(W, bits, group_size, sym)
    Hf = H.to(device=W.device, dtype=torch.float32)
    return float(((dW @ Hf) * dW).sum())


def hessian_scores(model: nn.Module, stats: CalibStats, granularity: str = "block", bits: int = DEFAULT_BITS,
                   group_size: int = 128, sym: bool = False) -> Scores:
    """Output-error estimate per linear, or summed per block."""
    scores = {}
    for name, st in stats.linears.items():
        if st.hessian is None:
            raise ValueError(f"no Hessian for {name} in the calibration statistics")
        scores[name] = hessian_error(linear_weight(model.get_submodule(name)), st.hessian, bits, group_size, sym)
    return at_granularity(scores, model, granularity, "sum")


def _run(inputs: ScoreInputs, cfg: ScoreConfig) -> Scores:
    assert inputs.model is not None and inputs.stats is not None
    return hessian_scores(inputs.model, inputs.stats, cfg.granularity, cfg.bits or DEFAULT_BITS, cfg.group_size,
                          cfg.sym)


HESSIAN = Scorer("hessian", _run, frozenset({"model", "stats", "hessians"}),
                 "trace(dW H dW^T), dW from RTN at --bits (default 3)")
