"""What an export does with each block linear, decided from the plan, the shapes and a target's
rule (pure: no tensors). Used by the GPTQ and compressed-tensors exports alike.

Per layer: copy the quantized codes as they are, re-quantize with RTN from the dequantized weight
(only with ``fix``, when the rule cannot take the layer as it is; every change is listed), or keep it
16-bit. A ragged layer (in_features not a multiple of its group size) under a rule that takes any
group size is written losslessly with the group size ``gcd(in_features, group_size)`` (each group's
scale repeated), noted with the bytes it adds. Refusals are one line naming the layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from lwq.errors import BadInput
from lwq.formats.targets import FormatRule, ServingTarget, check, nearest_bits, served_spec, whole_group_size
from lwq.spec import LayerSpec


@dataclass(frozen=True)
class LayerExport:
    """One block linear in the export: ``bits`` 16 keeps a plain 16-bit ``.weight``; ``requantize``
    (a reason) means RTN from the dequantized source weight; ``split`` > 0 writes the layer's groups
    as groups of ``split`` columns (lossless, ragged layers); otherwise the codes are copied."""

    name: str
    source: LayerSpec | None  # None: not in the plan (the source holds its original ``.weight``)
    bits: int
    group_size: int
    sym: bool
    requantize: str | None = None
    split: int = 0

    @property
    def kept(self) -> bool:
        return self.bits >= 16

    @property
    def key(self) -> tuple[int, int, bool]:
        return (16, -1, False) if self.kept else (self.bits, self.split or self.group_size, self.sym)

    def to_dict(self) -> dict[str, Any]:
        action = ("kept 16-bit" if self.kept else "re-quantized (RTN)" if self.requantize else
                  f"copied (groups split to {self.split})" if self.split else "copied")
        return {"bits": self.bits, "group_size": self.split or self.group_size, "sym": self.sym, "action": action,
                "reason": self.requantize, "source": None if self.source is None else self.source.label}


def _first(names: Sequence[str], why: Mapping[str, str]) -> str:
    shown = "; ".join(f"{n} ({why[n]})" for n in names[:3])
    return shown + (f"; and {len(names) - 3} more" if len(names) > 3 else "")


def _one(name: str, spec: LayerSpec | None, in_f: int, rule: FormatRule) -> tuple[LayerExport, list[str]]:
    if spec is None or spec.bits >= 16 or spec.format == "fp16":
        return LayerExport(name, spec, 16, -1, False), []
    reasons = check(rule, spec, in_f)
    ragged = spec.group_size != -1 and in_f % spec.group_size != 0
    if ragged and rule.format == "compressed-tensors" and rule.group_sizes is None and rule.whole_groups:
        rest = check(rule, replace(spec, group_size=-1), in_f)
        if not rest:  # only the ragged groups are in the way: split them losslessly
            return LayerExport(name, spec, spec.bits, spec.group_size, spec.sym,
                               split=math.gcd(in_f, spec.group_size)), []
    if not reasons:
        return LayerExport(name, spec, spec.bits, spec.group_size, spec.sym), []
    fixed = served_spec(rule, replace(spec, bits=nearest_bits(spec.bits, rule.bits), format="gptq",
                                      act_bits=16), in_f)
    bits, gs, sym = (fixed.bits, fixed.group_size, fixed.sym) if fixed else \
        (nearest_bits(spec.bits, rule.bits), whole_group_size(in_f, spec.group_size, rule.group_sizes), True)
    return LayerExport(name, spec, bits, gs, sym, "; ".join(reasons)), reasons


def decide(plan: Mapping[str, LayerSpec], shapes: Mapping[str, tuple[int, int]], groups: Sequence[Sequence[str]],
           target: ServingTarget, fmt: str, fix: bool) -> tuple[dict[str, LayerExport], list[str]]:
    """Per block linear (``shapes``: name -> (out, in), model order), what the export of format
    ``fmt`` for ``target`` writes, and notes of every change. ``groups``: fused shards (full names)."""
    rule = target.rule(fmt)
    if rule is None:
        raise BadInput(f"{target.name} does not read {fmt}; it reads {', '.join(target.formats)}")
    out: dict[str, LayerExport] = {}
    why: dict[str, str] = {}
    for name, (_out_f, in_f) in shapes.items():
        out[name], reasons = _one(name, plan.get(name), in_f, rule)
        if reasons:
            why[name] = reasons[0]
    bad = [n for n, x in out.items() if x.requantize]
    if bad and not fix:
        raise BadInput(f"cannot export {len(bad)} layer(s) as {fmt} for {target.name} as they are: "
                       f"{_first(bad, why)}; pass --fix to re-quantize them with RTN to the nearest servable spec")
    notes = [f"{n}: {out[n].requantize} -> re-quantized with RTN to {out[n].bits}-bit g{out[n].group_size}"
             f"{' sym' if out[n].sym else ''}" for n in bad]
    split = [x for x in out.values() if x.split]
    if split:
        notes.append(f"{len(split)} ragged layer(s) written with their groups split to gcd(in_features, group size) "
                     f"columns (lossless, scales repeated), e.g. {split[0].name}: g{split[0].group_size} -> "
                     f"g{split[0].split}")
    if target.fused_must_match:
        notes += _match_fused(out, groups, target, fix)
    if rule.uniform:
        notes += _make_uniform(out, target, fmt, fix)
    return out, notes


def _label(x: LayerExport) -> str:
    return "16-bit" if x.kept else f"w{x.bits} g{x.split or x.group_size}{' sym' if x.sym else ''}"


def _precision(x: LayerExport) -> tuple[int, int, bool]:
    g = x.split or x.group_size
    return (x.bits, -g if g > 0 else -10**9, not x.sym)


def _raise_to(x: LayerExport, best: LayerExport, reason: str) -> LayerExport:
    if best.kept:
        return replace(x, bits=16, group_size=-1, sym=False, requantize=None, split=0)
    return replace(x, bits=best.bits, group_size=best.split or best.group_size, sym=best.sym, requantize=reason,
                   split=0)


def _match_fused(out: dict[str, LayerExport], groups: Sequence[Sequence[str]], target: ServingTarget,
                 fix: bool) -> list[str]:
    """Fused shards must share one scheme: refuse the first group that does not, or (``fix``) raise
    the group to its most precise member, re-quantizing the others (in ``out``)."""
    notes = []
    for group in groups:
        members = [out[n] for n in group if n in out]
        if len({x.key for x in members}) <= 1:
            continue
        if not fix:
            desc = ", ".join(f"{x.name.rsplit('.', 1)[-1]} {_label(x)}" for x in members)
            raise BadInput(f"{target.name} fuses {'/'.join(n.rsplit('.', 1)[-1] for n in group)} but they differ in "
                           f"{members[0].name.rpartition('.')[0]}: {desc}; pass --fix to raise the group to its "
                           "highest precision")
        best = max(members, key=_precision)
        for x in members:
            if x.key != best.key:
                out[x.name] = _raise_to(x, best, f"fused with {best.name.rsplit('.', 1)[-1]} at {_label(best)}")
                notes.append(f"{x.name}: fused with {best.name.rsplit('.', 1)[-1]} -> " +
                             ("kept 16-bit (dequantized)" if best.kept else f"re-quantized with RTN to {_label(best)}"))
    return notes


def _make_uniform(out: dict[str, LayerExport], target: ServingTarget, fmt: str, fix: bool) -> list[str]:
    """A rule that reads one scheme for the whole model (every block linear quantized alike): refuse a
    mixed plan or 16-bit block linears, or (``fix``) raise every layer to the most precise scheme present."""
    quant = [x for x in out.values() if not x.kept]
    if not quant:
        return []
    if len({x.key for x in out.values()}) <= 1:
        return []
    if not fix:
        seen = sorted({_label(x) for x in out.values()})
        raise BadInput(f"{target.name} reads {fmt} with one width and group size for every block linear, but this "
                       f"plan mixes {', '.join(seen)}; export --format compressed-tensors, or pass --fix to raise "
                       "every layer to the most precise quantized one")
    best = max(quant, key=_precision)
    notes = []
    for x in out.values():
        if x.key != best.key:
            out[x.name] = _raise_to(x, best, f"{target.name} {fmt} needs one scheme ({_label(best)})")
            notes.append(f"{x.name}: {_label(x)} -> re-quantized with RTN to {_label(best)} (one scheme for the model)")
    return notes
