"""Planning: estimate the error of every candidate spec of every layer, then solve under a budget.

``plan_model`` works on a loaded model and calibration samples: it prices every candidate with its
exact bytes (``lwq.formats.bytes``), fills the error table from the recipe's scorer (its declared
estimate: ``lwq.score``) and runs the solver. ``plan_for_model`` loads the model first (whole, or
read one block at a time) and keeps the measured-error database across budgets.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lwq.allocate import allocate
from lwq.allocate.candidates import make_candidates
from lwq.allocate.groups import block_units, tie_groups
from lwq.allocate.planfile import Plan, plan_from_allocation
from lwq.allocate.recipes import Recipe
from lwq.errors import BadInput
from lwq.formats.targets import TARGETS
from lwq.models.arch import LINEAR_TYPES, arch_for, linear_names, model_shapes, rest_bytes
from lwq.models.placement import Placement, where
from lwq.pipeline.common import LoadOptions, Progress, calib_batches as _calib_batches, source_name as _source_name
from lwq.pipeline.load import load_model


def plan_for_model(
    model_name: str, recipe: Any, data: str | None, nsamples: int, seqlen: int, seed: int = 0,
    load: LoadOptions = LoadOptions(), text_field: str = "text", calib: str | None = None,
    on_step: Progress | None = None, model: Any = None, error_db: str | None = None, samples: Any = None,
    devices: Sequence[str] = (),
) -> tuple[Any, Any]:
    """Load ``model_name`` (unless ``model`` is given) and plan it under ``recipe`` (``lwq.pipeline.plan``).

    Calibration windows come from ``data`` when the scorer or solver needs them; ``calib`` reuses the
    statistics of an ``lwq calibrate`` folder instead of collecting them; ``error_db``: a JSON file of
    measured errors reused when present and written after measuring; ``devices``: two or more devices
    (``lwq.score.workers.parse_devices``) measure the error database in parallel, one worker process each
    (one device: planning runs there). The model goes whole onto the device when it fits, else its
    blocks take turns (``lwq.models.placement``); when ``reads_blocks_only`` it is read from its files
    one block at a time unless it fits. Returns ``(plan, model)``; ``model`` is None when it was read
    that way (load it again, lazily, to quantize)."""
    from pathlib import Path

    from lwq.allocate import SOLVERS
    from lwq.allocate.candidates import load_error_db, save_error_db
    from lwq.calib.store import load_calib
    from lwq.errors import BadInput
    from lwq.models.load import check_finite_weights, checkpoint_dtype, resolve_device, resolve_dtype
    from lwq.models.placement import place
    from lwq.score import SCORERS

    scorer = SCORERS.get(recipe.scorer)
    dev = resolve_device(devices[0] if devices else load.device)
    dtype = str(resolve_dtype(load.dtype, dev)).replace("torch.", "")
    loader = None  # set when the model is read one block at a time from its files
    if model is None and reads_blocks_only(recipe, data, calib, load):
        from lwq.models.lazy import lazy_or_whole

        model, loader, _how = lazy_or_whole(model_name, dtype, str(dev))
    if model is None:
        model = load_model(model_name, dtype, "cpu", load.trust_remote_code)
    itemsize = checkpoint_dtype(model_name, dtype, load.trust_remote_code).itemsize  # what the checkpoint stores as is
    check_feasible(model, recipe, itemsize)  # before calibration
    check_finite_weights(model)
    measure = None
    if len(devices) > 1:
        from lwq.score.workers import ModelSource, parallel_measure

        measure = parallel_measure(ModelSource(model_name, dtype, load.trust_remote_code, load.max_memory), devices)
    stats = load_calib(calib, model) if calib else None
    wants_samples = SOLVERS.get(recipe.solver).evaluates or "samples" in scorer.needs or (
        stats is None and scorer.needs & {"stats", "hessians"})
    if wants_samples and samples is None:
        max_pos = getattr(model.config, "max_position_embeddings", None)
        seqlen = min(seqlen, max_pos) if isinstance(max_pos, int) else seqlen
        samples = _calib_batches(model_name, data, nsamples, seqlen, seed, load, text_field, model)
    torch.manual_seed(seed)
    db = load_error_db(error_db) if error_db and Path(error_db).is_file() else None
    if db is not None and db.meta.get("model") not in (None, _source_name(model_name)):
        raise BadInput(f"error database {error_db} was measured on {db.meta.get('model')}, not {model_name}")
    placement = place(model, dev, loader, load.max_memory)
    try:
        plan, db = plan_model(model, samples, recipe, seed, stats, on_step,
                              meta={"model": _source_name(model_name), "data": data, "seed": seed,
                                    "nsamples": nsamples, "seqlen": seqlen}, db=db, measure=measure,
                              placement=placement, itemsize=itemsize)
    finally:
        if loader is None:
            model.to("cpu")
    if error_db and db is not None:
        from lwq.allocate.candidates import ErrorDB

        save_error_db(ErrorDB(db.entries, {**db.meta, "model": _source_name(model_name), "data": data}), error_db)
    return plan, (model if loader is None else None)


def reads_blocks_only(recipe: Any, data: str | None, calib: str | None, load: LoadOptions) -> bool:
    """Whether planning under ``recipe`` can read the model one block at a time (``lwq.models.lazy``):
    the measured, linearity or ``lim`` estimates with a non-search solver on real calibration text. Sampling text
    from the model, the ``search`` solver and the weight-based scorers need it whole."""
    from lwq.calib.data import SELF_DATA

    from lwq.allocate import SOLVERS
    from lwq.score import SCORERS

    return (SCORERS.get(recipe.scorer).streams and not SOLVERS.get(recipe.solver).evaluates and calib is None
            and data not in (None, SELF_DATA) and not load.trust_remote_code)


def check_feasible(model: nn.Module, recipe: Recipe, itemsize: int = 2) -> None:
    """Refuse, before any forward pass, a budget below the smallest plan the candidates allow (from
    the weight shapes only: ``model`` may live on the meta device; ``itemsize``: bytes per stored
    element of what is not quantized)."""
    from lwq.allocate import budget_bytes, in_budget_units, parse_budget
    from lwq.allocate.types import min_bytes

    if recipe.budget is None:
        return
    shapes = model_shapes(model)
    layers = recipe_candidates(shapes, recipe)
    b = parse_budget(recipe.budget)
    rest = rest_bytes(model, shapes, itemsize)
    smallest = min_bytes(layers)
    if budget_bytes(b, layers, rest) < smallest:
        raise BadInput(f"budget {b.text} is infeasible: the minimum is {in_budget_units(b, smallest, layers, rest)} "
                       f"({smallest} bytes of quantized layers at the narrowest candidates)")


def candidate_grids(recipe: Recipe) -> tuple[bool, ...]:
    """The grids offered at each width: the recipe's ``sym``, or for ``auto`` both (asymmetric first)
    when the scorer's estimate prices them, else asymmetric."""
    from lwq.score import SCORERS

    if recipe.sym is not None:
        return (recipe.sym,)
    return (False, True) if SCORERS.get(recipe.scorer).prices_grids else (False,)


