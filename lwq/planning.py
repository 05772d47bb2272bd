"""Planning: estimate the error of every candidate spec of every layer, then solve under a budget.

``plan_model`` works on a loaded model and calibration samples: it prices every candidate with its
exact bytes (``lwq.formats.bytes``), fills the error table from the recipe's scorer and runs the solver.
Error estimates: ``sensitivity`` (the default) *measures* each candidate: the next-token KL divergence
to the full model on the calibration samples when only that layer is quantized (RTN) at that spec,
a database in EvoPress's manner that can be saved and reused across budgets (measured on the first
``MEASURE_SAMPLES`` calibration windows); ``hessian`` estimates
``trace(dW H dW^T)`` per candidate from calibration Hessians; ``lim``/``zd`` give block importance
times ``4**-bits`` (what the paper's ``order`` solver needs). The ``search`` solver also gets a KL evaluator:
the real next-token KL divergence to the full model on calibration samples, with each layer
round-to-nearest quantized per the plan (a cheap stand-in for the backend that will be used).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lwq.allocate import allocate
from lwq.allocate.candidates import hessian_errors, make_candidates, with_importance
from lwq.allocate.groups import block_units, tie_groups
from lwq.allocate.plan import Plan, plan_from_allocation
from lwq.allocate.recipes import Recipe
from lwq.backends.quant import rtn_fake_quant
from lwq.errors import BadInput
from lwq.formats.targets import TARGETS
from lwq.models.arch import LINEAR_TYPES, arch_for, get_blocks, linear_names, linear_shape, linear_weight
from lwq.models.placement import Placement
from lwq.spec import LayerSpec

Progress = Callable[[int, int], None]
MEASURE_SAMPLES = 16  # calibration windows used to measure candidate errors (KL is stable well before 128)


def _where(model: nn.Module) -> Placement:
    """The placement of a model that is wholly where its first parameter is."""
    return Placement(next(model.parameters()).device)


def model_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every block linear, in model order."""
    return {n: linear_shape(model.get_submodule(n)) for n in linear_names(model)}


