"""lm-eval bridge (with a fake ``lm_eval`` module), the missing-extra message, and ``lwq eval --compare``."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from helpers import save_tiny, word_text
from lwq.cli import run
from lwq.eval.harness import compare_docs, parse_tasks, task_metrics
from lwq.formats.qlinear import QuantizedLinear
from lwq.models.arch import linear_names
from lwq.pipeline import LoadOptions, quantize_to_checkpoint
from lwq.spec import make_spec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    save_tiny(root / "model", "llama")
    (root / "text.txt").write_text(word_text(2000))
    quantize_to_checkpoint(str(root / "model"), str(root / "q"),
                           lambda m: {n: make_spec(2, 32) for n in linear_names(m)},
                           load=LoadOptions(device="cpu"))
    return root


def test_task_metrics_and_compare_docs():
    res = {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6,
                        "exact_match,strict-match": 0.25}}
    assert task_metrics(res) == {"arc_easy": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.6,
                                              "exact_match,strict-match": 0.25}}
    assert parse_tasks(" hellaswag, arc_easy,,hellaswag") == ["hellaswag", "arc_easy"]
    a = {"model": "A", "perplexity": 10.0, "nll": 2.0, "tasks": {"t": {"acc": 0.5}}}
    b = {"model": "B", "perplexity": 12.0, "nll": 2.2, "tasks": {"t": {"acc": 0.4}}}
    d = compare_docs(a, b)["delta"]
    assert d["perplexity"] == pytest.approx(2.0) and d["perplexity_relative"] == pytest.approx(0.2)
    assert d["tasks"]["t"]["acc"] == pytest.approx(-0.1)


def test_missing_lm_eval_is_one_line(tiny, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert run(["eval", str(tiny / "q"), "--tasks", "hellaswag"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lwq[lm-eval]'" in err


@pytest.fixture
def fake_lm_eval(monkeypatch):
    """A stand-in for lm-eval: ``HFLM`` keeps what it is given, ``simple_evaluate`` scores each task
    from the wrapped model's logits (so two different models give different numbers)."""
    calls = []

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            self.model, self.tokenizer, self.batch_size = pretrained, tokenizer, batch_size

    def simple_evaluate(model, tasks, num_fewshot, limit):
        calls.append({"model": model, "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit})
        ids = torch.tensor([model.tokenizer("w1 w2 w3 w4")["input_ids"]])
        with torch.no_grad():
            p = torch.softmax(model.model(input_ids=ids).logits[0, :-1], -1)
        acc = float(p.gather(1, ids[0, 1:, None]).mean())
        return {"results": {t: {"alias": t, "acc,none": acc + i, "acc_stderr,none": 0.01} for i, t in enumerate(tasks)}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    return calls


def test_tasks_through_the_harness_bridge(tiny, fake_lm_eval, capsys):
    assert run(["eval", str(tiny / "q"), "--tasks", "hellaswag,arc_easy", "--limit", "5", "--device", "cpu",
                "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["tasks"]) == {"hellaswag", "arc_easy"} and "perplexity" not in doc
    call = fake_lm_eval[0]
    assert call["tasks"] == ["hellaswag", "arc_easy"] and call["limit"] == 5 and call["num_fewshot"] == 0
    assert isinstance(call["model"].model.model.layers[0].mlp.down_proj, QuantizedLinear)  # our checkpoint, as loaded
    assert doc["tasks"]["arc_easy"]["acc"] == pytest.approx(doc["tasks"]["hellaswag"]["acc"] + 1)
    # with --data, perplexity is measured too, on the same loaded model
    assert run(["eval", str(tiny / "q"), "--tasks", "hellaswag", "--data", str(tiny / "text.txt"), "--seqlen", "32",
                "--max-samples", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["perplexity"] > 1 and "hellaswag" in doc["tasks"] and doc["passed"] is True


def test_compare_side_by_side(tiny, fake_lm_eval, capsys):
    data = ["--data", str(tiny / "text.txt"), "--seqlen", "32", "--max-samples", "4"]
    singles = []
    for m in ("model", "q"):
        assert run(["eval", str(tiny / m), *data, "--json"]) == 0
        singles.append(json.loads(capsys.readouterr().out)["perplexity"])
    assert run(["eval", "--compare", str(tiny / "model"), str(tiny / "q"), *data, "--tasks", "arc_easy", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [doc["a"]["perplexity"], doc["b"]["perplexity"]] == singles
    assert doc["delta"]["perplexity"] == pytest.approx(singles[1] - singles[0])
    assert doc["delta"]["tasks"]["arc_easy"]["acc"] == pytest.approx(doc["b"]["tasks"]["arc_easy"]["acc"] -
                                                                     doc["a"]["tasks"]["arc_easy"]["acc"])
    assert doc["delta"]["tasks"]["arc_easy"]["acc"] != 0
    assert run(["eval", "--compare", str(tiny / "model"), str(tiny / "q"), *data]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "B - A" in out and "%" in out
    assert run(["eval", str(tiny / "q"), "--compare", "a", "b"]) == 2
    assert "not both" in capsys.readouterr().err
