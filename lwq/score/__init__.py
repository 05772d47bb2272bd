"""Layer-importance scorers, one module each, registered by name in ``SCORERS``.

Every scorer returns ``{layer name: score}`` in model order, **higher score = more important**,
at ``block`` or ``linear`` granularity (see ``lwq.score.base``).
"""
from lwq.errors import BadInput
from lwq.registry import Registry
from lwq.score.base import GRANULARITIES, Scorer, ScoreConfig, ScoreInputs, Scores, ranks
from lwq.score.hessian import HESSIAN
from lwq.score.lim import LIM
from lwq.score.linearity import LINEARITY
from lwq.score.sensitivity import SENSITIVITY
from lwq.score.zd import ZD

SCORERS: Registry[Scorer] = Registry("scorer")
SCORERS.add("lim", LIM)
SCORERS.add("zd", ZD)
SCORERS.add("hessian", HESSIAN)
SCORERS.add("sensitivity", SENSITIVITY)
SCORERS.add("linearity", LINEARITY)


def parse_methods(text: str) -> list[str]:
    """``lim,zd`` -> ``["lim", "zd"]``, each checked against the registry (unknown names list the valid ones)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise BadInput(f"no scoring method given; valid: {', '.join(SCORERS.names())}")
    for n in names:
        SCORERS.get(n)
    return list(dict.fromkeys(names))


__all__ = ["SCORERS", "GRANULARITIES", "Scorer", "ScoreConfig", "ScoreInputs", "Scores", "ranks", "parse_methods"]
