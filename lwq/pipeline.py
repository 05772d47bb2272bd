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
