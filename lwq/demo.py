"""The demo job: on the built-in demo model, run the pipeline stages and collect a before/after table."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lwq.pipeline import LoadOptions, evaluate_ppl
from lwq.ui import progress

DEMO_SEQLEN = 128
DEMO_WINDOWS = 64


def _ppl(model: str, data: Path, quiet: bool, label: str) -> float:
    with progress(quiet) as prog:
        task = prog.add_task(f"perplexity: {label}", total=None)
        res = evaluate_ppl(model, str(data), seqlen=DEMO_SEQLEN, max_windows=DEMO_WINDOWS,
                           load=LoadOptions(device="cpu"),
                           on_step=lambda i, n: prog.update(task, completed=i, total=n))
    return res.perplexity


def run_demo(folder: Path, out: str, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Evaluate the demo model (and, as stages land, its quantized variants); returns the rows."""
    model = str(folder / "model")
    eval_txt = folder / "eval.txt"
    rows = [{"variant": "fp32 (original)", "bits_per_weight": 32.0, "perplexity": _ppl(model, eval_txt, quiet, "fp32")}]
    return {"model": model, "eval_data": str(eval_txt), "output": out, "rows": rows}
