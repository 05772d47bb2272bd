"""Groups of layer names for the solvers: per-block units (``order``) and tie groups (``ilp``).

Pure string work on module names such as ``model.layers.3.self_attn.q_proj``: ``blocks`` is the
dotted path of the decoder-block list and ``groups`` the arch table's ordered linear groups inside
a block (``lwq.models.arch.ArchSpec.blocks`` / ``.groups``).
"""
from __future__ import annotations

import re
from typing import Sequence

from lwq.errors import BadInput

TIE_MODES = ("none", "fused", "block")


def split_name(name: str, blocks: str) -> tuple[int, str] | None:
    """``(block index, suffix)`` of a module inside the block list, or ``None`` when outside it."""
    m = re.fullmatch(re.escape(blocks) + r"\.(\d+)\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else None


def block_units(names: Sequence[str], blocks: str) -> list[list[str]]:
    """The names grouped per decoder block (in block order); names outside blocks are units of one."""
    units: dict[object, list[str]] = {}
    for n in names:
        parts = split_name(n, blocks)
        units.setdefault(("block", parts[0]) if parts else ("layer", n), []).append(n)
    return list(units.values())


def tie_groups(names: Sequence[str], blocks: str, groups: Sequence[Sequence[str]], mode: str) -> list[list[str]]:
    """Tie groups for ``ilp``: ``none`` -> none; ``block`` -> all linears of each block; ``fused`` ->
    each multi-member arch group per block (q/k/v, gate/up: the shards serving engines fuse)."""
    if mode not in TIE_MODES:
        raise BadInput(f"tie mode must be one of {', '.join(TIE_MODES)}, got {mode!r}")
    if mode == "none":
        return []
    if mode == "block":
        return [u for u in block_units(names, blocks) if len(u) > 1]
    member = {suffix: gi for gi, g in enumerate(groups) for suffix in g if len(g) > 1}
    out: dict[tuple[int, int], list[str]] = {}
    for n in names:
        parts = split_name(n, blocks)
        if parts and parts[1] in member:
            out.setdefault((parts[0], member[parts[1]]), []).append(n)
    return [g for g in out.values() if len(g) > 1]
