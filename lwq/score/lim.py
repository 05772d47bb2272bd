"""``lim``: layer input modification, ``1 - cos(block input, block output)`` averaged over tokens
(ShortGPT's Block Influence). A block that barely changes its input (LIM near 0) is unimportant;
**higher score = more important**.

At ``linear`` granularity every linear gets its block's LIM: the cosine between a linear's own
input and output is not defined for non-square layers, and the block is the unit whose residual
update LIM measures. Ranks within a block are therefore tied (model order breaks the tie).
"""
from __future__ import annotations

from lwq.calib.stats import CalibStats
from lwq.score.base import ScoreConfig, ScoreInputs, Scores


def lim_scores(stats: CalibStats, granularity: str = "block") -> Scores:
    """LIM per block (or per linear, each carrying its block's value)."""
    if granularity == "block":
        return {name: b.lim for name, b in stats.blocks.items()}
    return {name: stats.blocks[stats.block_of(name)].lim for name in stats.linears}


def run(inputs: ScoreInputs, cfg: ScoreConfig) -> Scores:
    assert inputs.stats is not None
    return lim_scores(inputs.stats, cfg.granularity)
