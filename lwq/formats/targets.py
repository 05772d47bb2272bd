"""Serving targets: what each engine reads, as data (``--target`` on plan, quantize and export).

A target lists the export formats it reads, each as a ``FormatRule`` (weight widths, whether zero
points are allowed, group sizes, whole groups, one spec for the whole model, act-order), and
whether fused shards (q/k/v, gate/up) must share one scheme. The rules follow the engines' own
source (checked 2026-12-02):

- vLLM 0.33 GPTQ (``quantization/auto_gptq.py``): ``TYPE_MAP`` holds only (4, sym) and (8, sym);
  Marlin takes group sizes -1/32/64/128 (``MARLIN_SUPPORTED_GROUP_SIZES``); ``desc_act`` with groups
  raises; in_features must be a whole number of groups; fused shards must share a precision.
- vLLM 0.33 compressed-tensors ``pack-quantized`` (``CompressedTensorsWNA16``): 2-8 bit, group or
  channel strategy, in_features divisible by the group size, no group act-order; widths other than
  4/8 run only on the Humming kernels, which also take zero points; vLLM picks the first shard's
  scheme for a fused layer, so fused shards must share one. lwq writes symmetric schemes for vLLM
  (every kernel takes them; asymmetric 2/3-bit has one kernel only).
- transformers 5 + compressed-tensors 0.20 decompress any 1-8 bit symmetric int group/channel scheme
  on CPU; the library refuses in_features that are not a multiple of the group size, and asymmetric
  ``pack-quantized`` does not load (its meta-device ``compress`` leaves ``weight_zero_point``
  unpacked, [out, groups], so transformers refuses the packed [out*bits/32, groups] tensor: measured
  with 0.20.0 and 0.20.1). Its GPTQ path reads
  one width and group size for the whole model (``GPTQConfig`` ignores ``dynamic``), whole groups.
- GPTQModel reads GPTQ v1 with per-module ``dynamic`` overrides at 2/3/4/8 bits, ragged groups.

``check`` is pure: the reasons a (spec, shape) breaks a rule, empty when it is served.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lwq.registry import Registry
from lwq.spec import LayerSpec

FORMAT_NAMES = ("gptq", "compressed-tensors")


@dataclass(frozen=True)
class FormatRule:
    """What one engine reads in one export format (see the module docstring)."""

    format: str
    bits: tuple[int, ...]
    asym: bool  # zero points allowed
    group_sizes: tuple[int, ...] | None  # None: any
    whole_groups: bool  # in_features % group_size == 0
    uniform: bool  # one (bits, group size, sym) for every quantized layer
    act_order: bool


@dataclass(frozen=True)
class ServingTarget:
    """An engine: the formats it reads (preferred first), whether fused shards share a scheme, and
    whether it computes in 16-bit (the export then sets the config dtype to float16)."""

    name: str
    rules: tuple[FormatRule, ...]
    fused_must_match: bool
    half_dtype: bool
    about: str

    def rule(self, fmt: str) -> FormatRule | None:
        return next((r for r in self.rules if r.format == fmt), None)

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(r.format for r in self.rules)

    def widest(self) -> FormatRule:
        """The rule a plan is made under: the non-uniform rule taking the most widths (mixed plans)."""
        mixed = [r for r in self.rules if not r.uniform] or list(self.rules)
        return max(mixed, key=lambda r: (len(r.bits), r.asym))


MARLIN_GROUPS = (-1, 32, 64, 128)
TARGETS: Registry[ServingTarget] = Registry("serving target")
TARGETS.add("vllm", ServingTarget("vllm", (
    FormatRule("gptq", (4, 8), False, MARLIN_GROUPS, True, False, False),
    FormatRule("compressed-tensors", (2, 3, 4, 6, 8), False, MARLIN_GROUPS, True, False, False)),
    True, True, "vLLM >= 0.33: GPTQ 4/8-bit symmetric (Marlin); compressed-tensors 2/3/4/6/8-bit symmetric; "
                "groups -1/32/64/128 dividing in_features; fused q/k/v and gate/up share a scheme; no act-order"))
TARGETS.add("transformers", ServingTarget("transformers", (
    FormatRule("compressed-tensors", (2, 3, 4, 6, 8), False, None, True, False, False),
    FormatRule("gptq", (2, 3, 4, 8), True, None, True, True, True)),
    False, False, "transformers 5: compressed-tensors any width 2-8, symmetric, whole groups (CPU and GPU); "
                  "GPTQ only one width and group size for the whole model, whole groups"))
TARGETS.add("gptqmodel", ServingTarget("gptqmodel", (
    FormatRule("gptq", (2, 3, 4, 8), True, None, False, False, True),),
    False, False, "GPTQModel: GPTQ 2/3/4/8-bit with per-module dynamic overrides, zero points, ragged groups"))


def check(rule: FormatRule, spec: LayerSpec, in_features: int) -> list[str]:
    """Why ``rule`` cannot serve a layer of ``in_features`` inputs quantized as ``spec`` (empty: it can).
    16-bit layers are always served (kept unquantized)."""
    if spec.bits >= 16 or spec.format == "fp16":
        return []
    out = []
    if spec.format not in ("gptq", "int6") or spec.act_bits != 16:
        out.append(f"{spec.format} {spec.label} is weight-and-activation or not an integer grid")
    if spec.bits not in rule.bits:
        out.append(f"{spec.bits}-bit is not served ({'/'.join(map(str, rule.bits))})")
    if not spec.sym and not rule.asym:
        out.append("asymmetric (zero points) is not served")
    gs = spec.group_size
    if rule.group_sizes is not None and gs not in rule.group_sizes:
        out.append(f"group size {gs} is not served ({'/'.join(map(str, rule.group_sizes))})")
    if rule.whole_groups and gs != -1 and in_features % gs:
        out.append(f"group size {gs} does not divide {in_features} inputs")
    if spec.act_order and not rule.act_order:
        out.append("act-order is not served")
    return out


def whole_group_size(in_features: int, group_size: int, allowed: Sequence[int] | None) -> int:
    """The largest group size not above ``group_size`` (from ``allowed``, else lwq's) that divides
    ``in_features``; -1 (per channel) when none does."""
    from lwq.spec import SUPPORTED_GROUP_SIZES

    pool = [g for g in (allowed or SUPPORTED_GROUP_SIZES) if g > 0]
    fits = sorted((g for g in pool if (group_size == -1 or g <= group_size) and in_features % g == 0), reverse=True)
    return -1 if group_size == -1 or not fits else fits[0]


def nearest_bits(bits: int, allowed: Sequence[int]) -> int:
    """The smallest allowed width at least ``bits`` (no precision is lost), else the largest."""
    up = [b for b in sorted(allowed) if b >= bits]
    return up[0] if up else max(allowed)


def served_spec(rule: FormatRule, spec: LayerSpec, in_features: int) -> LayerSpec | None:
    """``spec`` made servable by ``rule`` without changing its width: symmetric when zero points are
    not served, a whole group size when groups must be whole, no act-order; None when the width or
    format is not served (the planner then drops the candidate)."""
    import dataclasses

    if spec.bits >= 16:
        return spec
    if spec.bits not in rule.bits or spec.act_bits != 16 or spec.format not in ("gptq", "int6"):
        return None
    sym = spec.sym or not rule.asym
    gs = spec.group_size
    if (rule.whole_groups and gs != -1 and in_features % gs) or (rule.group_sizes and gs not in rule.group_sizes):
        gs = whole_group_size(in_features, gs, rule.group_sizes)
    new = dataclasses.replace(spec, sym=sym, group_size=gs, act_order=spec.act_order and rule.act_order)
    return new if not check(rule, new, in_features) else None
