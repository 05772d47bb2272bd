"""lwq side by side with AutoRound and GPTQModel: same fixture, same calibration windows, one ruler.

Every tool is given the same calibration windows (lwq's own sampling of ``--calib`` with
``--nsamples``/``--seqlen``/``--seed``, written once to a safetensors file and read back by each
driver); every result is scored by the same perplexity code (``PPL_CODE`` below: disjoint windows of
``--eval-seqlen`` tokens over the whole evaluation file, mean NLL of every predicted token), run in
the tool's own interpreter on the tool's own quantized model; real bits per weight are counted the
same way for all: bytes of every stored tensor of the quantized block linears (codes, scales, zeros,
g_idx, ...) x 8 / their weight count, read from the checkpoint files each tool wrote.

AutoRound and GPTQModel run only when their interpreters are given (each in its own venv; lwq never
imports them)::

    python benchmarks/versus.py --autoround-python /path/ar-venv/bin/python \\
        [--gptqmodel-python /path/gptqmodel-venv/bin/python] [--lwq "bits3=--bits 3 --backend gptq --refine block"]

Prints one table (tool, setting, real bpw, ppl, wall seconds) and writes ``benchmarks/out/versus.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DEFAULT_LWQ = (
    "gptq-w3=--bits 3 --backend gptq --refine none",
    "refine-w3=--bits 3 --backend gptq --refine block",
    "refine-3.30bit=--budget 3.30bit --refine block",
)

PPL_CODE = r'''
import json, math, sys, torch
from safetensors import safe_open

def perplexity(model, tok, path, seqlen, batch=8):
    """Disjoint windows of ``seqlen`` tokens over the whole file; mean NLL over predicted tokens."""
    ids = torch.tensor(tok(open(path, encoding="utf-8").read())["input_ids"])
    n = ids.numel() // seqlen
    wins = ids[: n * seqlen].view(n, seqlen)
    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            x = wins[i:i + batch]
            logits = model(input_ids=x).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     x[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss); count += x[:, 1:].numel()
    return math.exp(nll / count)

def real_bpw(folder, linears):
    """Bytes of every stored tensor of the quantized linears (bias excluded) x 8 / their weights."""
    import glob
    stored = 0
    for f in glob.glob(folder + "/**/*.safetensors", recursive=True):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                mod, _, leaf = k.rpartition(".")
                if mod in linears and leaf != "bias":
                    t = st.get_slice(k)
                    shape = t.get_shape(); dt = t.get_dtype()
                    size = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I8": 1, "U8": 1, "I16": 2, "I64": 8}[dt]
                    stored += size * math.prod(shape)
    return 8.0 * stored / sum(linears.values())

def windows(path):
    with safe_open(path, "pt") as st:
        return st.get_tensor("windows")

def linear_numels(model):
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}" and name.split(".")[-1] != "lm_head":
            out[name] = mod.weight.numel()
    return out
'''

AUTOROUND_DRIVER = PPL_CODE + r'''
import time
from transformers import AutoModelForCausalLM, AutoTokenizer
from auto_round import AutoRound
a = json.loads(sys.argv[1])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(a["model"])
lin = linear_numels(model)
w = windows(a["windows"])
t0 = time.perf_counter()
ar = AutoRound(model, tok, bits=a["bits"], group_size=a["group_size"], sym=a["sym"], iters=a["iters"],
               nsamples=w.shape[0], seqlen=w.shape[1], batch_size=8, dataset=list(w.split(8)), device_map="cpu",
               seed=0)
ar.quantize_and_save(a["out"], format="auto_round", inplace=False)
seconds = time.perf_counter() - t0
qdq = ar.model  # weights replaced by their quantize-dequantize values, modules still nn.Linear
print(json.dumps({"ppl": perplexity(qdq, tok, a["eval"], a["eval_seqlen"]), "bpw": real_bpw(a["out"], lin),
                  "seconds": seconds}))
'''

GPTQMODEL_DRIVER = PPL_CODE + r'''
import time
from transformers import AutoTokenizer
from gptqmodel import GPTQModel, QuantizeConfig
a = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(a["model"])
w = windows(a["windows"])
t0 = time.perf_counter()
m = GPTQModel.load(a["model"], QuantizeConfig(bits=a["bits"], group_size=a["group_size"], sym=a["sym"]), device="cpu")
m.quantize([{"input_ids": r.unsqueeze(0), "attention_mask": torch.ones_like(r).unsqueeze(0)} for r in w], batch_size=8)
m.save(a["out"])
seconds = time.perf_counter() - t0
q = GPTQModel.load(a["out"], device="cpu")
from transformers import AutoModelForCausalLM
lin = linear_numels(AutoModelForCausalLM.from_pretrained(a["model"]))
print(json.dumps({"ppl": perplexity(q.model, tok, a["eval"], a["eval_seqlen"]), "bpw": real_bpw(a["out"], lin),
                  "seconds": seconds}))
'''

LWQ_DRIVER = PPL_CODE + r'''
import lwq
from transformers import AutoModelForCausalLM, AutoTokenizer
a = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(a["model"])
if a.get("out"):
    model = lwq.load(a["out"], device="cpu")
    lin = linear_numels(AutoModelForCausalLM.from_pretrained(a["model"]))
    bpw = real_bpw(a["out"], lin)
else:
    model, bpw = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32), 32.0
print(json.dumps({"ppl": perplexity(model, tok, a["eval"], a["eval_seqlen"]), "bpw": bpw}))
'''


def run_lwq(*args: str) -> str:
    """``python -m lwq ARGS`` from this checkout; its stdout, or exit with its one-line error."""
    r = subprocess.run([sys.executable, "-m", "lwq", *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(f"lwq {' '.join(args[:3])}: {r.stderr.strip().splitlines()[-1]}")
    return r.stdout


def drive(python: str, code: str, args: dict, timeout: float = 7200) -> dict:
    """Run one driver in ``python``; its last stdout line is its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([python, "-c", code, json.dumps(args)], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise SystemExit(f"driver failed ({python}): "
                         f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_parser(doc: str | None, name: str, fixture: bool = False, **options: Any) -> argparse.ArgumentParser:
    """The parser every benchmark starts from: its description (the docstring's first paragraph),
    ``--out`` (default ``benchmarks/out/NAME.json``), with ``fixture`` the docs8 ruler
    (``--model --calib --eval --nsamples --eval-seqlen``), and one ``--NAME`` per keyword of
    ``options`` (``eval_seqlen=256`` -> ``--eval-seqlen``, typed like its default)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    for key, default in options.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / f"{name}.json"))
    if fixture:
        for flag, default in (("--model", SHARED / "fixtures" / "docs8"),
                              ("--calib", SHARED / "data" / "docs-calib.txt"),
                              ("--eval", SHARED / "data" / "docs-eval.txt")):
            p.add_argument(flag, default=str(default))
        p.add_argument("--nsamples", type=int, default=128)
        p.add_argument("--eval-seqlen", type=int, default=256)
    return p


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary folder for one benchmark run, removed after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as t:
        yield Path(t)


def write_windows(a: argparse.Namespace, path: Path) -> None:
    """lwq's calibration windows, saved for every tool."""
    from safetensors.torch import save_file

    from lwq.calib.data import calibration_samples
    from lwq.models.load import load_tokenizer

    w = calibration_samples(load_tokenizer(a.model), a.calib, a.nsamples, a.seqlen, a.seed)
    save_file({"windows": w.contiguous()}, str(path))


def main() -> None:
    p = bench_parser(__doc__, "versus", fixture=True)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lwq", action="append", help="NAME=FLAGS of one lwq quantize run (repeatable)")
    p.add_argument("--autoround-python", help="interpreter with auto-round installed")
    p.add_argument("--autoround-bits", default="3", help="comma list of AutoRound widths (sym)")
    p.add_argument("--autoround-iters", type=int, default=200)
    p.add_argument("--gptqmodel-python", help="interpreter with gptqmodel installed")
    p.add_argument("--gptqmodel-bits", default="3")
    a = p.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lwq-versus-") as tmp:
        win = Path(tmp) / "windows.safetensors"
        write_windows(a, win)
        common = {"model": a.model, "windows": str(win), "eval": a.eval, "eval_seqlen": a.eval_seqlen,
                  "group_size": a.group_size}
        res = drive(sys.executable, LWQ_DRIVER, {**common, "out": None})
        rows.append({"tool": "fp32", "setting": "-", **res, "seconds": 0.0})
        _show(rows[-1])
        for item in a.lwq or DEFAULT_LWQ:
            name, _, flags = item.partition("=")
            out = Path(tmp) / f"lwq-{name}"
            cmd = [sys.executable, "-m", "lwq", "quantize", a.model, "-o", str(out), "--group-size", str(a.group_size),
                   "--data", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed),
                   "-q", *shlex.split(flags)]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            seconds = time.perf_counter() - t0
            if r.returncode != 0:
                raise SystemExit(f"lwq {flags}: {r.stderr.strip().splitlines()[-1]}")
            res = drive(sys.executable, LWQ_DRIVER, {**common, "out": str(out)})
            rows.append({"tool": "lwq", "setting": flags, **res, "seconds": seconds})
            _show(rows[-1])
        for tool, python, code, widths in (("AutoRound", a.autoround_python, AUTOROUND_DRIVER, a.autoround_bits),
                                            ("GPTQModel", a.gptqmodel_python, GPTQMODEL_DRIVER, a.gptqmodel_bits)):
            if not python:
                continue
            for bits in (int(b) for b in widths.split(",")):
                out = Path(tmp) / f"{tool}-w{bits}"
                res = drive(python, code, {**common, "bits": bits, "sym": True, "iters": a.autoround_iters,
                                           "out": str(out)})
                rows.append({"tool": tool, "setting": f"W{bits} g{a.group_size} sym", **res})
                _show(rows[-1])
    print("\n| tool | setting | real bpw | ppl | wall s |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tool']} | {r['setting']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['seconds']:.0f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))


def _show(row: dict) -> None:
    print(f"{row['tool']:10s} {row['setting']:45s} bpw {row['bpw']:.3f} ppl {row['ppl']:.3f} "
          f"s {row['seconds']:.0f}", flush=True)


if __name__ == "__main__":
    main()
