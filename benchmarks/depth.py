"""Peak memory and time of ``lwq quantize`` against depth: random llama models of one width
(hidden 1024, intermediate 2816, vocab 2048) with 4, 8, 16 and 32 blocks. Each run is a fresh
``python -m lwq quantize`` process whose peak resident memory (``ru_maxrss``) comes from
``os.wait4``. ``lwq quantize`` reads the model one block at a time (``lwq.models.lazy``) and streams
the finished blocks into the checkpoint from its work folder, so its peak should barely move with
depth; the ``eager`` rows load the whole model first (``quantize_to_checkpoint(lazy=False)``) for
contrast. The ``plan`` rows run ``lwq quantize --plan`` with a mixed hand-written plan (RTN: 3-bit
MLPs, 4-bit attention), which is read one block at a time too. The ``budget`` rows plan under a
3.5-bit budget (measured errors of 3- and 4-bit RTN candidates, dp) and quantize: ``budget-lazy``
with ``--max-memory 1MB``, so planning reads every block from disk for its turn, ``budget`` with
the default (the model fits: planning holds it whole). Prints a table; writes
benchmarks/out/depth.json.

    python benchmarks/depth.py [--depths 4,8,16,32] [--methods rtn,gptq,plan,budget,budget-lazy,rtn-eager]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 1024, 2816, 2048, 16, 4
NSAMPLES, SEQLEN = 16, 128
BUDGET_NSAMPLES, BUDGET_SEQLEN = 2, 64  # planning measures every candidate of every layer: O(depth^2) block runs

EAGER = """
import sys
from lwq.models.arch import linear_names
from lwq.pipeline import LoadOptions, quantize_to_checkpoint
from lwq.spec import make_spec
spec = make_spec(4, 128)
quantize_to_checkpoint(sys.argv[1], sys.argv[2], lambda m: {n: spec for n in linear_names(m)},
                       load=LoadOptions(device="cpu"), lazy=False)
"""
MIXED_PLAN = {"version": 1, "default": {"bits": 4, "group_size": 128, "backend": "rtn"},
              "layers": {"re:.*mlp.*": {"bits": 3}}}


def make_model(folder: Path, blocks: int, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> None:
    """Save a random llama of ``blocks`` blocks and a word-level tokenizer to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", num_hidden_layers=blocks, hidden_size=hidden, intermediate_size=intermediate,
                               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                               max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder), safe_serialization=True)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(folder))


def measure(argv: list[str], threads: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one child process; raises when it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}... failed ({proc.returncode}): {err.strip()[-300:]}")
    return usage.ru_maxrss / 1024, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--depths", default="4,8,16,32")
    ap.add_argument("--methods", default="rtn,gptq,rtn-eager")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "depth.json"))
    ap.add_argument("--make", nargs="+", metavar="FOLDER BLOCKS [HIDDEN INTERMEDIATE]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:  # in a child process, so this one stays small: a forked child starts with our memory
        make_model(Path(args.make[0]), *map(int, args.make[1:]))
        return
    depths = [int(d) for d in args.depths.split(",")]
    methods = args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        words = " ".join(f"w{(i * 7919) % (VOCAB - 3)}" for i in range(NSAMPLES * SEQLEN * 2))
        (root / "calib.txt").write_text(words)
        (root / "plan.json").write_text(json.dumps(MIXED_PLAN))
        for depth in depths:
            model = root / f"llama-{depth}"
            subprocess.run([sys.executable, __file__, "--make", str(model), str(depth)], check=True,
                           stderr=subprocess.DEVNULL)
            size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
            for method in methods:
                out = root / f"q-{depth}-{method}"
                if method == "rtn-eager":
                    argv = ["-c", EAGER, str(model), str(out)]
                elif method.startswith("budget"):
                    argv = ["-m", "lwq", "quantize", str(model), "-o", str(out), "--budget", "3.5bit",
                            "--candidate-bits", "3,4", "--backend", "rtn", "--device", "cpu", "--quiet",
                            "--data", str(root / "calib.txt"), "--nsamples", str(BUDGET_NSAMPLES),
                            "--seqlen", str(BUDGET_SEQLEN),
                            *(["--max-memory", "1MB"] if method == "budget-lazy" else [])]
                elif method == "plan":
                    argv = ["-m", "lwq", "quantize", str(model), "-o", str(out), "--plan", str(root / "plan.json"),
                            "--device", "cpu", "--quiet"]
                else:
                    argv = ["-m", "lwq", "quantize", str(model), "-o", str(out), "--bits", "4", "--backend", method,
                            "--device", "cpu", "--quiet", "--data", str(root / "calib.txt"),
                            "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN)]
                rss, seconds = measure(argv, args.threads)
                ckpt = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
                rows.append({"blocks": depth, "method": method, "model_mib": round(size, 1),
                             "peak_rss_mib": round(rss, 1),
                             "seconds": round(seconds, 2), "checkpoint_mib": round(ckpt, 1)})
                print(f"{depth:>6} {method:>10} model {size:8.1f} MiB  peak RSS {rss:8.1f} MiB  {seconds:7.1f} s",
                      flush=True)
            for f in model.glob("*"):
                f.unlink()
    growth = {}
    for method in methods:
        mine = {r["blocks"]: r["peak_rss_mib"] for r in rows if r["method"] == method}
        if min(depths) in mine and max(depths) in mine:
            growth[method] = round(mine[max(depths)] / mine[min(depths)] - 1, 4)
    print("\n| blocks | method | model MiB | peak RSS MiB | seconds | checkpoint MiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['blocks']} | {r['method']} | {r['model_mib']} | {r['peak_rss_mib']} | {r['seconds']} | "
              f"{r['checkpoint_mib']} |")
    print("\npeak RSS growth from", min(depths), "to", max(depths), "blocks:",
          ", ".join(f"{m} {g:+.1%}" for m, g in growth.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"width": {"hidden": HIDDEN, "intermediate": INTERMEDIATE, "vocab": VOCAB},
                                          "nsamples": NSAMPLES, "seqlen": SEQLEN, "threads": args.threads,
                                          "rows": rows, "growth": growth}, indent=2) + "\n")


if __name__ == "__main__":
    main()
