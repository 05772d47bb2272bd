"""Tie groups for any solver: the members of a group (fused q/k/v, gate/up) must take one spec.

``merge`` turns each group into one unit whose candidates are the specs every member offers, with
the members' costs and errors summed; the solver runs on the units; ``expand`` maps the units'
choice back to one candidate index per original layer. Exact: a plan of the merged problem is a
plan of the original one that honours the ties, with the same total bytes and error.
"""
from __future__ import annotations

from typing import Sequence

from lwq.allocate.types import Candidate, LayerCandidates
from lwq.errors import BadInput


def merge(layers: Sequence[LayerCandidates], groups: Sequence[Sequence[str]]) -> tuple[list[LayerCandidates],
                                                                                    list[list[int]]]:
    """The units (one per tie group, in the position of its first member; other layers unchanged) and,
    per unit, the original layer indices it stands for."""
    pos = {lc.name: i for i, lc in enumerate(layers)}
    owner: dict[int, int] = {}
    members: list[list[int]] = []
    for g in groups:
        idx = [pos[n] for n in g if n in pos]
        if len(idx) != len(g):
            missing = next(n for n in g if n not in pos)
            raise BadInput(f"tie group names unknown layer {missing!r}")
        if len(idx) > 1:
            if any(i in owner for i in idx):
                raise BadInput(f"layer {layers[next(i for i in idx if i in owner)].name} is in two tie groups")
            for i in idx:
                owner[i] = len(members)
            members.append(idx)
    units: list[LayerCandidates] = []
    maps: list[list[int]] = []
    done: set[int] = set()
    for i, lc in enumerate(layers):
        if i not in owner:
            units.append(lc)
            maps.append([i])
            continue
        g = owner[i]
        if g in done:
            continue
        done.add(g)
        idx = members[g]
        common = [c.spec for c in layers[idx[0]].candidates
                  if all(any(d.spec == c.spec for d in layers[j].candidates) for j in idx[1:])]
        if not common:
            raise BadInput(f"tied layers {', '.join(layers[j].name for j in idx)} share no candidate spec")
        cands = []
        for spec in common:
            chosen = [next(d for d in layers[j].candidates if d.spec == spec) for j in idx]
            cands.append(Candidate(spec, sum(c.cost_bytes for c in chosen), sum(c.error for c in chosen)))
        name = "+".join(layers[j].name for j in idx)
        units.append(LayerCandidates(name, sum(layers[j].numel for j in idx), layers[idx[0]].shape, tuple(cands),
                                     layers[idx[0]].importance))
        maps.append(idx)
    return units, maps


def expand(layers: Sequence[LayerCandidates], units: Sequence[LayerCandidates], maps: Sequence[Sequence[int]],
           unit_index: Sequence[int]) -> list[int]:
    """One candidate index per original layer from the units' chosen indices."""
    index = [0] * len(layers)
    for unit, idx, k in zip(units, maps, unit_index):
        spec = unit.candidates[k].spec
        for j in idx:
            index[j] = next(n for n, c in enumerate(layers[j].candidates) if c.spec == spec)
    return index
