"""How well each cheap scorer (lim, zd in both orders, hessian) agrees with measured sensitivity:
Spearman rank correlation per model, at block and linear granularity. Prints a table; writes
benchmarks/out/scorers.json.

    python benchmarks/scorers.py [--fixtures ../shared] [--nsamples 8] [--seqlen 256]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

ROOT = Path(__file__).resolve().parent.parent

from lwq.calib.data import calibration_samples  # noqa: E402
from lwq.calib.stats import collect_stats  # noqa: E402
from lwq.models.load import load_tokenizer  # noqa: E402
from lwq.pipeline.load import load_model  # noqa: E402
from lwq.score import SCORERS, ScoreConfig, ScoreInputs  # noqa: E402

CHEAP = (("lim", {}), ("zd-asc", {"zd_order": "ascending"}), ("zd-desc", {"zd_order": "descending"}),
         ("hessian", {}))


def average_ranks(values: list[float]) -> list[float]:
    """Ranks 1..n of ``values`` (ascending), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson correlation of the average ranks."""
    ra, rb = torch.tensor(average_ranks(a), dtype=torch.float64), torch.tensor(average_ranks(b), dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else float("nan")


def random_llama(layers: int = 6, hidden: int = 128, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=352, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def evaluate(name: str, model: torch.nn.Module, samples: torch.Tensor, group_size: int) -> dict:
    stats = collect_stats(model, samples, "cpu")
    inputs = ScoreInputs(model, stats, samples)
    out: dict = {"model": name, "nsamples": int(samples.shape[0]), "seqlen": int(samples.shape[1]), "granularity": {}}
    for gran in ("block", "linear"):
        t0 = time.perf_counter()
        sens = SCORERS.get("sensitivity").fn(inputs, ScoreConfig(granularity=gran, group_size=group_size))
        seconds = {"sensitivity": time.perf_counter() - t0}
        names = list(sens)
        rho = {}
        for label, kw in CHEAP:
            t0 = time.perf_counter()
            s = SCORERS.get(label.split("-")[0]).fn(inputs, ScoreConfig(granularity=gran, group_size=group_size, **kw))
            seconds[label] = time.perf_counter() - t0
            rho[label] = spearman([s[n] for n in names], [sens[n] for n in names])
        out["granularity"][gran] = {"layers": len(names), "spearman": rho, "seconds": seconds}
        print(f"  {name} {gran}: " + ", ".join(f"{k} {v:+.3f}" for k, v in rho.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fixtures", default=str(ROOT.parent / "shared"))
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(2)
    shared = Path(args.fixtures)
    rows = []
    for name, data, gs in (("docs8", "docs-calib.txt", 128), ("stories260k", "tinystories/calib.txt", 64)):
        path = str(shared / "fixtures" / name)
        samples = calibration_samples(load_tokenizer(path), str(shared / "data" / data), args.nsamples, args.seqlen)
        rows.append(evaluate(name, load_model(path, "float32", "cpu"), samples, gs))
    samples = torch.randint(0, 512, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    rows.append(evaluate("random-llama-6x128", random_llama(), samples, 128))
    print("\nSpearman correlation with sensitivity (RTN 2-bit, KL):")
    header = f"{'model':<20}{'granularity':<13}" + "".join(f"{k:>10}" for k, _ in CHEAP)
    print(header)
    for r in rows:
        for gran, g in r["granularity"].items():
            print(f"{r['model']:<20}{gran + ' (' + str(g['layers']) + ')':<13}"
                  + "".join(f"{g['spearman'][k]:>+10.3f}" for k, _ in CHEAP))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scorers.json").write_text(json.dumps({"rows": rows, "nsamples": args.nsamples, "seqlen": args.seqlen},
                                                 indent=1))
    print(f"\nwrote {out / 'scorers.json'}")


if __name__ == "__main__":
    main()
