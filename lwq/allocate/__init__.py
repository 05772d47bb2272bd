"""Bit allocation under a budget: budgets, candidates per layer, solvers (declared by name), plans.

``SOLVERS`` holds declared ``Solver`` entries: ``solve(layers, cap_bytes, **options) -> Allocation``
and what the caller must know about it; ``allocate`` turns a ``Budget`` into the byte cap, runs the
named solver and states an infeasible budget in its own units.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from lwq.allocate.budget import Budget, budget_bytes, in_budget_units, parse_budget
from lwq.allocate.solvers import dp, ilp, order, search
from lwq.allocate.types import Allocation, Candidate, Infeasible, LayerCandidates
from lwq.errors import BadInput
from lwq.registry import Registry



@dataclass(frozen=True)
class Solver:
    """A declared solver. ``solve(layers, cap_bytes, **options) -> Allocation``; ``units``: ``block``
    when it gives every linear of a decoder block one spec (the paper ranks blocks; the caller passes
    the blocks as ``units``), else ``linear``; ``seeded``: it draws at random (the caller passes the
    run's ``seed``); ``evaluates``: it checks real loss through an ``evaluate`` callback (calibration
    text needed); ``package``: an optional package it imports (``lwq doctor`` checks it)."""

    name: str
    solve: Callable[..., Allocation]
    units: str = "linear"
    seeded: bool = False
    evaluates: bool = False
    package: Optional[str] = None

    def __call__(self, layers: Sequence[LayerCandidates], cap_bytes: int, **options: Any) -> Allocation:
        return self.solve(layers, cap_bytes, **options)

    @property
    def options(self) -> list[str]:
        """The keyword options it accepts (``tie_groups``, ``evaluate``, ...)."""
        params = inspect.signature(self.solve).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @property
    def ties(self) -> bool:
        """Whether it keeps tied layers (``tie_groups``) at one spec."""
        return "tie_groups" in self.options


SOLVERS: Registry[Solver] = Registry("solver")
for _entry in (Solver("order", order.solve, units="block"),
               Solver("random", order.solve_random, units="block", seeded=True),
               Solver("dp", dp.solve), Solver("ilp", ilp.solve, package="highspy"),
               Solver("search", search.solve, seeded=True, evaluates=True)):
    SOLVERS.add(_entry.name, _entry)


def solver_options(name: str) -> list[str]:
    """The keyword options solver ``name`` accepts (``tie_groups``, ``evaluate``, ...)."""
    return SOLVERS.get(name).options


def run_solver(name: str, layers: Sequence[LayerCandidates], cap_bytes: int, **options: Any) -> Allocation:
    """Run solver ``name``; an option it does not take is a one-line error naming the solvers that do."""
    accepted = solver_options(name)
    for key in options:
        if key not in accepted:
            takers = [n for n in SOLVERS.names() if key in solver_options(n)]
            hint = f"; solvers taking it: {', '.join(takers)}" if takers else ""
            raise BadInput(f"solver {name} does not take option {key!r}{hint}")
    return SOLVERS.get(name)(layers, cap_bytes, **options)


def allocate(layers: Sequence[LayerCandidates], budget: Budget | str, rest_bytes: int = 0, solver: str = "dp",
             **options: Any) -> Allocation:
    """Allocate under ``budget`` (``rest_bytes``: the unquantized rest of the checkpoint, for byte and
    fraction budgets); an infeasible budget is refused with the minimum in the budget's units."""
    b = parse_budget(budget) if isinstance(budget, str) else budget
    cap = budget_bytes(b, layers, rest_bytes)
    try:
        return run_solver(solver, layers, cap, **options)
    except Infeasible as e:
        need = in_budget_units(b, e.min_bytes, layers, rest_bytes)
        raise BadInput(f"budget {b.text} is infeasible with solver {solver}: the minimum is {need} "
                       f"({e.min_bytes} bytes of quantized layers)") from None


__all__ = ["SOLVERS", "Solver", "Allocation", "Budget", "Candidate", "Infeasible", "LayerCandidates", "allocate",
           "budget_bytes", "in_budget_units", "parse_budget", "run_solver", "solver_options"]
