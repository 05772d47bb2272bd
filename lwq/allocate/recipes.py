"""Recipes: YAML files in ``configs/`` naming how to plan and quantize (budget, scorer, solver,
candidate bits, backend, group size, ...). ``load_recipe`` parses one strictly; ``merge`` lets
command-line flags override it (a flag left at ``None`` keeps the recipe's value).

Example::

    budget: 3.25bit
    scorer: hessian
    solver: dp
    bits: [2, 3, 4, 8]
    backend: gptq
    group_size: 128
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from lwq.allocate import SOLVERS, solver_options
from lwq.allocate.budget import parse_budget
from lwq.allocate.groups import TIE_MODES
from lwq.errors import BadInput
from lwq.fileio import read_text
from lwq.formats.targets import TARGETS
from lwq.spec import GRIDS, REFINE_MODES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

RECIPE_VERSION = 1
RUNTIME_ONLY = ("evaluate", "start", "tie_groups")  # solver options only code can pass
MEASURE_WITH = ("backend", "rtn", "refined")


@dataclass(frozen=True)
class Recipe:
    """How to plan and quantize. ``bits``: candidate widths; ``tie``: ``none``, ``fused`` (q/k/v and
    gate/up share a width) or ``block`` (all linears of a block share one; both need ``ilp``);
    ``options``: extra keyword options for the solver (e.g. ``generations`` for ``search``);
    ``measure_with``: how the measured estimate quantizes each trial: ``backend`` (the candidate's
    backend and storage format, GPTQ on the layer's full-precision-input Hessian) or ``rtn``
    (round-to-nearest for all: faster, a rougher proxy for GPTQ); ``refine``: ``block`` tunes each
    quantized block against the full-precision outputs (``refine_steps`` steps; with
    ``refine_norms``, the block's normalization weights too) or ``none``;
    ``grid``: ``minmax`` or ``mse`` (clipping search) for the rtn and gptq backends; ``target``: a
    serving engine (``lwq.formats.targets``): only candidates it serves are offered (symmetric where
    it takes no zero points, whole groups, its widths) and, when it fuses shards, they are tied;
    ``sym``: true (symmetric grids only), false (asymmetric, with zero points) or ``auto`` (None):
    each width is offered both ways and the solver picks per layer, where the scorer's estimate
    prices grids (``lwq.score.Scorer.prices_grids``; else asymmetric)."""

    budget: str | None = None
    scorer: str = "sensitivity"
    solver: str = "dp"
    bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    backend: str = "gptq"
    group_size: int = 128
    sym: bool | None = None  # None: ``auto``
    act_bits: int = 16
    nsamples: int = 128
    seqlen: int = 2048
    data: str | None = None
    tie: str = "none"
    measure_with: str = "backend"
    refine: str = "block"
    refine_steps: int = 200
    refine_norms: bool = True
    grid: str = "minmax"
    target: str | None = None
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bits"], d["options"] = list(self.bits), dict(self.options)
        d["sym"] = "auto" if self.sym is None else self.sym
        return d


FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


def _check(r: Recipe) -> None:
    def want(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise BadInput(f"recipe: {key} must be {what}, got {getattr(r, key)!r}")

    want("version", r.version == RECIPE_VERSION, str(RECIPE_VERSION))
    want("budget", r.budget is None or isinstance(r.budget, str), "a budget string such as 3.25bit")
    if r.budget is not None:
        parse_budget(r.budget)
    for key in ("scorer", "backend"):
        want(key, isinstance(getattr(r, key), str) and bool(getattr(r, key)), "a name")
    want("solver", isinstance(r.solver, str), "a name")
    SOLVERS.get(r.solver)
    want("bits", isinstance(r.bits, tuple) and bool(r.bits)
         and all(isinstance(b, int) and not isinstance(b, bool) and b in SUPPORTED_BITS for b in r.bits),
         f"a non-empty list of widths from {SUPPORTED_BITS}")
    want("group_size", r.group_size in SUPPORTED_GROUP_SIZES and not isinstance(r.group_size, bool),
         f"one of {SUPPORTED_GROUP_SIZES}")
    want("sym", r.sym is None or isinstance(r.sym, bool), "true, false or auto")
    want("act_bits", r.act_bits in (8, 16) and not isinstance(r.act_bits, bool), "8 or 16")
    for key in ("nsamples", "seqlen"):
        v = getattr(r, key)
        want(key, isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer")
    want("data", r.data is None or isinstance(r.data, str), "a path or dataset name")
    want("tie", r.tie in TIE_MODES, f"one of {', '.join(TIE_MODES)}")
    want("measure_with", r.measure_with in MEASURE_WITH, f"one of {', '.join(MEASURE_WITH)}")
    want("refine", r.refine in REFINE_MODES, f"one of {', '.join(REFINE_MODES)}")
    want("refine_steps", isinstance(r.refine_steps, int) and not isinstance(r.refine_steps, bool)
         and r.refine_steps >= 0, "a whole number >= 0")
    want("refine_norms", isinstance(r.refine_norms, bool), "true or false")
    want("grid", r.grid in GRIDS, f"one of {', '.join(GRIDS)}")
    if r.measure_with == "refined" and (r.refine != "block" or r.refine_steps == 0):
        raise BadInput("--measure-with refined plans for refined blocks: it needs --refine block and steps > 0")
    tiers = [n for n, s in SOLVERS.items() if s.ties]
    if r.tie != "none" and not SOLVERS.get(r.solver).ties:
        raise BadInput(f"recipe: tie {r.tie} needs solver {' or '.join(tiers)}, not {r.solver}")
    want("target", r.target is None or r.target in TARGETS, f"one of {', '.join(sorted(TARGETS.names()))}")
    solver = SOLVERS.get(r.solver)
    if r.target is not None and TARGETS.get(r.target).fused_must_match and not (solver.ties or solver.units == "block"):
        blockwise = [n for n, s in SOLVERS.items() if s.ties or s.units == "block"]
        raise BadInput(f"recipe: target {r.target} ties fused shards: "
                       f"use solver {', '.join(blockwise)}, not {r.solver}")
    want("description", isinstance(r.description, str), "a string")
    want("options", isinstance(r.options, Mapping), "a mapping of solver options")
    accepted = [o for o in solver_options(r.solver) if o not in RUNTIME_ONLY]
    for key in r.options:
        if key not in accepted:
            raise BadInput(f"recipe: solver {r.solver} does not take option {key!r}; "
                           f"it takes: {', '.join(accepted) or '(none)'}")


def parse_bits(value: Any) -> tuple[int, ...]:
    """Candidate widths from a list or a comma string (``2,3,4,8``)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise BadInput(f"bits must be a list such as 2,3,4,8, got {value!r}")
    out = []
    for item in items:
        try:
            out.append(int(str(item).strip()) if isinstance(item, str) else item)
        except ValueError:
            raise BadInput(f"bits must be integers such as 2,3,4,8, got {value!r}") from None
    return tuple(sorted(set(out), key=out.index))


def recipe_from_dict(d: Any, where: str = "recipe") -> Recipe:
    """Strictly build a recipe from a mapping: unknown keys are refused, listing the valid ones."""
    if not isinstance(d, dict):
        raise BadInput(f"{where}: expected a mapping of {', '.join(FIELDS)}")
    unknown = sorted(set(map(str, d)) - set(FIELDS))
    if unknown:
        raise BadInput(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(FIELDS)}")
    kw = dict(d)
    if "bits" in kw:
        kw["bits"] = parse_bits(kw["bits"])
    if isinstance(kw.get("sym"), str) and kw["sym"].strip().lower() == "auto":
        kw["sym"] = None
    if "budget" in kw and isinstance(kw["budget"], (int, float)) and not isinstance(kw["budget"], bool):
        raise BadInput(f"{where}: budget needs a unit, e.g. {kw['budget']}bit")
    if kw.get("options") is None:
        kw.pop("options", None)
    try:
        return Recipe(**kw)
    except BadInput as e:
        raise BadInput(f"{where}: {str(e).removeprefix('recipe: ')}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe; YAML errors carry line and column, bad values name their key."""
    path = Path(path)
    text = read_text(path, "recipe file")
    try:
        aliases = sum(isinstance(t, yaml.AliasToken) for t in yaml.scan(text))
        if aliases:  # a recipe is a few flat keys; aliases only serve to expand (billion laughs)
            raise BadInput(f"{path}: YAML aliases (*name) are not accepted in a recipe; write the values out")
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise BadInput(f"{path}{at}: invalid YAML: {problem}") from None
    return recipe_from_dict(d, str(path))


def merge(recipe: Recipe, overrides: Mapping[str, Any]) -> Recipe:
    """``recipe`` with command-line values applied; ``None`` means the flag was not given."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise BadInput(f"unknown recipe override(s) {', '.join(unknown)}; valid: {', '.join(FIELDS)}")
    d = recipe.to_dict()
    d.update(given)
    if "options" in given:
        d["options"] = {**recipe.options, **given["options"]}
    return recipe_from_dict(d, "command line")
