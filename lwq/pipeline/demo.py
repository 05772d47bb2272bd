"""The demo job: the whole pipeline on the built-in demo model, with a before/after table.

Steps: score layer importance (lim, measured sensitivity), quantize uniformly to 4, 3 and 2 bits
with GPTQ, quantize to 3.25 and 2.5 real bits per weight with the default plan (dp over measured
per-candidate errors, measured once and reused), evaluate every checkpoint on held-out text, and write a
report (PNGs + markdown).
Everything is built in a hidden sibling of the output folder and renamed into place at the end
(``lwq.fileio``): an earlier demo output (its marker lists exactly its entries) is replaced then, an
empty folder too; any other existing folder is refused, ``--force`` or not.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from lwq.allocate.recipes import Recipe
from lwq.errors import BadInput
from lwq.pipeline import (LoadOptions, evaluate_ppl, quantize_to_checkpoint, quantize_with_budget, score_layers)

DEMO_SEQLEN = 128
DEMO_WINDOWS = 64
CALIB_SAMPLES = 32
BUDGETS = ("3.25bit", "2.5bit")
MARKER = "LWQ_DEMO_OUTPUT.json"
Log = Callable[[str], None]


def check_output(out: Path, force: bool) -> Path:
    """Refuse an output that is a file, or an existing folder that is neither empty nor a demo output
    (``force`` changes nothing here: the demo replaces only its own outputs)."""
    from lwq.fileio import KINDS, is_output

    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BadInput(f"demo output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not is_output(out, KINDS.get("demo")):
        raise BadInput(f"{out} exists and is not a demo output (no {MARKER} listing exactly its entries); "
                       "choose another -o")
    return out.absolute()


def _eval(folder: Path, data: Path, load: LoadOptions) -> dict[str, Any]:
    res = evaluate_ppl(str(folder), str(data), seqlen=DEMO_SEQLEN, max_windows=DEMO_WINDOWS, load=load)
    doc = {"model": str(folder), "data": str(data), **res.to_dict()}
    if (folder / "config.json").is_file() and (folder / "lwq_manifest.json").is_file():
        (folder / "lwq_eval.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def run_demo(folder: Path, out: str, force: bool = False, log: Log = lambda _m: None) -> dict[str, Any]:
    """Run the demo pipeline on the demo model in ``folder``; returns the rows of the table."""
    from lwq.fileio import OutputLock

    final = check_output(Path(out).expanduser(), force)
    with OutputLock(final):
        return _run(folder, final, log)


def _run(folder: Path, final: Path, log: Log) -> dict[str, Any]:
    from lwq.fileio import publish

    model = str(folder / "model")
    calib, held = folder / "calib.txt", folder / "eval.txt"
    built: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        built["tmp"], built["result"] = tmp, _steps(model, calib, held, tmp, log)
        _relocate(tmp, final)

    publish(final, build, "demo", {"written_by": "lwq demo"})
    return json.loads(json.dumps(built["result"]).replace(str(built["tmp"]), str(final)))


def _relocate(tmp: Path, final: Path) -> None:
    """Paths written while building (report.md) name the final folder, not the hidden one."""
    for md in tmp.rglob("*.md"):
        md.write_text(md.read_text().replace(str(tmp), str(final)))


def _steps(model: str, calib: Path, held: Path, dest: Path, log: Log) -> dict[str, Any]:
    from lwq.eval.report import build_report
    from lwq.score import ScoreConfig

    load = LoadOptions(device="cpu")
    common = dict(data=str(calib), nsamples=CALIB_SAMPLES, seqlen=DEMO_SEQLEN, load=load)
    log("scoring layer importance (lim, measured sensitivity)")
    scores = score_layers(model, ["lim", "sensitivity"], ScoreConfig(granularity="block"), data=str(calib),
                          nsamples=16, seqlen=DEMO_SEQLEN, load=load)
    rows = [{"variant": "fp32 (original)", "bits_per_weight": 32.0, "output": model,
             "perplexity": _eval(Path(model), held, load)["perplexity"]}]
    for bits in (4, 3, 2):
        log(f"quantizing: uniform GPTQ {bits}-bit, group 128")
        target = dest / f"uniform-{bits}bit"
        res = quantize_to_checkpoint(model, str(target), _uniform(bits), **common)
        rows.append({"variant": f"uniform GPTQ {bits}-bit g128", "bits_per_weight": res.summary["bits_per_weight"],
                     "output": str(target), "perplexity": _eval(target, held, load)["perplexity"]})
    for budget in BUDGETS:
        log(f"planning {budget} (dp over measured per-candidate errors) and quantizing with GPTQ")
        target = dest / f"mixed-{budget}"
        res = quantize_with_budget(model, str(target), Recipe(budget=budget), error_db=str(dest / "errors.json"),
                                   **common)
        (target / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        rows.append({"variant": f"lwq mixed {budget} (dp)", "bits_per_weight": res.summary["bits_per_weight"],
                     "output": str(target), "perplexity": _eval(target, held, load)["perplexity"]})
    report = build_report([r["output"] for r in rows[1:]], dest / "report")
    return {"model": model, "eval_data": str(held), "output": str(dest), "rows": rows,
            "report": str(report["markdown"])}


def _uniform(bits: int) -> Callable[[Any], dict[str, Any]]:
    from lwq.models.arch import linear_names
    from lwq.spec import make_spec

    spec = make_spec(bits, 128, False, "gptq")
    return lambda m: {n: spec for n in linear_names(m)}
