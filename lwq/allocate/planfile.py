"""The plan as data: an ordered map module name -> ``LayerSpec`` with each layer's exact cost and
error estimate, plus how it was made (budget, solver, scorer) and which layers count.

JSON (version 1)::

    {"version": 1, "budget": "3.25bit", "solver": "dp", "scorer": "hessian", "bits_per_weight": 3.2,
     "total_bytes": 123, "counted": "...", "kept_16bit": "...",
     "default": {...optional spec...},
     "layers": {"model.layers.0.self_attn.q_proj": {"bits": 4, "group_size": 128, "sym": false,
                "backend": "gptq", "format": "gptq", "act_bits": 16, "act_order": false,
                "cost_bytes": 123, "estimate": 0.5, "numel": 36864}, "re:.*mlp.down_proj": {"bits": 8}}}

Hand-written plans may give a ``default`` spec and ``re:`` regex keys; ``load_plan`` resolves them
once into explicit entries (explicit name > first matching regex in file order > default), as
torchao's ``FqnToConfig`` and GPTQModel's ``dynamic`` do. Fields a partial entry leaves out come from
``default`` (else ``LayerSpec``'s defaults) and the format follows the bits unless given.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import regex

from lwq.allocate.types import Allocation, LayerCandidates
from lwq.errors import BadInput
from lwq.fileio import read_text, write_json_atomic
from lwq.spec import SPEC_FIELDS, LayerSpec, default_format

PLAN_VERSION = 1
REGEX_SECONDS = 1.0  # per match of a "re:" key against one module name
COUNTED = "counted: decoder block linears"
KEPT = "kept 16-bit: embeddings, lm_head, norms, biases"
TOP_KEYS = ("version", "budget", "solver", "scorer", "bits_per_weight", "total_bytes", "counted", "kept_16bit",
            "meta", "default", "layers")
ENTRY_EXTRA = ("cost_bytes", "estimate", "numel", "bpw")


@dataclass(frozen=True)
class PlanEntry:
    """One layer of a plan: its spec, exact byte cost, error estimate and weight count (when known)."""

    spec: LayerSpec
    cost_bytes: int | None = None
    estimate: float | None = None
    numel: int | None = None


@dataclass(frozen=True)
class Plan:
    """An ordered map module name -> ``PlanEntry`` and how the plan was made."""

    layers: Mapping[str, PlanEntry]
    budget: str | None = None
    solver: str | None = None
    scorer: str | None = None
    counted: str = COUNTED
    kept_16bit: str = KEPT
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def specs(self) -> dict[str, LayerSpec]:
        return {n: e.spec for n, e in self.layers.items()}

    @property
    def total_bytes(self) -> int | None:
        """Summed exact cost, or ``None`` when a layer's cost is unknown."""
        costs = [e.cost_bytes for e in self.layers.values()]
        return None if any(c is None for c in costs) else int(sum(costs))  # type: ignore[arg-type]

    @property
    def bits_per_weight(self) -> float | None:
        """Real bits per weight of the counted layers, or ``None`` when costs or sizes are unknown."""
        total = self.total_bytes
        numel = [e.numel for e in self.layers.values()]
        if total is None or any(n is None for n in numel) or not numel:
            return None
        return 8.0 * total / sum(numel)  # type: ignore[arg-type]


def plan_from_allocation(layers: Sequence[LayerCandidates], alloc: Allocation, budget: str | None = None,
                         scorer: str | None = None, counted: str = COUNTED, kept_16bit: str = KEPT,
                         meta: Mapping[str, Any] | None = None) -> Plan:
    """The plan of a solver's allocation (costs, estimates and sizes from the candidates)."""
    entries = {}
    for lc, k in zip(layers, alloc.index):
        c = lc.candidates[k]
        est = c.error if math.isfinite(c.error) else None
        entries[lc.name] = PlanEntry(c.spec, c.cost_bytes, est, lc.numel)
    return Plan(entries, budget, alloc.solver, scorer, counted, kept_16bit, dict(meta or {}))


