"""Zero-shot tasks through lm-eval-harness (an optional extra), and side-by-side comparisons.

``run_tasks`` wraps an already loaded transformers model (an lwq checkpoint loaded by ``lwq.load``
keeps its ``QuantizedLinear``s) in lm-eval's ``HFLM`` and runs ``lm_eval.simple_evaluate``; the
metrics come back as ``{task: {metric: value}}`` (lm-eval's ``acc,none`` keys shortened to ``acc``).
``compare_docs`` puts two evaluation documents side by side with their differences (pure).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Mapping, Sequence

from lwq.errors import BadInput, LwqError

INSTALL_HINT = "pip install 'lwq[lm-eval]'"


def lm_eval_module() -> ModuleType:
    """``lm_eval``, or a one-line ``LwqError`` saying how to install it."""
    try:
        return importlib.import_module("lm_eval")
    except ImportError as exc:
        raise LwqError(f"--tasks needs lm-eval-harness, which is not importable ({exc}): {INSTALL_HINT}") from None


def parse_tasks(text: str) -> list[str]:
    """``hellaswag, arc_easy`` -> ``["hellaswag", "arc_easy"]`` (duplicates and blanks dropped)."""
    tasks = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not tasks:
        raise BadInput("--tasks: give task names separated by commas, e.g. hellaswag,arc_easy")
    return tasks


def task_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` block -> ``{task: {metric: value}}``: numeric metrics only, the filter
    suffix (``,none``) dropped, ``alias`` and other strings left out."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            row[name if filt in ("", "none") else f"{name},{filt}"] = float(value)
        out[task] = row
    return out


def run_tasks(model: Any, tokenizer: Any, tasks: Sequence[str], limit: int | None = None, batch_size: int = 4,
              num_fewshot: int = 0) -> dict[str, dict[str, float]]:
    """Zero-shot (by default) accuracy of a loaded model on lm-eval ``tasks``; ``limit`` caps examples per task."""
    lm_eval = lm_eval_module()
    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be positive, got {limit}")
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    except (KeyError, ValueError) as exc:
        raise BadInput(f"lm-eval refused the tasks {', '.join(tasks)}: {' '.join(str(exc).split())[:200]}") from None
    except (ConnectionError, OSError) as exc:
        raise LwqError("lm-eval could not fetch the task data (network?): "
                       f"{' '.join(str(exc).split())[:200]}") from None
    if not out or "results" not in out:
        raise LwqError("lm-eval returned no results")
    return task_metrics(out["results"])


PPL_KEYS = ("perplexity", "nll")


def compare_docs(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two evaluation documents (``{"model", "perplexity", "nll", "tasks": {...}}``, either part optional)
    side by side: ``{"a", "b", "delta"}`` where ``delta`` holds ``b - a`` for every shared metric and
    ``perplexity_relative`` = ``b / a - 1``."""
    delta: dict[str, Any] = {}
    for key in PPL_KEYS:
        if key in a and key in b:
            delta[key] = b[key] - a[key]
    if "perplexity" in delta:
        delta["perplexity_relative"] = b["perplexity"] / a["perplexity"] - 1
    ta, tb = a.get("tasks") or {}, b.get("tasks") or {}
    tasks = {t: {m: tb[t][m] - v for m, v in ta[t].items() if m in tb[t]} for t in ta if t in tb}
    if tasks:
        delta["tasks"] = tasks
    return {"a": dict(a), "b": dict(b), "delta": delta}