def rest_bytes(model: nn.Module, shapes: Mapping[str, tuple[int, int]]) -> int:
    """Bytes of what stays 16-bit (embeddings, lm_head, norms, biases): all parameters but the counted linears."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return 2 * (total - sum(o * i for o, i in shapes.values()))


def _block_of(linear: str, blocks: str) -> str:
    return f"{blocks}.{linear[len(blocks) + 1:].split('.', 1)[0]}"


def measured_errors(model: nn.Module, samples: torch.Tensor | None, layers: list[Any], db: Any = None,
                    on_step: Progress | None = None, measure: Any = None,
                    placement: Placement | None = None, trials: str = "backend") -> tuple[list[Any], Any]:
    """Fill every candidate's error with its measured KL (see module docstring); entries already in
    ``db`` (an ``ErrorDB`` for this model and data) are reused. ``measure(model, samples, tasks,
    on_step, placement, follow_backend)`` runs the missing ``lwq.measure.MeasureTask``s (default
    ``measure_local``; see ``parallel_measure`` for several devices); ``trials``: ``backend`` (each
    trial quantized by the candidate's backend, GPTQ included) or ``rtn``; a database measured the
    other way is refused. Returns the layers and the database."""
    from lwq.allocate.candidates import ErrorDB, db_errors, spec_key
    from lwq.measure import make_tasks, measure_local

    entries = {n: dict(e) for n, e in (db.entries if db is not None else {}).items()}
    if db is not None and db.entries and db.meta.get("estimate", "sensitivity") != "sensitivity":
        raise BadInput(f"the error database holds {db.meta['estimate']} estimates, not measured sensitivity: "
                       "use another --error-db file (or the scorer it was made with)")
    made = db.meta.get("trials", "rtn") if db is not None else trials  # older databases did not record it: rtn
    if entries and made != trials:
        raise BadInput(f"the error database was measured with {made} trials, not {trials}: "
                       f"pass --measure-with {made} or use another --error-db file")
    todo: dict[LayerSpec, list[str]] = {}
    for lc in layers:
        for c in lc.candidates:
            if c.spec.bits < 16 and spec_key(c.spec) not in entries.get(lc.name, {}):
                todo.setdefault(c.spec, []).append(lc.name)
    if todo and samples is None:
        raise BadInput("the sensitivity estimate measures real loss: pass --data PATH")
    samples = samples[:MEASURE_SAMPLES] if samples is not None else None
    blocks = arch_for(model).blocks
    tasks = make_tasks(todo, lambda n: int(n[len(blocks) + 1:].split(".", 1)[0]), len(get_blocks(model)))
    measured = (measure or measure_local)(model, samples, tasks, on_step, placement or _where(model),
                                          trials == "backend")
    for name, values in measured.items():
        entries.setdefault(name, {}).update(values)
    for lc in layers:
        for c in lc.candidates:
            if c.spec.bits >= 16:
                entries.setdefault(lc.name, {})[spec_key(c.spec)] = 0.0
    meta = dict(db.meta) if db is not None else {}
    if samples is not None:
        meta.update({"metric": "kl", "nsamples": int(samples.shape[0]), "seqlen": int(samples.shape[1])})
    meta["trials"] = trials
    out = ErrorDB(entries, meta)
    return db_errors(layers, out), out


def check_feasible(model: nn.Module, recipe: Recipe) -> None:
    """Refuse, before any forward pass, a budget below the smallest plan the candidates allow (from
    the weight shapes only: ``model`` may live on the meta device)."""
    from lwq.allocate import budget_bytes, in_budget_units, parse_budget
    from lwq.allocate.types import min_bytes

    if recipe.budget is None:
        return
    shapes = model_shapes(model)
    layers = make_candidates(shapes, recipe.bits, recipe.backend, recipe.group_size, recipe.sym, recipe.act_bits,
                             serve=target_filter(recipe.target))
    b = parse_budget(recipe.budget)
    rest = rest_bytes(model, shapes)
    smallest = min_bytes(layers)
    if budget_bytes(b, layers, rest) < smallest:
        raise BadInput(f"budget {b.text} is infeasible: the minimum is {in_budget_units(b, smallest, layers, rest)} "
                       f"({smallest} bytes of quantized layers at the narrowest candidates)")


def target_filter(target: str | None) -> Any:
    """``make_candidates``' ``serve`` for a serving target (None: every candidate is offered)."""
    if target is None:
        return None
    from functools import partial

    from lwq.formats.targets import served_spec

    return partial(served_spec, TARGETS.get(target).widest())


def error_table(model: nn.Module, samples: torch.Tensor | None, recipe: Recipe, stats: Any = None,
                on_step: Progress | None = None, db: Any = None, measure: Any = None,
                placement: Placement | None = None) -> tuple[list[Any], Any]:
    """Candidates per layer with their exact costs and the recipe scorer's error estimates; also the
    measured-error database when the scorer is ``sensitivity`` (else None)."""
    from lwq.calib.stats import collect_stats
    from lwq.score import SCORERS, ScoreConfig, ScoreInputs

    shapes = model_shapes(model)
    layers = make_candidates(shapes, recipe.bits, recipe.backend, recipe.group_size, recipe.sym, recipe.act_bits,
                             serve=target_filter(recipe.target))
    scorer = SCORERS.get(recipe.scorer)
    if recipe.scorer == "sensitivity":
        return measured_errors(model, samples, layers, db, on_step, measure, placement, recipe.measure_with)
    if recipe.scorer == "linearity":
        from lwq.measure import ParallelMeasure
        from lwq.score.linearity import linearity_errors

        return linearity_errors(model, samples, layers, db, on_step, placement or _where(model), recipe.measure_with,
                                measure if isinstance(measure, ParallelMeasure) else None)
    placement = placement or _where(model)
    device = placement.device
    if stats is None and scorer.needs & {"stats", "hessians"}:
        if samples is None:
            raise BadInput(f"scorer {recipe.scorer} needs calibration text: pass --data PATH")
        stats = collect_stats(model, samples, device, on_block=on_step, hessians=recipe.scorer == "hessian",
                              loader=placement.loader)
    if recipe.scorer == "hessian":
        weights = {n: linear_weight(model.get_submodule(n)).detach().float() for n in shapes}
        hessians = {n: stats.linears[n].hessian for n in shapes}
        if any(h is None for h in hessians.values()):
            raise BadInput("the calibration statistics hold no Hessians; recalibrate")
        return hessian_errors(layers, weights, hessians), None
    if "samples" in scorer.needs and samples is None:
        raise BadInput(f"scorer {recipe.scorer} needs calibration text: pass --data PATH")
    scores = scorer.fn(ScoreInputs(model, stats, samples, str(device), on_step), ScoreConfig(granularity="block"))
    arch = arch_for(model)
    return with_importance(layers, {n: scores[_block_of(n, arch.blocks)] for n in shapes}), None


class KlEvaluator:
    """``evaluate(plan, fidelity) -> loss`` for the ``search`` solver: mean next-token KL divergence
    (nats per token) of the model with every planned layer RTN-quantized per its spec, against the full
    model, on the first ``ceil(fidelity / seqlen)`` calibration samples (rounded up to whole batches).
    Runs block by block through a ``SensitivityProbe`` (so blocks may live off the device: ``loader``);
    quantized weights are cached per (layer, spec); the model's weights are never changed."""

    def __init__(self, model: nn.Module, samples: torch.Tensor, batch_size: int = 8, device: Any = None,
                 loader: Any = None) -> None:
        from lwq.score.sensitivity import SensitivityProbe

        self.samples, self.batch_size = samples, batch_size
        self.modules = {n: model.get_submodule(n) for n in linear_names(model)}
        self.probe = SensitivityProbe(model, samples, "kl", batch_size, device, loader)
        self.cache: dict[tuple[str, LayerSpec], torch.Tensor] = {}

    def _quantized(self, name: str, spec: LayerSpec) -> torch.Tensor:
        key = (name, spec)
        if key not in self.cache:
            mod = self.modules[name]
            W = linear_weight(mod).detach().float()
            Wq = rtn_fake_quant(W, spec.bits, spec.group_size, spec.sym)
            self.cache[key] = (Wq.t() if mod.weight.shape != W.shape else Wq).to(mod.weight.dtype)
        return self.cache[key]

    @torch.no_grad()
    def __call__(self, plan: Mapping[str, LayerSpec], fidelity: int) -> float:
        n = max(1, min(len(self.samples), math.ceil(fidelity / self.samples.shape[1])))
        weights = {name: self._quantized(name, spec) for name, spec in plan.items() if spec.bits < 16}
        return self.probe.plan_divergence(weights, math.ceil(n / self.batch_size))


def solver_options(model: nn.Module, recipe: Recipe, samples: torch.Tensor | None, seed: int,
                   placement: Placement | None = None) -> dict[str, Any]:
    """Keyword options for the recipe's solver: blocks as units for ``order``/``random`` (the paper
    ranks blocks), tie groups for ``ilp``, the KL evaluator for ``search``, plus the recipe's options."""
    arch = arch_for(model)
    names = linear_names(model, arch)
    opts: dict[str, Any] = dict(recipe.options)
    if recipe.solver in ("order", "random"):
        opts.setdefault("units", block_units(names, arch.blocks))
    if recipe.solver == "random":
        opts.setdefault("seed", seed)
    tie = recipe.tie
    if tie == "none" and recipe.target is not None and TARGETS.get(recipe.target).fused_must_match \
            and recipe.solver != "order":  # order's units are whole blocks: already tied
        tie = "fused"
    if tie != "none":
        opts["tie_groups"] = tie_groups(names, arch.blocks, arch.groups, tie)
    if recipe.solver == "search":
        if samples is None:
            raise BadInput("the search solver measures real loss: pass --data PATH")
        where = placement or _where(model)
        opts["evaluate"] = KlEvaluator(model, samples, device=where.device, loader=where.loader)
        opts.setdefault("seed", seed)
        opts.setdefault("fidelity", int(samples.numel()))
    return opts


def plan_model(model: nn.Module, samples: torch.Tensor | None, recipe: Recipe, seed: int = 0, stats: Any = None,
               on_step: Progress | None = None, meta: Mapping[str, Any] | None = None,
               db: Any = None, measure: Any = None, placement: Placement | None = None) -> tuple[Plan, Any]:
    """The plan for ``model`` under ``recipe.budget`` (see module docstring), and the measured-error
    database when one was used (pass it back as ``db`` to plan other budgets without measuring again).
    ``measure``: how missing measurements run (``measured_errors``); ``placement``: where the model
    computes (``lwq.models.placement``; default: where its parameters are)."""
    if recipe.budget is None:
        raise BadInput("no budget given: pass --budget (e.g. 3.25bit, 4GB, 0.25x) or a recipe with one")
    if not any(isinstance(m, LINEAR_TYPES) for m in model.modules()):
        raise BadInput("the model has no linear layers to plan")
    layers, db = error_table(model, samples, recipe, stats, on_step, db, measure, placement)
    shapes = model_shapes(model)
    alloc = allocate(layers, recipe.budget, rest_bytes(model, shapes), recipe.solver,
                     **solver_options(model, recipe, samples, seed, placement))
    info = {k: v for k, v in alloc.info.items() if k != "history"}
    plan = plan_from_allocation(layers, alloc, recipe.budget, recipe.scorer,
                                meta={"recipe": recipe.to_dict(), "solver_info": info, **dict(meta or {})})
    return plan, db