def reprice(plan: Plan, shapes: Mapping[str, tuple[int, int]]) -> Plan:
    """The plan with every cost recomputed from the layouts (after a hand edit) and sizes filled."""
    from lwq.formats.bytes import layer_bytes

    entries = {}
    for name, e in plan.layers.items():
        if name not in shapes:
            raise BadInput(f"plan layer {name} has no shape to price it")
        o, i = shapes[name]
        if e.numel is not None and e.numel != o * i:
            raise BadInput(f"the plan does not fit this model: layer {name} has {e.numel} weights in the plan, "
                           f"{o * i} ({o}x{i}) here{made_for(plan.meta)}")
        entries[name] = PlanEntry(e.spec, layer_bytes(o, i, e.spec), e.estimate, o * i)
    return Plan(entries, plan.budget, plan.solver, plan.scorer, plan.counted, plan.kept_16bit, plan.meta)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The JSON document of ``plan`` (see the module docstring)."""
    layers = {}
    for name, e in plan.layers.items():
        d = e.spec.to_dict()
        d["cost_bytes"] = e.cost_bytes
        d["estimate"] = e.estimate if e.estimate is None or math.isfinite(e.estimate) else None
        if e.numel is not None:
            d["numel"] = e.numel
        layers[name] = d
    bpw = plan.bits_per_weight
    return {"version": PLAN_VERSION, "budget": plan.budget, "solver": plan.solver, "scorer": plan.scorer,
            "bits_per_weight": None if bpw is None else round(bpw, 6), "total_bytes": plan.total_bytes,
            "counted": plan.counted, "kept_16bit": plan.kept_16bit, "meta": dict(plan.meta), "layers": layers}


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write the plan as JSON atomically (temp file in the same folder, then rename)."""
    write_json_atomic(path, plan_to_dict(plan))


