"""Orchestration: the only place where the stages (load, calibrate, score, allocate, quantize,
write, eval) meet. Core algorithms stay pure; this module does the I/O and progress reporting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lwq.calib.data import load_text, tokenize
from lwq.eval.perplexity import PplResult, perplexity
from lwq.models.load import load_model, load_tokenizer

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LoadOptions:
    """How models are loaded: dtype, device and whether custom code is trusted."""

    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


def evaluate_ppl(
    model_name: str, data: str, seqlen: int = 256, stride: int | None = None, max_windows: int | None = None,
    batch_size: int = 4, load: LoadOptions = LoadOptions(), text_field: str = "text",
    on_step: Progress | None = None, model: Any = None,
) -> PplResult:
    """Load ``model_name`` (a model or an lwq checkpoint; or use ``model``) and its tokenizer and
    measure perplexity on ``data``."""
    if model is None:
        model = load_model(model_name, load.dtype, load.device, load.trust_remote_code)
    tok = load_tokenizer(model_name, load.trust_remote_code)
    ids = tokenize(tok, load_text(data, "eval", text_field))
    return perplexity(model, ids, seqlen, stride, max_windows, batch_size, on_step)


@dataclass
class QuantizeResult:
    """What ``quantize_to_checkpoint`` did: the in-memory quantized model and a JSON-able summary."""

    model: Any
    summary: dict[str, Any]


def quantize_to_checkpoint(
    model_name: str, out: str, plan: Any, data: str | None = None, nsamples: int = 128, seqlen: int = 2048,
    seed: int = 0, load: LoadOptions = LoadOptions(), force: bool = False, text_field: str = "text",
    on_block: Callable[[int, int], None] | None = None, pre_quantize: Any = None, model: Any = None,
    extra_files: dict[str, Any] | None = None, extra_summary: dict[str, Any] | None = None,
    resume: bool = False, lazy: bool = False, work: Any = None,
) -> QuantizeResult:
    """Load ``model_name``, quantize it under ``plan`` (a dict name -> LayerSpec, or a function of the
    loaded model returning one) block by block, and write the checkpoint to ``out``.

    Calibration windows from ``data`` are sampled only when the plan needs them (GPTQ, int8
    activations). ``on_block(done, total)`` reports progress. ``model``: an already loaded copy of
    ``model_name`` (on CPU) to quantize instead of loading it again; ``extra_files`` are written into
    the checkpoint folder (e.g. ``plan.json``); ``extra_summary`` is merged into the summary.

    Progress is recorded per block in ``OUT.partial`` (``lwq.resume``): ``resume`` continues an
    interrupted run there (the result is byte-identical to an uninterrupted run), ``force`` discards
    it; it is removed on success. ``lazy``: read the model one block at a time from its safetensors
    files (``lwq.models.lazy``; falls back to a full load when the model cannot be read that way) so
    memory stays about one block whatever the depth; the returned model's blocks are then left on
    ``meta``. ``work``: a ``WorkFolder`` already claimed by the caller."""
    import time
    from pathlib import Path

    import torch

    from lwq.calib.data import calibration_samples
    from lwq.errors import EXIT_INTERRUPTED, BadInput, LwqError
    from lwq.formats.checkpoint import check_output, save_checkpoint
    from lwq.formats.qlinear import QuantizedLinear
    from lwq.models.arch import arch_for, get_blocks
    from lwq.models.lazy import LazyUnsupported, load_lazy
    from lwq.models.load import is_lwq_checkpoint, looks_local, resolve_device, resolve_dtype
    from lwq.quantize import plan_needs_data, quantize_model
    from lwq.resume import (WorkFolder, deterministic, fingerprint, model_identity, plan_digest, resume_inputs,
                            stream_state, tensor_digest)

    check_output(out, force)
    if looks_local(model_name) and is_lwq_checkpoint(model_name):
        raise BadInput(f"{model_name} is already an lwq checkpoint; quantize the original model")
    work = work or WorkFolder.claim(out, resume, force)
    dev = resolve_device(load.device)
    dtype = str(resolve_dtype(load.dtype, dev)).replace("torch.", "")
    loader, how = None, "eager"
    if model is None and lazy and not load.trust_remote_code:
        try:
            model, loader = load_lazy(model_name, dtype, str(dev))
            how = "lazy"
        except LazyUnsupported as exc:
            how = f"eager ({exc})"
    if model is None:
        model = load_model(model_name, dtype, "cpu", load.trust_remote_code)
    layer_plan = plan(model) if callable(plan) else dict(plan)
    if not layer_plan:
        raise BadInput("the plan quantizes no layer")
    tok = load_tokenizer(model_name, load.trust_remote_code)
    batches = None
    max_pos = getattr(model.config, "max_position_embeddings", None)
    seqlen = min(seqlen, max_pos) if isinstance(max_pos, int) else seqlen
    if plan_needs_data(layer_plan):
        if data is None:
            raise BadInput("this plan (GPTQ or int8 activations) needs calibration text: pass --data PATH")
        batches = calibration_samples(tok, data, nsamples, seqlen, seed, text_field)
    nblocks = len(get_blocks(model))
    start = work.start(fingerprint(model=model_identity(model_name), plan=plan_digest(layer_plan), data=data,
                                   text_field=text_field, nsamples=nsamples, seqlen=seqlen, seed=seed, dtype=dtype,
                                   device=dev.type, calibration=tensor_digest(batches), blocks=nblocks))
    torch.manual_seed(seed)
    inputs = resume_inputs(model, work, layer_plan, batches, dev, loader is None) if start else None
    prefix = arch_for(model).blocks

    def save_block(i: int, _layers: Any, next_inputs: Any) -> None:
        work.save_block(i, get_blocks(model)[i], f"{prefix}.{i}", None if next_inputs is None else next_inputs.hidden)
        if on_block is not None:
            on_block(i + 1, nblocks)

    t0 = time.perf_counter()
    try:
        with deterministic(dev):
            quantize_model(model, layer_plan, batches, dev, save_block, start_block=start, inputs=inputs,
                           pre_quantize=pre_quantize, loader=loader, collect=False)
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
        "bits_per_weight": 8.0 * qbytes / numel, "quantized_bytes": qbytes, "quantized_params": numel,
        "num_layers": len(layer_plan), "num_blocks": nblocks, "device": str(dev),
        "calibration": None if batches is None else {"data": data, "nsamples": int(batches.shape[0]),
                                                     "seqlen": int(batches.shape[1]), "seed": seed},
        **(extra_summary or {}),
    }
    manifest = {k: v for k, v in summary.items() if k != "output"}
    path = save_checkpoint(model, out, layer_plan, model_name, {"summary": manifest}, force=force,
                           tokenizer=None if looks_local(model_name) else tok, extra_files=extra_files,
                           state=stream_state(model, work))
    work.remove()
    summary.update(seconds=seconds, resumed_from_block=start, loader=how,
                   checkpoint_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")))
    return QuantizeResult(model, summary)


def _calib_batches(model_name: str, data: str, nsamples: int, seqlen: int, seed: int, load: LoadOptions,
                   text_field: str) -> Any:
    """Tokenized calibration windows (nsamples, seqlen) of ``data`` for ``model_name``'s tokenizer."""
    from lwq.calib.data import calibration_samples

    tok = load_tokenizer(model_name, load.trust_remote_code)
    return calibration_samples(tok, data, nsamples, seqlen, seed, text_field)


