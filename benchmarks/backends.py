"""Backends on the docs8 fixture: method, bits, real bits/weight, perplexity in memory and of the
reloaded checkpoint (they must match), seconds. Prints a table; writes benchmarks/out/backends.json.

    python benchmarks/backends.py [--fixtures ../shared] [--only rtn,gptq] [--group-size 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

ROOT = Path(__file__).resolve().parent.parent

from lwq.calib.data import load_text, tokenize  # noqa: E402
from lwq.eval.perplexity import perplexity  # noqa: E402
from lwq.formats.checkpoint import load_checkpoint  # noqa: E402
from lwq.models.arch import linear_names  # noqa: E402
from lwq.models.load import load_tokenizer  # noqa: E402
from lwq.pipeline.load import load_model  # noqa: E402
from lwq.pipeline import LoadOptions, quantize_to_checkpoint  # noqa: E402
from lwq.spec import make_spec  # noqa: E402

SEQLEN, WINDOWS, NSAMPLES = 256, 80, 128


def runs(group: int) -> list[tuple[str, int, int, bool]]:
    """(backend, bits, group size, act-order) rows."""
    rows = [(b, bits, group, False) for bits in (4, 3, 2) for b in ("rtn", "gptq")]
    rows += [("gptq", bits, group, True) for bits in (4, 3)]
    rows += [("bnb-nf4", 4, 64, False), ("bnb-int8", 8, -1, False)]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fixtures", default=str(ROOT.parent / "shared"))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--only", default="", help="comma-separated backends to run")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    shared = Path(args.fixtures)
    model_dir = str(shared / "fixtures" / "docs8")
    calib, evalf = str(shared / "data" / "docs-calib.txt"), str(shared / "data" / "docs-eval.txt")
    ids = tokenize(load_tokenizer(model_dir), load_text(evalf, "eval"))

    def ppl(model) -> float:
        return perplexity(model, ids, SEQLEN, max_windows=WINDOWS).perplexity

    results = [{"method": "fp32", "bits": 32, "group_size": None, "bits_per_weight": 32.0,
                "ppl": ppl(load_model(model_dir, "float32", "cpu")), "ppl_reloaded": None, "seconds": 0.0}]
    print(f"fp32: ppl {results[0]['ppl']:.3f}", flush=True)
    only = set(filter(None, args.only.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (backend, bits, group, act_order) in enumerate(runs(args.group_size)):
            if only and backend not in only:
                continue
            spec = make_spec(bits, group, backend=backend, act_order=act_order)
            t0 = time.perf_counter()
            res = quantize_to_checkpoint(model_dir, f"{tmp}/q{i}", lambda m: {n: spec for n in linear_names(m)},
                                         data=calib, nsamples=NSAMPLES, seqlen=SEQLEN, load=LoadOptions(device="cpu"))
            seconds = time.perf_counter() - t0
            row = {"method": backend + (" act-order" if act_order else ""), "bits": bits, "group_size": group,
                   "bits_per_weight": res.summary["bits_per_weight"], "ppl": ppl(res.model),
                   "ppl_reloaded": ppl(load_checkpoint(f"{tmp}/q{i}", device="cpu")),
                   "quantize_seconds": res.summary["seconds"], "seconds": seconds}
            results.append(row)
            print(f"{row['method']} w{bits} g{group}: bpw {row['bits_per_weight']:.3f} ppl {row['ppl']:.3f} "
                  f"reloaded {row['ppl_reloaded']:.3f} ({seconds:.1f} s)", flush=True)
    print_table(results)
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": "docs8", "eval": {"data": "docs-eval.txt", "seqlen": SEQLEN, "windows": WINDOWS},
           "calibration": {"data": "docs-calib.txt", "nsamples": NSAMPLES, "seqlen": SEQLEN, "seed": 0},
           "torch_threads": torch.get_num_threads(), "rows": results}
    (out / "backends.json").write_text(json.dumps(doc, indent=2) + "\n")


def print_table(rows: list[dict]) -> None:
    print("\n| method | bits | group | real bpw | ppl (in memory) | ppl (reloaded) | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = "" if r["ppl_reloaded"] is None else f"{r['ppl_reloaded']:.3f}"
        print(f"| {r['method']} | {r['bits']} | {r['group_size'] if r['group_size'] is not None else ''} | "
              f"{r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {rel} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
