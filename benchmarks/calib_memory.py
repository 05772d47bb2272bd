"""Peak resident memory of calibration (``lwq.pipeline.calibrate_to_dir``, what ``lwq calibrate``
runs) on random Llama models of 4 and 12 blocks of the same
width (hidden 1024, MLP 2816: the block weights dominate), lazy (default: one block in memory at a
time, Hessians written per block) and eager (``lwq calibrate --no-lazy``: the whole model in memory). Each run is
one fresh subprocess; its peak RSS comes from ``getrusage(RUSAGE_CHILDREN)`` in a fresh wrapper.
Prints a table; writes benchmarks/out/calib_memory.json.

    python benchmarks/calib_memory.py [--nsamples 8] [--seqlen 256]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTERMEDIATE, VOCAB = 1024, 2816, 1024

CALIBRATE = ("import sys; from lwq.pipeline import LoadOptions, calibrate_to_dir; a = sys.argv; "
             "calibrate_to_dir(a[1], a[2], a[3], int(a[4]), int(a[5]), load=LoadOptions(device='cpu'), "
             "lazy=a[6] == 'lazy')")
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def build(folder: Path, layers: int) -> int:
    """Save a random Llama with ``layers`` blocks and a word-level tokenizer; returns its parameter count."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(folder), safe_serialization=True)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        str(folder))
    return sum(p.numel() for p in model.parameters())


def peak_rss_mib(argv: list[str]) -> float:
    """Peak RSS (MiB) of the command ``argv`` run as the only child of a fresh wrapper process."""
    res = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(argv)}\n{res.stderr[-2000:]}")
    return int(res.stdout.strip().splitlines()[-1]) / 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = root / "text.txt"
        text.write_text(" ".join(f"w{(i * 7919) % (VOCAB - 3)}" for i in range(20000)))
        baseline = peak_rss_mib([sys.executable, "-c", "import lwq.pipeline, transformers, torch"])
        for layers in (4, 12):
            folder = root / f"llama{layers}"
            params = build(folder, layers)
            weights_mib = params * 4 / 2**20
            for mode in ("lazy", "eager"):
                out = root / f"calib-{layers}-{mode}"
                rss = peak_rss_mib([sys.executable, "-c", CALIBRATE, str(folder), str(text), str(out),
                                    str(args.nsamples), str(args.seqlen), mode])
                stats_mib = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
                rows.append({"blocks": layers, "mode": mode, "params": params, "weights_mib": weights_mib,
                             "calib_tensors_mib": stats_mib, "peak_rss_mib": rss})
                print(f"{layers:>2} blocks {mode:<5}: peak RSS {rss:8.1f} MiB (weights {weights_mib:.0f} MiB, "
                      f"saved statistics {stats_mib:.0f} MiB)", flush=True)
    by = {(r["blocks"], r["mode"]): r["peak_rss_mib"] for r in rows}
    ratios = {mode: by[(12, mode)] / by[(4, mode)] for mode in ("lazy", "eager")}
    print(f"\nprocess baseline (importing lwq.pipeline, torch, transformers): {baseline:.1f} MiB")
    print(f"{'mode':<8}{'4 blocks':>12}{'12 blocks':>12}{'ratio':>8}")
    for mode in ("lazy", "eager"):
        print(f"{mode:<8}{by[(4, mode)]:>10.1f}Mi{by[(12, mode)]:>10.1f}Mi{ratios[mode]:>8.2f}")
    print(f"lazy 12/4 ratio {ratios['lazy']:.2f} ({'within' if ratios['lazy'] <= 1.3 else 'ABOVE'} the 1.3x target)")
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "calib_memory.json").write_text(json.dumps(
        {"rows": rows, "ratios": ratios, "baseline_rss_mib": baseline, "nsamples": args.nsamples,
         "seqlen": args.seqlen, "hidden": HIDDEN, "intermediate": INTERMEDIATE}, indent=1))
    print(f"wrote {out_dir / 'calib_memory.json'}")


if __name__ == "__main__":
    main()
