"""Plan a model's bits per layer under a budget (``lwq.planning`` does the work)."""
from __future__ import annotations

from typing import Any, Sequence

from lwq.models.load import load_model
from lwq.pipeline.common import LoadOptions, Progress, calib_batches as _calib_batches, source_name as _source_name


def plan_for_model(
    model_name: str, recipe: Any, data: str | None, nsamples: int, seqlen: int, seed: int = 0,
    load: LoadOptions = LoadOptions(), text_field: str = "text", calib: str | None = None,
    on_step: Progress | None = None, model: Any = None, error_db: str | None = None, samples: Any = None,
    devices: Sequence[str] = (),
) -> tuple[Any, Any]:
    """Load ``model_name`` (unless ``model`` is given) and plan it under ``recipe`` (``lwq.planning``).

    Calibration windows come from ``data`` when the scorer or solver needs them; ``calib`` reuses the
    statistics of an ``lwq calibrate`` folder instead of collecting them; ``error_db``: a JSON file of
    measured errors reused when present and written after measuring; ``devices``: two or more devices
    (``lwq.measure.parse_devices``) measure the error database in parallel, one worker process each
    (one device: planning runs there). The model goes whole onto the device when it fits, else its
    blocks take turns (``lwq.models.placement``); when ``reads_blocks_only`` it is read from its files
    one block at a time unless it fits. Returns ``(plan, model)``; ``model`` is None when it was read
    that way (load it again, lazily, to quantize)."""
    from pathlib import Path

    from lwq.allocate.candidates import load_error_db, save_error_db
    import torch

    from lwq.calib.store import load_calib
    from lwq.errors import BadInput
    from lwq.models.load import check_finite_weights, resolve_device, resolve_dtype
    from lwq.models.placement import place
    from lwq.planning import check_feasible, plan_model
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
    check_feasible(model, recipe)  # before calibration
    check_finite_weights(model)
    measure = None
    if len(devices) > 1:
        from lwq.measure import ModelSource, parallel_measure

        measure = parallel_measure(ModelSource(model_name, dtype, load.trust_remote_code, load.max_memory), devices)
    stats = load_calib(calib, model) if calib else None
    wants_samples = recipe.solver == "search" or "samples" in scorer.needs or (
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
                              placement=placement)
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

    return (recipe.scorer in ("sensitivity", "linearity", "lim") and recipe.solver != "search" and calib is None
            and data not in (None, SELF_DATA) and not load.trust_remote_code)
