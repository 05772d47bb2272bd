"""Calibrate a model to a statistics folder, and score its layers."""
from __future__ import annotations

from typing import Any

from lwq.pipeline.load import load_model
from lwq.pipeline.common import LoadOptions, Progress, calib_batches as _calib_batches, source_name as _source_name


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
    from lwq.errors import BadInput
    from lwq.models.load import looks_local
    from lwq.fileio import OutputLock, check_output

    if nsamples < 1:
        raise BadInput(f"--nsamples must be positive, got {nsamples}")
    if seqlen < 2:
        raise BadInput(f"--seqlen must be at least 2, got {seqlen}")
    if batch_size < 1:
        raise BadInput(f"--batch-size must be positive, got {batch_size}")

    inputs = [p for p in (model_name, data) if looks_local(p)]
    target = check_output(out, "calibration", force, inputs)  # before minutes of work
    with OutputLock(target):
        return _calibrate(model_name, data, out, nsamples, seqlen, seed, load, force, text_field, batch_size, lazy,
                          on_block, tuple(inputs))


def _calibrate(model_name: str, data: str, out: str, nsamples: int, seqlen: int, seed: int, load: LoadOptions,
               force: bool, text_field: str, batch_size: int, lazy: bool, on_block: Progress | None,
               inputs: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    from lwq.calib.stats import collect_stats
    from lwq.calib.store import CalibWriter
    from lwq.models.lazy import LazyUnsupported, load_lazy
    from lwq.models.load import resolve_device, resolve_dtype

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
    writer = CalibWriter(out, force, inputs)
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