def _spec(raw: Any, base: Mapping[str, Any], where: str) -> LayerSpec:
    """A spec from a (possibly partial) entry over ``base``; the format follows bits/act_bits/backend
    when the entry does not give it."""
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: expected an object with {', '.join(SPEC_FIELDS)}, got {type(raw).__name__}")
    unknown = set(raw) - set(SPEC_FIELDS) - set(ENTRY_EXTRA)
    if unknown:
        raise BadInput(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(SPEC_FIELDS)}")
    merged = {**base, **{k: v for k, v in raw.items() if k in SPEC_FIELDS}}
    try:
        if "format" not in raw and {"bits", "act_bits", "backend"} & set(raw):
            bits, act = merged.get("bits", LayerSpec.bits), merged.get("act_bits", LayerSpec.act_bits)
            if isinstance(bits, int) and isinstance(act, int) and isinstance(merged.get("backend", ""), str):
                merged["format"] = default_format(bits, act, merged.get("backend", LayerSpec.backend))
        return LayerSpec.from_dict(merged, where=where)
    except BadInput as e:
        msg = str(e)
        raise BadInput(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _number(raw: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    val = raw.get(key)
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, (int, float) if kind is float else int):
        raise BadInput(f"{where}: {key} must be {'a number' if kind is float else 'an integer'}, got {val!r}")
    return kind(val)


def made_for(meta: Mapping[str, Any]) -> str:
    """``" (the plan was made for MODEL)"`` when the plan says which model it was made for."""
    model = meta.get("model") if isinstance(meta, Mapping) else None
    return f" (the plan was made for {model})" if isinstance(model, str) and model else ""


def _unknown_name(name: str, valid: Sequence[str], where: str, meta: Mapping[str, Any]) -> BadInput:
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid names include {', '.join(valid[:3])}"
    return BadInput(f"{where}: unknown module {name!r}{made_for(meta)}; {hint}")


def _matches(pattern: Any, key: str, name: str, where: str) -> bool:
    """``pattern.fullmatch(name)`` within ``REGEX_SECONDS`` (a backtracking pattern is refused, not run
    for hours)."""
    try:
        return pattern.fullmatch(name, timeout=REGEX_SECONDS) is not None
    except TimeoutError:
        raise BadInput(f"{where}: layers[{key!r}] took over {REGEX_SECONDS:g} s to match {name!r} "
                       "(catastrophic backtracking?); simplify the regular expression") from None


def plan_from_dict(d: Any, valid_names: Sequence[str] | None = None, where: str = "plan") -> Plan:
    """Strictly parse a plan document (see ``load_plan``)."""
    if not isinstance(d, dict):
        raise BadInput(f"{where}: expected a JSON object, got {type(d).__name__}")
    unknown = set(d) - set(TOP_KEYS)
    if unknown:
        raise BadInput(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(TOP_KEYS)}")
    if d.get("version") != PLAN_VERSION:
        raise BadInput(f"{where}: version must be {PLAN_VERSION}, got {d.get('version')!r}")
    for key in ("budget", "solver", "scorer", "counted", "kept_16bit"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise BadInput(f"{where}: {key} must be a string, got {d[key]!r}")
    layers = d.get("layers", {})
    if not isinstance(layers, dict) or (not layers and "default" not in d):
        raise BadInput(f"{where}: 'layers' must be a non-empty object of module name -> spec")
    if not isinstance(d.get("meta", {}), dict):
        raise BadInput(f"{where}: meta must be an object")
    base: dict[str, Any] = {}
    default = None
    if "default" in d:
        default = _spec(d["default"], {}, f"{where}: default")
        base = {k: v for k, v in d["default"].items() if k in SPEC_FIELDS}
        base["format"] = default.format
    explicit: dict[str, PlanEntry] = {}
    patterns: list[tuple[Any, str, Any]] = []
    for key, raw in layers.items():
        w = f"{where}: layers[{key!r}]"
        if key.startswith("re:"):
            try:
                patterns.append((regex.compile(key[3:]), key, raw))
            except (regex.error, re.error) as e:
                raise BadInput(f"{w}: bad regular expression: {e}") from None
            _spec(raw, base, w)
            continue
        if valid_names is not None and key not in set(valid_names):
            raise _unknown_name(key, list(valid_names), where, d.get("meta", {}))
        explicit[key] = PlanEntry(_spec(raw, base, w), _number(raw, "cost_bytes", int, w),
                                  _number(raw, "estimate", float, w), _number(raw, "numel", int, w))
    if valid_names is None:
        if patterns or default is not None:
            raise BadInput(f"{where}: regex keys and 'default' need the model's layer names to resolve")
        entries = explicit
    else:
        entries = {}
        used = set()
        for name in valid_names:
            if name in explicit:
                entries[name] = explicit[name]
                continue
            hit = next(((p, key, raw) for p, key, raw in patterns if _matches(p, key, name, where)), None)
            if hit is not None:
                used.add(hit[1])
                entries[name] = PlanEntry(_spec(hit[2], base, f"{where}: layers[{hit[1]!r}]"))
            elif default is not None:
                entries[name] = PlanEntry(default)
        unused = [key for _, key, _ in patterns if key not in used]
        if unused:
            raise BadInput(f"{where}: layers[{unused[0]!r}] matches no module (names look like {valid_names[0]!r})")
        missing = [n for n in valid_names if n not in entries]
        if missing:
            raise BadInput(f"{where}: {len(missing)} layer(s) missing, e.g. {', '.join(missing[:3])} "
                           "(list them, add a 're:' key or a 'default' spec)")
    return Plan(entries, d.get("budget"), d.get("solver"), d.get("scorer"), d.get("counted") or COUNTED,
                d.get("kept_16bit") or KEPT, dict(d.get("meta", {})))


def load_plan(path: str | Path, valid_names: Sequence[str] | None = None) -> Plan:
    """Read a plan file strictly: invalid JSON (with line and column), unknown module names (with
    close matches), bits not offered, wrong types and missing layers are one-line ``BadInput``s.
    With ``valid_names`` (the model's quantizable linears, in model order) regex keys and a default
    are resolved into explicit entries and the result follows model order."""
    path = Path(path)
    text = read_text(path, "plan file")
    try:
        d = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except ValueError as e:
        raise BadInput(f"{path}: {e}") from None
    except RecursionError:
        raise BadInput(f"{path}: invalid plan: JSON nested too deeply") from None
    return plan_from_dict(d, valid_names, str(path))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects with a key given twice (a hand edit that copied a layer) are refused."""
    out: dict[str, Any] = {}
    for key, val in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = val
    return out
