"""The option block that ``lwq plan`` and ``lwq quantize`` share, declared once.

``with_plan_flags`` adds the ``PLAN_FLAGS`` options to a command's signature (Typer reads
``__signature__``) and hands the command one ``PlanFlags`` instead of a dozen arguments.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from lwq.commands.common import (BUDGET_OPT, CALIB_OPT, CANDIDATE_BITS_OPT, CONFIG_OPT, DATA_OPT, MEASURE_WITH_OPT,
                                 SCORER_OPT, SOLVER_OPT, TARGET_OPT, TIE_OPT, resolve_seqlen)
from lwq.errors import BadInput

if TYPE_CHECKING:
    from lwq.allocate.recipes import Recipe


# the shared flags, declared once: name -> (type, Typer option); ``PlanFlags`` and the commands'
# signatures are made from this table
PLAN_FLAGS: dict[str, tuple[Any, Any]] = {
    **{name: (Optional[str], opt) for name, opt in (
        ("budget", BUDGET_OPT), ("config", CONFIG_OPT), ("solver", SOLVER_OPT), ("scorer", SCORER_OPT),
        ("candidate_bits", CANDIDATE_BITS_OPT), ("tie", TIE_OPT), ("target", TARGET_OPT),
        ("measure_with", MEASURE_WITH_OPT), ("calib", CALIB_OPT), ("data", DATA_OPT))},
    "nsamples": (Optional[int], typer.Option(None, "--nsamples", help="Calibration windows (default 128).")),
    "seqlen": (Optional[int], typer.Option(None, "--seqlen",
                                           help="Tokens per calibration window (default 2048, capped at the model's context).")),
}


class _PlanFlagsMethods:
    """What ``PlanFlags`` does with the flags (its fields are ``PLAN_FLAGS``; None: not given)."""

    budget: Optional[str]
    config: Optional[str]
    nsamples: Optional[int]
    seqlen: Optional[int]

    def check(self, model: str) -> None:
        """Window counts and lengths are positive, and a given ``--seqlen`` fits the model's context."""
        if self.seqlen is not None:
            resolve_seqlen(model, self.seqlen, 2048)
        for name, val in (("--nsamples", self.nsamples), ("--seqlen", self.seqlen)):
            if val is not None and val < 1:
                raise BadInput(f"{name} must be positive, got {val}")

    def recipe(self, backend: str | None, group_size: int | None, sym: bool | None, act_bits: int | None,
               **more: Any) -> "Recipe":
        """The recipe from ``--config`` (or the defaults) with the flags that were given on top
        (``more``: further recipe keys, e.g. ``refine``, ``refine_steps``, ``grid``)."""
        from lwq.allocate.recipes import Recipe, load_recipe, merge, parse_bits
        from lwq.backends import with_grid
        from lwq.score import SCORERS

        given = dataclasses.asdict(self)  # type: ignore[call-overload]
        bits = given.pop("candidate_bits")
        base = load_recipe(self.config) if self.config else Recipe()
        overrides = {**{k: v for k, v in given.items() if k not in ("config", "calib")},
                     "bits": parse_bits(bits) if bits is not None else None, "backend": backend,
                     "group_size": group_size, "sym": sym, "act_bits": act_bits, **more}
        recipe = merge(base, overrides)
        SCORERS.get(recipe.scorer)
        return dataclasses.replace(recipe, backend=with_grid(recipe.backend, recipe.grid))


PlanFlags = dataclasses.make_dataclass(
    "PlanFlags", [(name, kind, dataclasses.field(default=None)) for name, (kind, _opt) in PLAN_FLAGS.items()],
    bases=(_PlanFlagsMethods,), frozen=True)
PlanFlags.__module__ = __name__
PlanFlags.__doc__ = "The planning flags as given (None: not given; the recipe or the defaults decide)."


def with_plan_flags(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn(..., flags: PlanFlags, ...)`` as a Typer command with the ``PLAN_FLAGS`` options in
    place of ``flags``."""
    sig = inspect.signature(fn)
    names = list(PLAN_FLAGS)
    params = []
    for p in sig.parameters.values():
        if p.name == "flags":
            params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=o, annotation=t)
                       for n, (t, o) in PLAN_FLAGS.items()]
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(fn)
    def command(**kwargs: Any) -> None:
        flags = PlanFlags(**{n: kwargs.pop(n) for n in names})
        fn(**kwargs, flags=flags)

    hints = {k: v for k, v in inspect.get_annotations(fn, eval_str=True).items() if k not in ("flags", "return")}
    command.__signature__ = sig.replace(parameters=[p.replace(annotation=hints.get(p.name, p.annotation))
                                                    for p in params])  # type: ignore[attr-defined]
    command.__annotations__ = {**hints, **{n: t for n, (t, _o) in PLAN_FLAGS.items()}}
    del command.__wrapped__  # Typer must read the signature above, not ``fn``'s
    return command
