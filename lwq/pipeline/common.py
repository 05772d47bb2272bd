"""Shared pieces of the orchestration: load options, calibration windows, source names, perplexity."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lwq.calib.data import load_text, tokenize
from lwq.eval.perplexity import PplResult, perplexity
from lwq.models.load import check_finite_weights, load_tokenizer
from lwq.pipeline.load import load_model

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LoadOptions:
    """How models are loaded: dtype, device, whether custom code is trusted, and how many bytes a
    whole model may take on its device before planning keeps its blocks off it (None: 80% of free)."""

    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    max_memory: int | None = None


def evaluate_ppl(
    model_name: str, data: str, seqlen: int = 256, stride: int | None = None, max_windows: int | None = None,
    batch_size: int = 4, load: LoadOptions = LoadOptions(), text_field: str = "text",
    on_step: Progress | None = None, model: Any = None,
) -> PplResult:
    """Load ``model_name`` (a model or an lwq checkpoint; or use ``model``) and its tokenizer and
    measure perplexity on ``data``. A plain safetensors model too large for the device (80% of its
    free memory, or ``load.max_memory``) is read one block at a time from its files and evaluated
    block by block (``perplexity_by_blocks``: the same number, memory about one block)."""
    tok = load_tokenizer(model_name, load.trust_remote_code)
    ids = tokenize(tok, load_text(data, "eval", text_field))
    if model is None:
        lazy = _lazy_if_too_big(model_name, load)
        if lazy is not None:
            from lwq.eval.perplexity import perplexity_by_blocks

            model, placement = lazy
            return perplexity_by_blocks(model, ids, seqlen, stride, max_windows, batch_size, on_step,
                                        placement.device, placement.loader)
        model = load_model(model_name, load.dtype, load.device, load.trust_remote_code)
    check_finite_weights(model)
    return perplexity(model, ids, seqlen, stride, max_windows, batch_size, on_step)


def _lazy_if_too_big(model_name: str, load: LoadOptions) -> tuple[Any, Any] | None:
    """``(model, placement)`` with the blocks left on disk when ``model_name`` is a plain local
    safetensors model that does not fit its device; None otherwise (load it whole, as usual)."""
    from lwq.models.lazy import LazyUnsupported, load_lazy, meta_model
    from lwq.models.load import resolve_device
    from lwq.models.placement import fits_whole, offload

    if load.trust_remote_code:
        return None
    dev = resolve_device(load.device)
    try:
        sized, _dtype = meta_model(model_name, load.dtype, str(dev))  # sizes only: nothing read yet
    except LazyUnsupported:
        return None  # lwq checkpoints, hub ids, custom code: loaded whole
    if fits_whole(sized, dev, load.max_memory):
        return None
    model, loader = load_lazy(model_name, load.dtype, str(dev))
    return model, offload(model, dev, loader)


def calib_batches(model_name: str, data: str | None, nsamples: int, seqlen: int, seed: int, load: LoadOptions,
                  text_field: str, model: Any = None) -> Any:
    """Tokenized calibration windows (nsamples, seqlen) of ``data`` for ``model_name``'s tokenizer.
    ``data`` None or ``self``: sequences sampled from ``model`` itself (needs ``model``)."""
    from lwq.calib.data import SELF_DATA, calibration_samples, self_generated_samples
    from lwq.errors import BadInput

    if data is None or data == SELF_DATA:
        if model is None:
            raise BadInput("calibration text is needed here: pass --data PATH (a .txt/.jsonl file or wikitext2/c4)")
        return self_generated_samples(model, nsamples, seqlen, seed)

    tok = load_tokenizer(model_name, load.trust_remote_code)
    return calibration_samples(tok, data, nsamples, seqlen, seed, text_field)


def source_name(name: str) -> str:
    """An absolute path for local folders/files (so a calibration folder can find them again)."""
    from pathlib import Path

    from lwq.models.load import looks_local

    p = Path(name).expanduser()
    return str(p.resolve()) if looks_local(name) and p.exists() else name
