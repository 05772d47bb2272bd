"""``lwq quantize`` end to end on a tiny model: JSON summary, real bits per weight, errors, eval of the output."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import save_tiny, word_text
from lwq.cli import run
from lwq.formats.bytes import layer_bytes
from lwq.spec import make_spec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root / "model", "llama")
    (root / "calib.txt").write_text(word_text(3000))
    return root


def quantize(tiny, out, *extra):
    return run(["quantize", str(tiny / "model"), "-o", str(out), "--device", "cpu", "--json", *extra])


def test_gptq_json_summary_and_eval_of_the_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    code = quantize(tiny, out, "--bits", "3", "--group-size", "32", "--backend", "gptq", "--act-order",
                    "--data", str(tiny / "calib.txt"), "--nsamples", "8", "--seqlen", "32")
    assert code == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    spec = make_spec(3, 32, backend="gptq", act_order=True)
    # tiny llama: hidden 64, intermediate 160, 4 heads, 2 kv heads (head dim 16)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (160, 64), (160, 64), (64, 160)] * 2
    expect = 8 * sum(layer_bytes(o, i, spec) for o, i in shapes) / sum(o * i for o, i in shapes)
    assert doc["bits_per_weight"] == pytest.approx(expect)
    assert doc["output"] == str(out.resolve()) and doc["backend"] == "gptq" and doc["bits"] == 3
    assert doc["group_size"] == 32 and doc["num_layers"] == 14 and doc["seconds"] > 0
    assert doc["calibration"]["nsamples"] == 8
    assert run(["eval", str(out), "--data", str(tiny / "calib.txt"), "--seqlen", "32", "--device", "cpu",
                "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert 1 < ppl < 10_000


def test_existing_output_needs_force(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert quantize(tiny, out, "--bits", "4", "--group-size", "64") == 0
    capsys.readouterr()
    assert quantize(tiny, out, "--bits", "4", "--group-size", "64") == 2
    assert "already exists" in capsys.readouterr().err
    assert quantize(tiny, out, "--bits", "2", "--group-size", "64", "--force") == 0
    assert json.loads(capsys.readouterr().out)["bits"] == 2
    assert json.loads((out / "config.json").read_text())["quantization_config"]["default"]["bits"] == 2


@pytest.mark.parametrize("args,message", [
    (["--bits", "3", "--backend", "bnb-nf4"], "--bits 4"),
    (["--bits", "4", "--act-order"], "gptq backend only"),
    (["--bits", "4", "--backend", "awq"], "unknown backend 'awq'"),
    (["--bits", "5"], "bits must be one of"),
    (["--bits", "4", "--group-size", "100"], "group size must be one of"),
])
def test_bad_options_are_one_line_errors(tiny, tmp_path, capsys, args, message):
    assert quantize(tiny, tmp_path / "q", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists()


def test_gptq_without_data_calibrates_on_self_generated_text(tiny, tmp_path, capsys):
    out = tmp_path / "self"
    assert quantize(tiny, out, "--bits", "4", "--backend", "gptq", "--nsamples", "4", "--seqlen", "32") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["calibration"]["data"] == "self" and summary["calibration"]["nsamples"] == 4
    assert (out / "model.safetensors").is_file()


def test_self_generated_samples_are_seeded_model_text():
    from helpers import tiny_model
    from lwq.calib.data import self_generated_samples

    model = tiny_model("llama")
    a = self_generated_samples(model, 3, 16, seed=1)
    assert a.shape == (3, 16) and a.dtype.is_floating_point is False
    assert torch.equal(a, self_generated_samples(model, 3, 16, seed=1))
    assert not torch.equal(a, self_generated_samples(model, 3, 16, seed=2))
    assert int(a.min()) >= 0 and int(a.max()) < 128


def test_budget_without_data_samples_the_model_once(tiny, tmp_path, capsys, monkeypatch):
    import lwq.calib.data as data_mod

    calls = []
    real = data_mod.self_generated_samples

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(data_mod, "self_generated_samples", counting)
    out = tmp_path / "budget-self"
    assert quantize(tiny, out, "--budget", "4.5bit", "--backend", "gptq", "--candidate-bits", "3,4,8",
                    "--nsamples", "4", "--seqlen", "32") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bits_per_weight"] <= 4.5 and summary["calibration"]["data"] == "self"
    assert len(calls) == 1  # planning and GPTQ share the sampled windows


def test_the_command_makes_cublas_deterministic_unless_told_otherwise(monkeypatch, capsys):
    import os

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert run(["--help"]) == 0
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert run(["--help"]) == 0
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    capsys.readouterr()
