"""GPTQ trials against RTN trials in the measured estimate, on the stories260k fixture: uniform GPTQ
3/4-bit g32 for reference, then a dp plan per budget with each kind of trial, quantized with GPTQ g32
on the same calibration windows, perplexity on 80 x 256 tokens of TinyStories validation text.
Prints one line per row; writes benchmarks/out/trials_stories.json.

    python benchmarks/trials_stories.py [3.0bit,3.5bit,4.0bit,4.5bit]
"""
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

ROOT = Path(__file__).resolve().parent.parent
from lwq.allocate.recipes import Recipe  # noqa: E402
from lwq.pipeline import LoadOptions, evaluate_ppl, quantize_to_checkpoint  # noqa: E402
from lwq.pipeline.common import calib_batches  # noqa: E402
from lwq.pipeline.load import load_model  # noqa: E402
from lwq.models.arch import linear_names  # noqa: E402
from lwq.pipeline.plan import plan_model  # noqa: E402
from lwq.spec import make_spec  # noqa: E402

SHARED = ROOT.parent / "shared"
M = str(SHARED / "fixtures" / "stories260k")
CAL, EV = str(SHARED / "data" / "tinystories" / "calib.txt"), str(SHARED / "data" / "tinystories" / "valid-head.txt")
DEFAULT_BUDGETS = "3.0bit,3.5bit,4.0bit,4.5bit"


def main() -> None:
    budgets = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_BUDGETS
    with tempfile.TemporaryDirectory(prefix="lwq-trials-") as tmp:
        run(tmp, budgets)


def run(tmp: str, budgets: str) -> None:
    """Every row, checkpoints under ``tmp``."""
    torch.set_num_threads(2)
    load = LoadOptions(device="cpu")
    model = load_model(M, "float32", "cpu")
    samples = calib_batches(M, CAL, 64, 256, 0, load, "text")
    out = {"fp32": {"ppl": evaluate_ppl(M, EV, 256, max_windows=80, load=load, model=model).perplexity, "bpw": 32.0}}
    print("fp32", out["fp32"], flush=True)
    for bits in (3, 4):
        spec = make_spec(bits, 32, backend="gptq")
        r = quantize_to_checkpoint(M, f"{tmp}/u{bits}", {n: spec for n in linear_names(model)}, CAL, 64, 256, 0, load,
                                   force=True)
        ppl = evaluate_ppl(f"{tmp}/u{bits}", EV, 256, max_windows=80, load=load).perplexity
        out[f"uniform {bits}-bit"] = {"ppl": ppl, "bpw": r.summary["bits_per_weight"]}
        print(f"uniform {bits}-bit", out[f"uniform {bits}-bit"], flush=True)
    for mode in ("backend", "rtn"):
        db = None
        for budget in budgets.split(","):
            t0 = time.time()
            plan, db = plan_model(model, samples, Recipe(budget=budget, group_size=32, measure_with=mode), 0, db=db)
            target = f"{tmp}/{mode}-{budget}"
            quantize_to_checkpoint(M, target, plan.specs, CAL, 64, 256, 0, load, force=True)
            ppl = evaluate_ppl(target, EV, 256, max_windows=80, load=load).perplexity
            out[f"{mode} {budget}"] = {"ppl": ppl, "bpw": plan.bits_per_weight, "plan_s": time.time() - t0}
            print(mode, budget, out[f"{mode} {budget}"], flush=True)
    (ROOT / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "out" / "trials_stories.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