def _source_name(name: str) -> str:
    """An absolute path for local folders/files (so a calibration folder can find them again)."""
    from pathlib import Path

    from lwq.models.load import looks_local

    p = Path(name).expanduser()
    return str(p.resolve()) if looks_local(name) and p.exists() else name


def calibrate_to_dir(
    model_name: str, data: str, out: str, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
    load: LoadOptions = LoadOptions(), force: bool = False, text_field: str = "text", batch_size: int = 8,
    lazy: bool = True, on_block: Progress | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Calibrate ``model_name`` on ``data`` block by block and save the statistics to ``out``.

    With ``lazy`` the model is read one block at a time from its safetensors files
    (``lwq.models.lazy``) so memory stays about one block whatever the depth; models that cannot be
    loaded that way are loaded whole on CPU and their blocks moved to the device one at a time.
    Each block's Hessians are written to ``out`` as soon as the block is done. Returns
    ``(CalibStats without the Hessians, summary)``; ``lwq.calib.store.load_calib(out)`` reads them all."""
    from pathlib import Path

    from lwq.calib.stats import collect_stats
    from lwq.calib.store import CalibWriter
    from lwq.errors import BadInput
    from lwq.models.lazy import LazyUnsupported, load_lazy
    from lwq.models.load import resolve_device, resolve_dtype

    if nsamples < 1:
        raise BadInput(f"--nsamples must be positive, got {nsamples}")
    if seqlen < 2:
        raise BadInput(f"--seqlen must be at least 2, got {seqlen}")
    if batch_size < 1:
        raise BadInput(f"--batch-size must be positive, got {batch_size}")
    if Path(out).expanduser().exists() and not force:
        raise BadInput(f"output {out} already exists (use --force to overwrite)")
    dev = resolve_device(load.device)
    batches = _calib_batches(model_name, data, nsamples, seqlen, seed, load, text_field)
    loader, how = None, "lazy"
    try:
        if not lazy:
            raise LazyUnsupported("lazy loading turned off")
        model, loader = load_lazy(model_name, load.dtype, load.device)
    except LazyUnsupported as exc:
        how = f"eager ({exc})"
        dtype = str(resolve_dtype(load.dtype, dev)).replace("torch.", "")
        model = load_model(model_name, dtype, "cpu", load.trust_remote_code)
    writer = CalibWriter(out, force)
    try:
        stats = collect_stats(model, batches, dev, on_block=on_block, batch_size=batch_size, loader=loader,
                              on_linears=writer.add_block)
        meta = {"model": _source_name(model_name), "data": _source_name(data), "text_field": text_field,
                "seed": seed, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(dev),
                "loader": how}
        path = writer.finish(stats, meta["model"], meta)
    except BaseException:
        writer.abort()
        raise
    summary = {"output": str(path.resolve()), **stats.meta, **meta,
               "blocks": {n: b.to_dict() for n, b in stats.blocks.items()}}
    return stats, summary


def score_layers(
    source: str, methods: list[str], config: Any, data: str | None = None, model_name: str | None = None,
    nsamples: int = 32, seqlen: int = 256, seed: int = 0, load: LoadOptions = LoadOptions(),
    text_field: str = "text", on_step: Progress | None = None, on_block: Progress | None = None,
) -> dict[str, Any]:
    """Score layers of a model (or of a calibration folder's model) with the named scorers.

    ``source`` is a calibration folder (its statistics are reused; the model is reloaded from
    ``model_name`` or the path it records when a method needs weights) or a model (statistics are
    collected on ``data`` first when a method needs them). Returns the JSON document of ``lwq score``:
    ``{"granularity", "methods", "layers": [{"name", "scores", "ranks"}], ...}`` in model order."""
    from lwq.calib.stats import collect_stats
    from lwq.calib.store import check_matches, is_calib_dir, load_calib
    from lwq.errors import BadInput
    from lwq.score import SCORERS, ScoreInputs, ranks

    if nsamples < 1:
        raise BadInput(f"--nsamples must be positive, got {nsamples}")
    if seqlen < 2:
        raise BadInput(f"--seqlen must be at least 2, got {seqlen}")
    scorers = [SCORERS.get(m) for m in methods]
    needs = set().union(*(s.needs for s in scorers))
    stats = None
    if is_calib_dir(source):
        stats = load_calib(source)
        if "hessians" in needs and any(s.hessian is None for s in stats.linears.values()):
            raise BadInput(f"{source} holds no Hessians; recalibrate or drop the hessian method")
        model_name = model_name or stats.meta.get("model")
        data = data or stats.meta.get("data")
    else:
        if model_name is not None:
            raise BadInput("--model is only for a calibration folder as the first argument")
        model_name = source
    model = samples = None
    if needs & {"model", "samples"} or stats is None:
        model = load_model(model_name, load.dtype, load.device, load.trust_remote_code)
        if stats is not None:
            check_matches(stats, model, source)
    if needs & {"samples"} or (stats is None and needs & {"stats", "hessians"}):
        if data is None:
            raise BadInput(f"method(s) {', '.join(methods)} need calibration text: pass --data PATH")
        samples = _calib_batches(model_name, data, nsamples, seqlen, seed, load, text_field)
    if stats is None and needs & {"stats", "hessians"}:
        stats = collect_stats(model, samples, next(model.parameters()).device, on_block=on_block,
                              hessians="hessians" in needs)
    inputs = ScoreInputs(model, stats, samples, on_step=on_step)
    results = {s.name: s.fn(inputs, config) for s in scorers}
    names = list(next(iter(results.values())))
    rank_of = {m: ranks(r) for m, r in results.items()}
    layers = [{"name": n, "scores": {m: results[m][n] for m in results}, "ranks": {m: rank_of[m][n] for m in results}}
              for n in names]
    return {"granularity": config.granularity, "methods": list(results), "source": source, "model": model_name,
            "data": data, "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "nsamples": None if samples is None else int(samples.shape[0]),
            "seqlen": None if samples is None else int(samples.shape[1]), "layers": layers}


def plan_for_model(
    model_name: str, recipe: Any, data: str | None, nsamples: int, seqlen: int, seed: int = 0,
    load: LoadOptions = LoadOptions(), text_field: str = "text", calib: str | None = None,
    on_step: Progress | None = None, model: Any = None, error_db: str | None = None,
) -> tuple[Any, Any]:
    """Load ``model_name`` (unless ``model`` is given) and plan it under ``recipe`` (``lwq.planning``).

    Calibration windows come from ``data`` when the scorer or solver needs them; ``calib`` reuses the
    statistics of an ``lwq calibrate`` folder instead of collecting them; ``error_db``: a JSON file of
    measured errors reused when present and written after measuring. Returns ``(plan, model)``."""
    from pathlib import Path

    from lwq.allocate.candidates import load_error_db, save_error_db
    import torch

    from lwq.calib.store import load_calib
    from lwq.errors import BadInput
    from lwq.models.load import resolve_device, resolve_dtype
    from lwq.planning import plan_model
    from lwq.score import SCORERS

    scorer = SCORERS.get(recipe.scorer)
    dev = resolve_device(load.device)
    if model is None:
        dtype = str(resolve_dtype(load.dtype, dev)).replace("torch.", "")
        model = load_model(model_name, dtype, "cpu", load.trust_remote_code)
    stats = load_calib(calib, model) if calib else None
    wants_samples = recipe.solver == "search" or "samples" in scorer.needs or (
        stats is None and scorer.needs & {"stats", "hessians"})
    samples = None
    if wants_samples:
        if data is None:
            raise BadInput(f"scorer {recipe.scorer} / solver {recipe.solver} need calibration text: pass --data PATH")
        max_pos = getattr(model.config, "max_position_embeddings", None)
        seqlen = min(seqlen, max_pos) if isinstance(max_pos, int) else seqlen
        samples = _calib_batches(model_name, data, nsamples, seqlen, seed, load, text_field)
    torch.manual_seed(seed)
    db = load_error_db(error_db) if error_db and Path(error_db).is_file() else None
    if db is not None and db.meta.get("model") not in (None, _source_name(model_name)):
        raise BadInput(f"error database {error_db} was measured on {db.meta.get('model')}, not {model_name}")
    model.to(dev)
    try:
        plan, db = plan_model(model, samples, recipe, seed, stats, on_step,
                              meta={"model": _source_name(model_name), "data": data, "seed": seed,
                                    "nsamples": nsamples, "seqlen": seqlen}, db=db)
    finally:
        model.to("cpu")
    if error_db and db is not None:
        from lwq.allocate.candidates import ErrorDB

        save_error_db(ErrorDB(db.entries, {**db.meta, "model": _source_name(model_name), "data": data}), error_db)
    return plan, model


def quantize_with_budget(
    model_name: str, out: str, recipe: Any, data: str | None, nsamples: int, seqlen: int, seed: int = 0,
    load: LoadOptions = LoadOptions(), force: bool = False, text_field: str = "text", calib: str | None = None,
    on_step: Progress | None = None, on_block: Progress | None = None, plan: Any = None,
    error_db: str | None = None, resume: bool = False,
) -> QuantizeResult:
    """Plan (unless ``plan`` is given: a path of a plan JSON file, checked against the model and
    repriced) then quantize and write the checkpoint, with ``plan.json`` inside it. The summary
    reports the plan's budget and solver. ``resume``: continue an interrupted run (see
    ``quantize_to_checkpoint``); a plan made by the interrupted run is reused, not made again."""
    from dataclasses import asdict

    from lwq.allocate.plan import load_plan, plan_from_dict, plan_to_dict, reprice
    from lwq.formats.checkpoint import check_output
    from lwq.models.arch import linear_names
    from lwq.models.load import resolve_device, resolve_dtype
    from lwq.planning import model_shapes
    from lwq.resume import WorkFolder, fingerprint, model_identity

    check_output(out, force)
    work = WorkFolder.claim(out, resume, force)
    model = None
    dtype = str(resolve_dtype(load.dtype, resolve_device(load.device))).replace("torch.", "")
    if isinstance(plan, str):
        model = load_model(model_name, dtype, "cpu", load.trust_remote_code)
        plan = reprice(load_plan(plan, linear_names(model)), model_shapes(model))
    if plan is None:
        planning = fingerprint(model=model_identity(model_name), recipe=asdict(recipe), data=data, nsamples=nsamples,
                               seqlen=seqlen, seed=seed, text_field=text_field, calib=calib, dtype=dtype,
                               device=resolve_device(load.device).type)
        saved = work.saved_plan(planning)
        if saved is not None:
            model = load_model(model_name, dtype, "cpu", load.trust_remote_code)
            plan = plan_from_dict(saved, linear_names(model), str(work.path / "plan.json"))
        else:
            plan, model = plan_for_model(model_name, recipe, data, nsamples, seqlen, seed, load, text_field, calib,
                                         on_step, error_db=error_db)
            work.save_plan(planning, plan_to_dict(plan))
    cap = None
    if plan.budget is not None:
        from lwq.allocate.budget import budget_bytes, parse_budget
        from lwq.planning import rest_bytes

        cap = budget_bytes(parse_budget(plan.budget), list(plan.layers.values()),
                           rest_bytes(model, model_shapes(model)))
    extra = {"budget": plan.budget, "solver": plan.solver, "scorer": plan.scorer,
             "planned_bits_per_weight": plan.bits_per_weight, "budget_bytes": cap}
    res = quantize_to_checkpoint(model_name, out, lambda _m: plan.specs, data, nsamples, seqlen, seed, load, force,
                                 text_field, on_block, model=model, extra_files={"plan.json": plan_to_dict(plan)},
                                 extra_summary=extra, resume=resume, work=work)
    res.summary["budget_exceeded"] = cap is not None and res.summary["quantized_bytes"] > cap
    return res
