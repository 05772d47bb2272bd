"""Validate the linearity estimate against the measured one on the shared fixtures.

Per fixture: both error databases (``lwq plan --scorer sensitivity|linearity --error-db``, measured
once and reused for every budget), the Spearman correlation of the two over every candidate, the
planning seconds of each, then the dp plan of each estimate at every budget quantized (``lwq quantize
--plan``, GPTQ, ``--refine none`` by default so the comparison is about the plans) and evaluated on
the fixture's evaluation text (disjoint windows). Prints a table and writes
benchmarks/out/linearity.json.

    python benchmarks/linearity.py [--fixtures docs8,stories260k] [--budgets 2.5,3.0,3.25,3.5] [--refine none]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np

from benchmarks.versus import SHARED, bench_parser, scratch
from benchmarks.versus import run_lwq as lwq
FIXTURES = {  # model, calibration text, evaluation text, group size
    "docs8": ("fixtures/docs8", "data/docs-calib.txt", "data/docs-eval.txt", 64),
    "stories260k": ("fixtures/stories260k", "data/tinystories/calib.txt", "data/tinystories/valid-head.txt", 32),
}


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def paired(db_a: dict, db_b: dict) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for name, entries in db_a["entries"].items():
        for key, v in entries.items():
            if v > 0 and key in db_b["entries"].get(name, {}):
                xs.append(v)
                ys.append(db_b["entries"][name][key])
    return xs, ys


def main() -> None:
    a = bench_parser(__doc__, "linearity", fixtures="docs8,stories260k", budgets="2.5,3.0,3.25,3.5", nsamples=128,
                     seqlen=256, refine="none").parse_args()
    report = []
    with scratch("lwq-linearity-") as tmp:
        for fx in a.fixtures.split(","):
            model, calib, held, gs = FIXTURES[fx]
            model, calib, held = (str(SHARED / x) for x in (model, calib, held))
            common = ["--group-size", str(gs), "--data", calib, "--nsamples", str(a.nsamples), "--seqlen",
                      str(a.seqlen), "--quiet"]
            dbs, seconds = {}, {}
            for est in ("sensitivity", "linearity"):
                t0 = time.perf_counter()
                for b in a.budgets.split(","):
                    lwq("plan", model, "--budget", f"{b}bit", "--scorer", est,
                        "--error-db", str(tmp / f"{fx}-{est}.json"),
                        "-o", str(tmp / f"{fx}-{est}-{b}.json"), *common)
                    seconds.setdefault(est, time.perf_counter() - t0)  # the first budget measures the database
                dbs[est] = json.loads((tmp / f"{fx}-{est}.json").read_text())
            xs, ys = paired(dbs["linearity"], dbs["sensitivity"])
            row = {"fixture": fx, "candidates": len(xs), "spearman": round(spearman(xs, ys), 4),
                   "seconds": {k: round(v, 1) for k, v in seconds.items()}, "ppl": {}}
            print(f"{fx}: Spearman {row['spearman']} over {len(xs)} candidates; "
                  f"planning s {row['seconds']}", flush=True)
            for b in a.budgets.split(","):
                for est in ("sensitivity", "linearity"):
                    out = tmp / f"q-{fx}-{est}-{b}"
                    lwq("quantize", model, "--plan", str(tmp / f"{fx}-{est}-{b}.json"), "--refine", a.refine,
                        "-o", str(out), *common)
                    ev = json.loads(lwq("eval", str(out), "--data", held, "--seqlen", str(a.seqlen), "--json"))
                    row["ppl"].setdefault(b, {})[est] = round(ev["perplexity"], 4)
                    print(f"  {b} bpw {est:12s} ppl {ev['perplexity']:.4f}", flush=True)
            report.append(row)
    print("\n| fixture | budget | sensitivity ppl | linearity ppl | diff |\n|---|---|---:|---:|---:|")
    for row in report:
        for b, d in row["ppl"].items():
            diff = d["linearity"] / d["sensitivity"] - 1
            print(f"| {row['fixture']} | {b} | {d['sensitivity']} | {d['linearity']} | {100 * diff:+.2f}% |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "fixtures": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
