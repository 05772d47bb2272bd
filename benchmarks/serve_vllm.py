"""Serve lwq's exports with vLLM on a GPU and check them against ``lwq eval`` on the same GPU.

Installs nothing: run it where vLLM is installed (``pip install vllm`` on the device machine). For
each ``--pair CKPT=EXPORT`` (an lwq checkpoint and an ``lwq export`` of it, GPTQ or
compressed-tensors; repeatable), it

1. loads the export with ``vllm.LLM`` (fp16) and reads its quantization method back from vLLM;
2. scores the evaluation text through vLLM's ``prompt_logprobs`` (disjoint windows of ``--seqlen``
   tokens; perplexity over every predicted token), and lwq's checkpoint on the GPU the same way;
3. generates ``--new-tokens`` greedy tokens for a few prompts with both and reports the share of
   identical tokens (fp16 kernels may flip near-ties late in a sequence, so a prefix match is shown).

Prints a table and writes ``benchmarks/out/serve_vllm.json``. Without CUDA or vLLM it says why and
exits 2 (nothing is run)::

    python benchmarks/serve_vllm.py --pair out/ckpt=out/ckpt-ct --pair out/ckpt=out/ckpt-gptq
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("The quantization of large language models", "def main():\n    ", "In this section we describe")


def windows(tokenizer, path: str, seqlen: int, limit: int) -> list[list[int]]:
    ids = tokenizer(Path(path).read_text(encoding="utf-8"))["input_ids"]
    n = min(len(ids) // seqlen, limit)
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)]


def vllm_scores(llm, wins: list[list[int]], prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    from vllm import SamplingParams, TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in wins],
                        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))
    nll, count = 0.0, 0
    for w, o in zip(wins, outs):
        for tok, lp in zip(w[1:], o.prompt_logprobs[1:]):
            nll -= lp[tok].logprob
            count += 1
    gen = llm.generate(list(prompts), SamplingParams(max_tokens=new_tokens, temperature=0.0))
    return math.exp(nll / count), [list(g.outputs[0].token_ids) for g in gen]


def lwq_scores(ckpt: str, tokenizer, wins: list[list[int]], prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    import torch

    import lwq

    model = lwq.load(ckpt, device="cuda", dtype="float16").eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            x = torch.tensor([w], device="cuda")
            logits = model(input_ids=x).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
            count += len(w) - 1
        gens = []
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt")["input_ids"].cuda()
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            gens.append(out[0, ids.shape[1]:].tolist())
    del model
    torch.cuda.empty_cache()
    return math.exp(nll / count), gens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", action="append", required=True, help="CKPT=EXPORT (repeatable)")
    p.add_argument("--eval", default=str(ROOT.parent / "shared" / "data" / "docs-eval.txt"))
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "serve_vllm.json"))
    a = p.parse_args()
    try:
        import torch
        import vllm
    except ImportError as e:
        _refuse(f"serve_vllm: needs vLLM on a CUDA machine ({e}); pip install vllm there")
    if not torch.cuda.is_available():
        _refuse("serve_vllm: no CUDA device here; run it on a GPU machine")
    from transformers import AutoTokenizer

    rows = []
    for pair in a.pair:
        ckpt, _, export = pair.partition("=")
        tok = AutoTokenizer.from_pretrained(export)
        wins = windows(tok, a.eval, a.seqlen, a.max_windows)
        ours, our_gen = lwq_scores(ckpt, tok, wins, PROMPTS, a.new_tokens)
        llm = vllm.LLM(model=export, dtype="float16", max_model_len=max(a.seqlen, 512), gpu_memory_utilization=0.3,
                       enforce_eager=True)
        method = llm.llm_engine.model_config.quantization
        theirs, gen = vllm_scores(llm, wins, PROMPTS, a.new_tokens)
        same = sum(x == y for g, h in zip(gen, our_gen) for x, y in zip(g, h)) / max(1, sum(map(len, our_gen)))
        prefix = min(next((i for i, (x, y) in enumerate(zip(g, h)) if x != y), len(h)) for g, h in zip(gen, our_gen))
        rows.append({"checkpoint": ckpt, "export": export, "vllm_quantization": method, "vllm_ppl": theirs,
                     "lwq_ppl": ours, "rel": theirs / ours - 1, "greedy_same": same, "greedy_prefix": prefix,
                     "vllm": vllm.__version__})
        print(json.dumps(rows[-1]), flush=True)
        del llm
    print("\n| export | vLLM method | vLLM ppl | lwq ppl | diff | greedy same | prefix |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['export']} | {r['vllm_quantization']} | {r['vllm_ppl']:.3f} | {r['lwq_ppl']:.3f} | "
              f"{100 * r['rel']:+.2f}% | {100 * r['greedy_same']:.0f}% | {r['greedy_prefix']} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))


def _refuse(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