def recipe_candidates(shapes: Mapping[str, tuple[int, int]], recipe: Recipe) -> list[Any]:
    """The recipe's candidates for linears of ``shapes`` (name -> (out, in)), with exact byte costs."""
    return make_candidates(shapes, recipe.bits, recipe.backend, recipe.group_size, candidate_grids(recipe),
                           recipe.act_bits, serve=target_filter(recipe.target))


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
    """Candidates per layer with their exact costs and the recipe scorer's error estimates (its
    declared ``estimate``), and the error database when that estimate keeps one (else None)."""
    from lwq.score import SCORERS, EstimateInputs

    layers = recipe_candidates(model_shapes(model), recipe)
    return SCORERS.get(recipe.scorer).errors(EstimateInputs(model, samples, layers, recipe, stats, on_step, db, measure,
                                                            placement))


def solver_options(model: nn.Module, recipe: Recipe, samples: torch.Tensor | None, seed: int,
                   placement: Placement | None = None) -> dict[str, Any]:
    """Keyword options for the recipe's solver, from its declared facts (``lwq.allocate.Solver``):
    the blocks as units, the run's seed, tie groups, the KL evaluator; plus the recipe's options."""
    from lwq.allocate import SOLVERS

    solver = SOLVERS.get(recipe.solver)
    arch = arch_for(model)
    names = linear_names(model, arch)
    opts: dict[str, Any] = dict(recipe.options)
    if solver.units == "block":
        opts.setdefault("units", block_units(names, arch.blocks))
    if solver.seeded:
        opts.setdefault("seed", seed)
    tie = recipe.tie
    if tie == "none" and recipe.target is not None and TARGETS.get(recipe.target).fused_must_match and solver.ties:
        tie = "fused"  # a block-unit solver gives a block one spec: already tied
    if tie != "none":
        opts["tie_groups"] = tie_groups(names, arch.blocks, arch.groups, tie)
    if solver.evaluates:
        if samples is None:
            raise BadInput(f"the {solver.name} solver measures real loss: pass --data PATH")
        from lwq.score.measured import KlEvaluator

        at = placement or where(model)
        opts["evaluate"] = KlEvaluator(model, samples, device=at.device, loader=at.loader)
        opts.setdefault("fidelity", int(samples.numel()))
    return opts


