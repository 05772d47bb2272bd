"""Do the real clients load what ``lwq export`` writes, and compute what ``lwq eval`` computes?

For each lwq checkpoint given (``--ckpt NAME=PATH``, repeatable; default: docs8 quantized here at
uniform 4-bit and at a mixed ``--budget 3.30bit``, both asymmetric, plus a ``--target vllm`` plan),
export it with lwq (GPTQ for GPTQModel and transformers, compressed-tensors for transformers), then
score every export in its client's own interpreter with one perplexity code (``versus.PPL_CODE``:
disjoint windows over the whole evaluation file):

- lwq: ``lwq.load`` of the checkpoint (the reference);
- transformers + compressed-tensors (this interpreter, ``pip install 'lwq[serve]'``);
- GPTQModel (``--gptqmodel-python``: its own venv, it pulls a CUDA torch): ``GPTQModel.load`` on CPU;
- transformers + optimum GPTQ (``--optimum-python``; may be the same venv): ``from_pretrained``.

A client that refuses a checkpoint is a row with its one-line error, not a crash::

    python benchmarks/clients.py --gptqmodel-python /tmp/gm-venv/bin/python --optimum-python /tmp/gm-venv/bin/python

Prints a table (checkpoint, export, client, ppl, relative difference to lwq) and writes
``benchmarks/out/clients.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.versus import PPL_CODE, ROOT, bench_parser, run_lwq, scratch

CT_DRIVER = PPL_CODE + r'''
from transformers import AutoModelForCausalLM, AutoTokenizer
a = json.loads(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(a["export"], dtype=torch.float32)
print(json.dumps({"ppl": perplexity(model, AutoTokenizer.from_pretrained(a["export"]), a["eval"], a["eval_seqlen"])}))
'''

GPTQMODEL_LOAD = PPL_CODE + r'''
from transformers import AutoTokenizer
from gptqmodel import GPTQModel, BACKEND
a = json.loads(sys.argv[1])
m = GPTQModel.load(a["export"], device="cpu", backend=BACKEND.TORCH)
m.model.float()
print(json.dumps({"ppl": perplexity(m.model, AutoTokenizer.from_pretrained(a["export"]), a["eval"], a["eval_seqlen"])}))
'''

OPTIMUM_LOAD = PPL_CODE + r'''
from transformers import AutoModelForCausalLM, AutoTokenizer
a = json.loads(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(a["export"], device_map="cpu")
print(json.dumps({"ppl": perplexity(model, AutoTokenizer.from_pretrained(a["export"]), a["eval"], a["eval_seqlen"])}))
'''

LWQ_LOAD = PPL_CODE + r'''
import lwq
from transformers import AutoTokenizer
a = json.loads(sys.argv[1])
print(json.dumps({"ppl": perplexity(lwq.load(a["export"], device="cpu"), AutoTokenizer.from_pretrained(a["export"]),
                                    a["eval"], a["eval_seqlen"])}))
'''


def drive(python: str, code: str, args: dict) -> dict:
    """One client run; its last stdout line is its JSON result, a failure its last stderr line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([python, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        return {"ppl": None, "error": lines[-1][:300] if lines else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def default_checkpoints(a: argparse.Namespace, tmp: Path) -> dict[str, Path]:
    common = ["--group-size", "64", "--data", a.calib, "--nsamples", str(a.nsamples), "--seqlen", "256"]
    runs = {"w4-asym": ["--bits", "4", "--backend", "gptq"],
            "3.30bit-asym": ["--budget", "3.30bit", "--target", "gptqmodel"],
            "3.30bit-vllm": ["--budget", "3.30bit", "--target", "vllm"]}
    out = {}
    for name, flags in runs.items():
        out[name] = tmp / name
        print(f"quantizing {name} ...", flush=True)
        run_lwq("quantize", a.model, "-o", str(out[name]), *common, *flags, "-q")
    return out


def main() -> None:
    p = bench_parser(__doc__, "clients", fixture=True)
    p.add_argument("--ckpt", action="append", help="NAME=PATH of an lwq checkpoint (repeatable)")
    p.add_argument("--gptqmodel-python", help="interpreter with gptqmodel installed")
    p.add_argument("--optimum-python", help="interpreter with transformers + optimum + gptqmodel installed")
    a = p.parse_args()
    rows = []
    with scratch("lwq-clients-") as tmp:
        ckpts = ({n: Path(v) for n, _, v in (c.partition("=") for c in a.ckpt)} if a.ckpt
                 else default_checkpoints(a, tmp))
        base = {"eval": a.eval, "eval_seqlen": a.eval_seqlen}
        for name, ck in ckpts.items():
            ref = drive(sys.executable, LWQ_LOAD, {**base, "export": str(ck)})["ppl"]
            rows.append({"checkpoint": name, "export": "-", "client": "lwq", "ppl": ref, "rel": 0.0})
            _show(rows[-1])
            exports = {"gptq": tmp / f"{name}-gptq", "compressed-tensors": tmp / f"{name}-ct"}
            run_lwq("export", str(ck), "--format", "gptq", "--target", "gptqmodel", "-o", str(exports["gptq"]), "-q")
            try:
                run_lwq("export", str(ck), "--format", "compressed-tensors", "-o", str(exports["compressed-tensors"]),
                        "-q")
            except SystemExit as e:
                exports.pop("compressed-tensors")
                rows.append({"checkpoint": name, "export": "compressed-tensors", "client": "lwq export",
                             "ppl": None, "error": str(e)})
            clients = [("compressed-tensors", "transformers+compressed-tensors", sys.executable, CT_DRIVER),
                       ("gptq", "GPTQModel", a.gptqmodel_python, GPTQMODEL_LOAD),
                       ("gptq", "transformers+optimum", a.optimum_python, OPTIMUM_LOAD)]
            for fmt, client, python, code in clients:
                if not python or fmt not in exports:
                    continue
                res = drive(python, code, {**base, "export": str(exports[fmt])})
                rel = None if res["ppl"] is None or ref is None else res["ppl"] / ref - 1
                rows.append({"checkpoint": name, "export": fmt, "client": client, **res, "rel": rel})
                _show(rows[-1])
    print("\n| checkpoint | export | client | ppl | vs lwq |\n|---|---|---|---:|---:|")
    for r in rows:
        ppl = f"{r['ppl']:.3f}" if r["ppl"] is not None else f"refused: {r.get('error', '')[:80]}"
        rel = f"{100 * r['rel']:+.3f}%" if r.get("rel") is not None else "-"
        print(f"| {r['checkpoint']} | {r['export']} | {r['client']} | {ppl} | {rel} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))


def _show(row: dict) -> None:
    ppl = f"{row['ppl']:.3f}" if row.get("ppl") is not None else f"refused ({row.get('error')})"
    print(f"{row['checkpoint']:14s} {row['export']:20s} {row['client']:32s} {ppl}", flush=True)


if __name__ == "__main__":
    main()
