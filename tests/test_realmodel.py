"""The SmolLM2-135M fixture (30 blocks, bf16, tied embeddings; built from the package registry on first
use, skipped with the reason when it cannot be): the published reference, and checkpoints of a real
tied bf16 model that keep bf16, store the embedding once and load through ``from_pretrained`` with
``lwq eval``'s perplexity."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from helpers import SMOLLM2_SHA256, fixture_data
from lwq.cli import run

pytestmark = pytest.mark.realmodel
QUICK = ["--device", "cpu", "--quiet"]


def evaluate(capsys, model, *extra: str) -> dict:
    capsys.readouterr()
    assert run(["eval", str(model), "--data", str(fixture_data("wikitext-2/test.txt")), "--seqlen", "512",
                *extra, "--json", *QUICK]) == 0
    return json.loads(capsys.readouterr().out)


def test_fixture_is_the_published_model(smollm2, smollm2_4blocks):
    h = hashlib.sha256()
    with open(smollm2 / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    assert h.hexdigest() == SMOLLM2_SHA256
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["tie_word_embeddings"]) == (30, 576, True)
    assert json.loads((smollm2_4blocks / "config.json").read_text())["num_hidden_layers"] == 4
    with safe_open(str(smollm2_4blocks / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.3.mlp.up_proj.weight" in keys and not any(k.startswith("model.layers.4.") for k in keys)


@pytest.mark.slow
def test_reference_perplexity(smollm2, capsys):
    """The figure every real-scale result is relative to (shared/README.md): 34.433."""
    got = evaluate(capsys, smollm2, "--max-samples", "40")
    assert got["windows"] == 40 and abs(got["perplexity"] - 34.433) < 0.002, got


@pytest.mark.slow
def test_checkpoint_keeps_bf16_stores_the_tied_embedding_once_and_loads_through_transformers(
        smollm2, tmp_path, capsys):
    import lwq  # noqa: F401  (registers the quantizer with transformers)
    from lwq.pipeline.common import evaluate_ppl
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "w4"
    assert run(["quantize", str(smollm2), "--bits", "4", "--group-size", "128", "--backend", "rtn",
                "--refine", "none", "-o", str(ckpt), *QUICK]) == 0
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert "lm_head.weight" not in dtypes
    assert {d for k, d in dtypes.items() if k.endswith("norm.weight") or "embed" in k} == {"BF16"}
    size = (ckpt / "model.safetensors").stat().st_size
    assert size < 115e6, size  # the embedding in bf16: 112 MB (168.8 MB when it was stored in fp32)

    ours = evaluate(capsys, ckpt, "--max-samples", "10")["perplexity"]
    data = str(fixture_data("wikitext-2/test.txt"))
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt))  # bf16, as config.json says
    assert hf.dtype == torch.bfloat16 and hf.lm_head.weight is hf.model.embed_tokens.weight
    theirs = evaluate_ppl(str(ckpt), data, 512, max_windows=10, model=hf).perplexity
    assert abs(theirs / ours - 1) < 0.005, (ours, theirs)
    hf32 = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)  # lwq eval's arithmetic
    assert abs(evaluate_ppl(str(ckpt), data, 512, max_windows=10, model=hf32).perplexity / ours - 1) < 1e-5


def test_budget_plan_on_the_first_four_blocks_lands_and_loads(smollm2_4blocks, tmp_path, capsys):
    from lwq.formats.hf_register import register
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "b325"
    assert run(["quantize", str(smollm2_4blocks), "--budget", "3.25bit", "--scorer", "linearity", "--refine", "none",
                "--data", str(fixture_data("wikitext-2/valid.txt")), "--nsamples", "8", "--seqlen", "256",
                "-o", str(ckpt), *QUICK]) == 0
    summary = json.loads((ckpt / "lwq_manifest.json").read_text())["summary"]
    assert summary["bits_per_weight"] <= 3.25 and summary["bits"] == "mixed", summary
    register()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