def plan_model(model: nn.Module, samples: torch.Tensor | None, recipe: Recipe, seed: int = 0, stats: Any = None,
               on_step: Progress | None = None, meta: Mapping[str, Any] | None = None,
               db: Any = None, measure: Any = None, placement: Placement | None = None,
               itemsize: int = 2) -> tuple[Plan, Any]:
    """The plan for ``model`` under ``recipe.budget`` (see module docstring), and the measured-error
    database when one was used (pass it back as ``db`` to plan other budgets without measuring again).
    ``measure``: how missing measurements run (``measured_errors``); ``placement``: where the model
    computes (``lwq.models.placement``; default: where its parameters are); ``itemsize``: bytes per
    stored element of what is not quantized (the source's dtype), for byte and fraction budgets."""
    if recipe.budget is None:
        raise BadInput("no budget given: pass --budget (e.g. 3.25bit, 4GB, 0.25x) or a recipe with one")
    if not any(isinstance(m, LINEAR_TYPES) for m in model.modules()):
        raise BadInput("the model has no linear layers to plan")
    layers, db = error_table(model, samples, recipe, stats, on_step, db, measure, placement)
    extra: dict[str, Any] = {}
    if recipe.measure_with == "refined":
        from lwq.allocate.candidates import ErrorDB
        from lwq.pipeline.refined_trials import refined_errors

        cached = db.meta.get("refinement") if db is not None else None
        layers, record = refined_errors(model, samples, layers, recipe, seed, placement, on_step, cached)
        extra["refinement_ratios"] = record["ratios"]
        if db is not None:  # kept with the database, so other budgets reuse the ratios too
            db = ErrorDB(db.entries, {**db.meta, "refinement": record})
    shapes = model_shapes(model)
    alloc = allocate(layers, recipe.budget, rest_bytes(model, shapes, itemsize), recipe.solver,
                     **solver_options(model, recipe, samples, seed, placement))
    info = {k: v for k, v in alloc.info.items() if k != "history"}
    plan = plan_from_allocation(layers, alloc, recipe.budget, recipe.scorer,
                                meta={"recipe": recipe.to_dict(), "solver_info": info, **extra, **dict(meta or {})})
    return plan, db
