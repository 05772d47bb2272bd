"""Quantize a model under a plan (uniform, budgeted or from a file) and write the checkpoint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lwq.models.load import checkpoint_dtype, load_tokenizer
from lwq.pipeline.load import load_model
from lwq.fileio import locked
from lwq.pipeline.common import LoadOptions, Progress, calib_batches
from lwq.pipeline.plan import plan_for_model


@dataclass
class QuantizeResult:
    """What ``quantize_to_checkpoint`` did: the in-memory quantized model and a JSON-able summary."""

    model: Any
    summary: dict[str, Any]


@locked
def quantize_to_checkpoint(
    model_name: str, out: str, plan: Any, data: str | None = None, nsamples: int = 128, seqlen: int = 2048,
    seed: int = 0, load: LoadOptions = LoadOptions(), force: bool = False, text_field: str = "text",
    on_block: Callable[[int, int], None] | None = None, pre_quantize: Any = None, model: Any = None,
    extra_files: dict[str, Any] | None = None, extra_summary: dict[str, Any] | None = None,
    resume: bool = False, lazy: bool = False, work: Any = None, batches: Any = None,
    smooth_alpha: float | None = 0.5, refine: Any = None, grid: str = "minmax",
    on_refine: Callable[[int, int, float], None] | None = None,
) -> QuantizeResult:
    """Load ``model_name``, quantize it under ``plan`` (a dict name -> LayerSpec, or a function of the
    loaded model returning one) block by block, and write the checkpoint to ``out``.

    Calibration windows from ``data`` are sampled only when the plan needs them (GPTQ, int8
    activations). ``on_block(done, total)`` reports progress. ``model``: an already loaded copy of
    ``model_name`` (on CPU) to quantize instead of loading it again; ``extra_files`` are written into
    the checkpoint folder (e.g. ``plan.json``); ``extra_summary`` is merged into the summary.

    Progress is recorded per block in ``OUT.partial`` (``lwq.pipeline.workdir``): ``resume`` continues an
    interrupted run there (the result is byte-identical to an uninterrupted run), ``force`` discards
    it; it is removed on success. ``lazy``: read the model one block at a time from its safetensors
    files (``lwq.models.lazy``; falls back to a full load when the model cannot be read that way) so
    memory stays about one block whatever the depth; the returned model's blocks are then left on
    ``meta``. ``work``: a ``WorkFolder`` already claimed by the caller. ``smooth_alpha``: SmoothQuant
    strength for int8-activation layers (``None``: no smoothing), unless ``pre_quantize`` is given.
    ``refine``: a ``RefineConfig`` to tune each block against the full-precision outputs (None: no
    refinement); ``on_refine(step, steps, loss)`` reports each refinement step of the current block;
    ``grid`` is only reported (the plan's backends already carry it)."""
    import time
    from dataclasses import asdict
    from pathlib import Path

    import torch

    from lwq.calib.data import SELF_DATA, calibration_samples, self_generated_samples
    from lwq.errors import EXIT_INTERRUPTED, BadInput, LwqError
    from lwq.formats.checkpoint import save_checkpoint
    from lwq.fileio import check_output
    from lwq.formats.qlinear import QuantizedLinear
    from lwq.models.arch import arch_for, get_blocks
    from lwq.models.lazy import lazy_or_whole
    from lwq.models.load import is_lwq_checkpoint, looks_local, resolve_device, resolve_dtype
    from lwq.pipeline.blockwise import plan_needs_data, quantize_model
    from lwq.pipeline.workdir import (WorkFolder, deterministic, fingerprint, model_identity, plan_digest,
                                      resume_inputs, stream_state, tensor_digest)

    check_output(out, "checkpoint", force, inputs=[model_name] if looks_local(model_name) else [])
    if looks_local(model_name) and is_lwq_checkpoint(model_name):
        raise BadInput(f"{model_name} is already an lwq checkpoint; quantize the original model")
    dev = resolve_device(load.device)
    dtype = str(resolve_dtype(load.dtype, dev)).replace("torch.", "")
    store = checkpoint_dtype(model_name, dtype, load.trust_remote_code)  # before the long part: it may ask the hub
    work = work or WorkFolder.claim(out, resume, force)
    loader, how = None, "eager"
    if model is None and lazy:
        model, loader, how = lazy_or_whole(model_name, dtype, str(dev), load.trust_remote_code)
    if model is None:
        model = load_model(model_name, dtype, "cpu", load.trust_remote_code)
    layer_plan = plan(model) if callable(plan) else dict(plan)
    if not layer_plan:
        raise BadInput("the plan quantizes no layer")
    tok = load_tokenizer(model_name, load.trust_remote_code)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    seqlen = min(seqlen, max_pos) if isinstance(max_pos, int) else seqlen
    refining = refine is not None and refine.steps > 0
    wants_data = plan_needs_data(layer_plan) or refining
    if wants_data and batches is not None:
        pass  # the caller's calibration windows (e.g. the ones the plan was measured on)
    elif wants_data:
        if data is None or data == SELF_DATA:
            data = SELF_DATA
            if loader is not None:  # sampling from the model needs all of it, not one block at a time
                model, loader, how = load_model(model_name, dtype, "cpu", load.trust_remote_code), None, \
                    "eager (self-generated calibration text)"
            batches = self_generated_samples(model, nsamples, seqlen, seed)
        else:
            batches = calibration_samples(tok, data, nsamples, seqlen, seed, text_field)
    nblocks = len(get_blocks(model))
    if pre_quantize is None and any(sp.act_bits == 8 for sp in layer_plan.values()):
        from lwq.backends.smooth import smoothing

        pre_quantize = smoothing(smooth_alpha)
    start = work.start(fingerprint(model=model_identity(model_name), plan=plan_digest(layer_plan), data=data,
                                   text_field=text_field, nsamples=nsamples, seqlen=seqlen, seed=seed, dtype=dtype,
                                   device=dev.type, calibration=tensor_digest(batches), blocks=nblocks,
                                   smooth_alpha=smooth_alpha if pre_quantize is not None else None,
                                   **({"refine": asdict(refine)} if refining else {})))
    torch.manual_seed(seed)
    inputs = resume_inputs(model, work, layer_plan, batches, dev, loader is None, refining) if start else None
    prefix = arch_for(model).blocks

    def save_block(i: int, _layers: Any, next_inputs: Any) -> None:
        work.save_block(i, get_blocks(model)[i], f"{prefix}.{i}", None if next_inputs is None else next_inputs.hidden,
                        None if next_inputs is None else next_inputs.reference)
        if on_block is not None:
            on_block(i + 1, nblocks)

    reports: list[Any] = []
    t0 = time.perf_counter()
    try:
        with deterministic(dev):
            quantize_model(model, layer_plan, batches, dev, save_block, start_block=start, inputs=inputs,
                           pre_quantize=pre_quantize, loader=loader, collect=False, refine=refine, seed=seed,
                           reports=reports, on_refine=on_refine)
    except KeyboardInterrupt:
        work.discard_if_empty()
        raise LwqError(f"interrupted after {work.next_block} of {nblocks} blocks; rerun with --resume to continue",
                       EXIT_INTERRUPTED) from None
    except BaseException:
        work.discard_if_empty()
        raise
    seconds = time.perf_counter() - t0
    qlayers = [model.get_submodule(n) for n in layer_plan]
    qbytes = sum(m.weight_bytes() for m in qlayers if isinstance(m, QuantizedLinear))
    numel = sum(m.out_features * m.in_features for m in qlayers if isinstance(m, QuantizedLinear))
    specs = list(layer_plan.values())

    def uniform(field: str) -> Any:
        vals = {getattr(s, field) for s in specs}
        return vals.pop() if len(vals) == 1 else "mixed"

    summary: dict[str, Any] = {
        "source": model_name, "output": str(Path(out).expanduser().resolve()), "backend": uniform("backend"),
        "bits": uniform("bits"), "group_size": uniform("group_size"), "sym": uniform("sym"),
        "act_bits": uniform("act_bits"), "act_order": uniform("act_order"), "format": uniform("format"),
        "smooth_alpha": smooth_alpha if any(sp.act_bits == 8 for sp in specs) else None,
        "refine": "block" if refining else "none", "refine_steps": refine.steps if refining else 0,
        "refine_norms": bool(refining and refine.norms), "grid": grid,
        "bits_per_weight": 8.0 * qbytes / numel, "quantized_bytes": qbytes, "quantized_params": numel,
        "num_layers": len(layer_plan), "num_blocks": nblocks, "device": str(dev), "dtype": dtype,
        "calibration": None if batches is None else {"data": data, "nsamples": int(batches.shape[0]),
                                                     "seqlen": int(batches.shape[1]), "seed": seed},
        **(extra_summary or {}),
    }
    manifest = {k: v for k, v in summary.items() if k != "output"}
    path = save_checkpoint(model, out, layer_plan, model_name, {"summary": manifest}, force=force,
                           tokenizer=None if looks_local(model_name) else tok, extra_files=extra_files,
                           state=stream_state(model, work),
                           store_dtype=store)
    work.remove()
    summary.update(seconds=seconds, resumed_from_block=start, loader=how,
                   checkpoint_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")))
    return QuantizeResult(model, summary)


@locked
def quantize_with_budget(
    model_name: str, out: str, recipe: Any, data: str | None, nsamples: int, seqlen: int, seed: int = 0,
    load: LoadOptions = LoadOptions(), force: bool = False, text_field: str = "text", calib: str | None = None,
    on_step: Progress | None = None, on_block: Progress | None = None, plan: Any = None,
    error_db: str | None = None, resume: bool = False, devices: Any = (), smooth_alpha: float | None = 0.5,
    refine: Any = None, grid: str = "minmax", on_refine: Callable[[int, int, float], None] | None = None,
) -> QuantizeResult:
    """Plan (unless ``plan`` is given: a path of a plan JSON file, checked against the model and
    repriced) then quantize and write the checkpoint, with ``plan.json`` inside it. The summary
    reports the plan's budget and solver. ``resume``: continue an interrupted run (see
    ``quantize_to_checkpoint``); a plan made by the interrupted run is reused, not made again.
    ``devices``: several devices measure the planning error database in parallel (``plan_for_model``);
    ``smooth_alpha``, ``refine`` and ``grid`` as in ``quantize_to_checkpoint``."""
    from dataclasses import asdict

    from lwq.allocate.planfile import load_plan, plan_from_dict, plan_to_dict, reprice
    from lwq.models.arch import linear_names
    from lwq.models.load import looks_local
    from lwq.fileio import check_output
    from lwq.models.load import resolve_device, resolve_dtype
    from lwq.models.arch import model_shapes
    from lwq.pipeline.workdir import WorkFolder, fingerprint, model_identity

    check_output(out, "checkpoint", force, inputs=[model_name] if looks_local(model_name) else [])
    work = WorkFolder.claim(out, resume, force)
    model = None
    from lwq.calib.data import SELF_DATA

    dtype = str(resolve_dtype(load.dtype, resolve_device(load.device))).replace("torch.", "")
    itemsize = checkpoint_dtype(model_name, dtype, load.trust_remote_code).itemsize  # of what stays unquantized
    batches = None
    shapes = None  # a copy of the model for names and shapes (on meta when it can be built so)
    if isinstance(plan, str):
        shapes = _shapes_model(model_name, dtype, load)
        plan = reprice(load_plan(plan, linear_names(shapes)), model_shapes(shapes))
        if recipe.target is not None:
            check_target(plan.specs, shapes, recipe.target)
    if plan is None:
        from lwq.pipeline.plan import check_feasible

        check_feasible(_shapes_model(model_name, dtype, load), recipe, itemsize)  # before loading or calibrating
        planning = fingerprint(model=model_identity(model_name), recipe=asdict(recipe), data=data, nsamples=nsamples,
                               seqlen=seqlen, seed=seed, text_field=text_field, calib=calib, dtype=dtype,
                               device=resolve_device(load.device).type)
        saved = work.saved_plan(planning)
        if saved is not None:
            shapes = _shapes_model(model_name, dtype, load)
            plan = plan_from_dict(saved, linear_names(shapes), str(work.path / "plan.json"))
        else:
            if data is None or data == SELF_DATA:  # sample the model's own text once, for planning and GPTQ
                data = SELF_DATA
                model = load_model(model_name, dtype, "cpu", load.trust_remote_code)
                max_pos = getattr(model.config, "max_position_embeddings", None)
                seqlen = min(seqlen, max_pos) if isinstance(max_pos, int) else seqlen
                batches = calib_batches(model_name, data, nsamples, seqlen, seed, load, text_field, model)
            # model: None when planning read it one block at a time; quantizing then does the same
            plan, model = plan_for_model(model_name, recipe, data, nsamples, seqlen, seed, load, text_field, calib,
                                         on_step, model=model, error_db=error_db, samples=batches,
                                         devices=devices)
            work.save_plan(planning, plan_to_dict(plan))
    cap = None
    if plan.budget is not None:
        from lwq.allocate.budget import budget_bytes, parse_budget
        from lwq.models.arch import rest_bytes

        ref = model if model is not None else (shapes or _shapes_model(model_name, dtype, load))
        rest = rest_bytes(ref, model_shapes(ref), itemsize)
        cap = budget_bytes(parse_budget(plan.budget), list(plan.layers.values()), rest)
    extra = {"budget": plan.budget, "solver": plan.solver, "scorer": plan.scorer,
             "planned_bits_per_weight": plan.bits_per_weight, "budget_bytes": cap}
    res = quantize_to_checkpoint(model_name, out, lambda _m: plan.specs, data, nsamples, seqlen, seed, load, force,
                                 text_field, on_block, model=model, extra_files={"plan.json": plan_to_dict(plan)},
                                 extra_summary=extra, resume=resume, work=work, batches=batches,
                                 lazy=model is None, smooth_alpha=smooth_alpha, refine=refine, grid=grid,
                                 on_refine=on_refine)
    res.summary["budget_exceeded"] = cap is not None and res.summary["quantized_bytes"] > cap
    return res


def _shapes_model(model_name: str, dtype: str, load: LoadOptions) -> Any:
    """``model_name`` built on ``meta`` from its config (``meta_model``): enough for names, shapes and
    sizes without reading a weight. A model that cannot be built that way (hub id, custom code) is
    loaded whole."""
    from lwq.models.lazy import LazyUnsupported, meta_model

    if not load.trust_remote_code:
        try:
            return meta_model(model_name, dtype, "cpu")[0]
        except LazyUnsupported:
            pass  # the whole load below is the documented fallback
    return load_model(model_name, dtype, "cpu", load.trust_remote_code)


def check_target(specs: dict[str, Any], model: Any, target: str) -> None:
    """Refuse, in one line naming the layers, a plan that ``target`` cannot serve as it is (the rule
    ``lwq export --target`` applies: the target's widest format, fused shards tied)."""
    from lwq.errors import BadInput
    from lwq.formats.decide import decide
    from lwq.formats.targets import TARGETS
    from lwq.models.arch import arch_for, get_blocks
    from lwq.models.arch import model_shapes

    tgt = TARGETS.get(target)
    arch = arch_for(model)
    n = len(get_blocks(model, arch))
    groups = [[f"{arch.blocks}.{i}.{lin}" for lin in g] for i in range(n) for g in arch.groups if len(g) > 1]
    try:
        decide(specs, model_shapes(model), groups, tgt, tgt.widest().format, fix=False)
    except BadInput as e:
        raise BadInput(f"--target {target}: the plan is not servable: {str(e).split(' as they are: ')[-1]}"
                       .replace("; pass --fix to re-quantize them with RTN to the nearest servable spec", "")
                       .replace("; pass --fix to raise the group to its highest precision", "")) from None

