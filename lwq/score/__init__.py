"""Layer-importance scorers and planning's error estimates, declared in ``SCORERS``.

Every scorer returns ``{layer name: score}`` in model order, **higher score = more important**,
at ``block`` or ``linear`` granularity (see ``lwq.score.base``). An entry declares what it reads and
how planning prices candidates with it; its code (one module each) loads on first use, so listing
the scorers imports no torch.
"""
from lwq.errors import BadInput
from lwq.registry import Registry
from lwq.score.base import GRANULARITIES, EstimateInputs, Scorer, ScoreConfig, ScoreInputs, Scores, ranks

SCORERS: Registry[Scorer] = Registry("scorer")
SCORERS.add("lim", Scorer("lim", "lwq.score.lim:run", frozenset({"stats"}),
                          "1 - cos(block input, block output), token mean", streams=True))
SCORERS.add("zd", Scorer("zd", "lwq.score.zd:run", frozenset({"model"}),
                         "share of weights with |z-score| > 1 (direction: --zd-order)"))
SCORERS.add("hessian", Scorer("hessian", "lwq.score.hessian:run", frozenset({"model", "stats", "hessians"}),
                              "trace(dW H dW^T), dW from RTN at --bits (default 3)",
                              estimate="lwq.score.hessian:hessian_estimate", prices_grids=True))
SCORERS.add("sensitivity", Scorer(
    "sensitivity", "lwq.score.sensitivity:run", frozenset({"model", "samples"}),
    "measured KL (or NLL) increase when only that layer is RTN-quantized at --bits (default 2)",
    estimate="lwq.score.measured:estimate", streams=True, prices_grids=True))
SCORERS.add("linearity", Scorer(
    "linearity", "lwq.score.linearity:run", frozenset({"model", "samples"}),
    "a_l of the linearity theorem: KL per unit relative weight noise (Fisher, one pass per window)",
    estimate="lwq.score.linearity:estimate", streams=True, prices_grids=True))


def parse_methods(text: str) -> list[str]:
    """``lim,zd`` -> ``["lim", "zd"]``, each checked against the registry (unknown names list the valid ones)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise BadInput(f"no scoring method given; valid: {', '.join(SCORERS.names())}")
    for n in names:
        SCORERS.get(n)
    return list(dict.fromkeys(names))


__all__ = ["SCORERS", "GRANULARITIES", "EstimateInputs", "Scorer", "ScoreConfig", "ScoreInputs", "Scores", "ranks",
           "parse_methods"]
