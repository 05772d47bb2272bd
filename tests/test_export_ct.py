"""compressed-tensors export, read back by the real library: transformers + compressed-tensors load it
on CPU and compute what lwq computes; refusals name the layers; ragged layers are split losslessly."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import fixture_data, fixture_model, save_tiny
from lwq.calib.data import load_text, tokenize
from lwq.cli import run
from lwq.eval.perplexity import perplexity
from lwq.formats.qlinear import QuantizedLinear
from lwq.models.arch import linear_names
from lwq.models.load import load_tokenizer
from lwq.pipeline.load import load_model
from lwq.pipeline import LoadOptions, quantize_to_checkpoint
from lwq.spec import LayerSpec, make_spec

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install 'lwq[serve]')")
CPU = LoadOptions(device="cpu")


def load_ct(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        model(input_ids=torch.ones(1, 2, dtype=torch.long))  # the library decompresses on the first forward
    return model


def lwq_weights(path):
    model = load_model(str(path), device="cpu")
    return model, {n: m.dequantize().float() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def mixed_sym_plan(model):
    """2/3/4/6/8-bit symmetric, group sizes 32/64/128 and per channel, fused groups sharing a scheme,
    one block linear kept 16-bit."""
    plan = {}
    for name in linear_names(model):
        block = int(name.split(".")[2])
        if name.endswith(("q_proj", "k_proj", "v_proj")):
            plan[name] = make_spec(4, 64, sym=True) if block % 2 == 0 else make_spec(3, 128, sym=True)
        elif name.endswith("o_proj"):
            plan[name] = make_spec(8, -1, sym=True) if block == 1 else make_spec(6, 64, sym=True)  # 6: int6
        elif name.endswith(("gate_proj", "up_proj")):
            plan[name] = make_spec(2, 32, sym=True) if block == 0 else make_spec(4, 128, sym=True)
        else:
            plan[name] = make_spec(16) if block == 7 else make_spec(3, 64, sym=True)
    return plan


@pytest.fixture(scope="module")
def docs8(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs8ct") / "ckpt"
    quantize_to_checkpoint(str(fixture_model("docs8")), str(out), mixed_sym_plan, load=CPU)
    return out


@pytest.mark.slow
def test_docs8_loads_in_transformers_with_lwq_perplexity(docs8, tmp_path, capsys):
    out = tmp_path / "ct"
    assert run(["export", str(docs8), "--format", "compressed-tensors", "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "compressed-tensors" and doc["target"] == "transformers" and doc["requantized"] == []
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    schemes = {(g["weights"]["num_bits"], g["weights"]["group_size"], g["weights"]["strategy"],
                g["weights"]["symmetric"])
               for g in qc["config_groups"].values()}
    # group 128 over 192 inputs is ragged: written as groups of gcd(192, 128) = 64 (lossless)
    assert schemes == {(4, 64, "group", True), (3, 64, "group", True), (8, None, "channel", True),
                       (6, 64, "group", True), (2, 32, "group", True)}
    assert doc["layers"]["model.layers.1.self_attn.q_proj"]["action"] == "copied (groups split to 64)"
    assert "model.layers.7.mlp.down_proj" in qc["ignore"] and "lm_head" in qc["ignore"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert len(targets) == len(set(targets)) == 55  # 56 block linears, one kept 16-bit

    model = load_ct(out)
    lwq_model, weights = lwq_weights(docs8)
    for name, w in weights.items():  # decompressed by the library: lwq's weights up to fp16 rounding
        got = model.get_submodule(name).weight.float()
        assert torch.allclose(got, w, rtol=1e-3, atol=1e-6), name
    text = fixture_data("docs-eval.txt")
    ids = tokenize(load_tokenizer(str(docs8)), load_text(str(text), "eval"))
    ours, theirs = perplexity(lwq_model, ids, 128, max_windows=6), perplexity(model, ids, 128, max_windows=6)
    assert theirs.tokens == ours.tokens
    assert theirs.perplexity == pytest.approx(ours.perplexity, rel=1e-4)
    original = load_model(str(fixture_model("docs8")), device="cpu").model.layers[0].mlp.gate_proj.weight
    assert (model.model.layers[0].mlp.gate_proj.weight - original).abs().max() > 1e-3  # really the 2-bit layer


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "ckpt"
    quantize_to_checkpoint(str(fixture_model("stories260k")), str(out),
                           lambda m: {n: make_spec(3 if "mlp" in n else 4, 32, sym=True) for n in linear_names(m)},
                           load=CPU)
    return out


def test_ragged_layers_are_split_losslessly_or_refused_for_vllm(stories, tmp_path, capsys):
    out = tmp_path / "ct"
    assert run(["export", str(stories), "--format", "compressed-tensors", "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    down = "model.layers.0.mlp.down_proj"  # 172 inputs, group 32: the last group has 12 columns
    assert doc["layers"][down] == {"bits": 3, "group_size": 4, "sym": True, "action": "copied (groups split to 4)",
                                   "reason": None, "source": doc["layers"][down]["source"]}
    assert any("split to gcd" in n for n in doc["notes"]) and doc["requantized"] == []
    model = load_ct(out)
    _, weights = lwq_weights(stories)
    for name, w in weights.items():
        assert torch.allclose(model.get_submodule(name).weight.float(), w, rtol=1e-3, atol=1e-6), name
    capsys.readouterr()  # the library's own progress bars

    assert run(["export", str(stories), "--target", "vllm", "-o", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "group size 32 does not divide 172 inputs" in err and down in err
    assert run(["export", str(stories), "--target", "vllm", "--fix", "-o", str(tmp_path / "v"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "compressed-tensors" and down in doc["requantized"]
    assert doc["layers"][down]["group_size"] == -1  # no Marlin group size divides 172: per channel
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["dtype"] == "float16"
    load_ct(tmp_path / "v")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyct")
    save_tiny(root / "model", "llama")
    save_tiny(root / "gpt2", "gpt2")
    return root


def ckpt(tiny, name, plan_fn, model="model"):
    out = tiny / name
    if not out.exists():
        quantize_to_checkpoint(str(tiny / model), str(out), plan_fn, load=CPU)
    return out


def test_refusals_name_the_layers_and_fix_repairs(tiny, tmp_path, capsys):
    asym = ckpt(tiny, "asym", lambda m: {n: make_spec(4, 32) for n in linear_names(m)})
    assert run(["export", str(asym), "--format", "compressed-tensors", "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "asymmetric (zero points) is not served" in err
    assert "model.layers.0.self_attn.q_proj" in err and not (tmp_path / "a").exists()
    assert run(["export", str(asym), "--format", "compressed-tensors", "--fix", "-o", str(tmp_path / "a"),
                "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(s["symmetric"] for s in doc["schemes"]) and len(doc["requantized"]) == 14
    load_ct(tmp_path / "a")
    capsys.readouterr()

    a8 = ckpt(tiny, "a8", lambda m: {n: make_spec(4, 32, sym=True, act_bits=8) if n.endswith("o_proj")
                                     else make_spec(4, 32, sym=True) for n in linear_names(m)})
    assert run(["export", str(a8), "--format", "compressed-tensors", "-o", str(tmp_path / "b")]) == 2
    assert "w4a8" in capsys.readouterr().err

    fused = ckpt(tiny, "fused", lambda m: {n: make_spec(2 if n.endswith("k_proj") else 4, 32, sym=True)
                                           for n in linear_names(m)})
    assert run(["export", str(fused), "--format", "compressed-tensors", "-o", str(tmp_path / "c")]) == 0
    capsys.readouterr()  # transformers does not fuse
    assert run(["export", str(fused), "--target", "vllm", "-o", str(tmp_path / "d")]) == 2
    assert "vllm fuses q_proj/k_proj/v_proj" in capsys.readouterr().err
    assert run(["export", str(fused), "--target", "vllm", "--fix", "-o", str(tmp_path / "d"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {doc["layers"][f"model.layers.0.self_attn.{p}_proj"]["bits"] for p in "qkv"} == {4}

    gpt2 = ckpt(tiny, "g2", lambda m: {n: make_spec(4, 32, sym=True) for n in linear_names(m)}, "gpt2")
    assert run(["export", str(gpt2), "--format", "compressed-tensors", "-o", str(tmp_path / "e")]) == 2
    assert "Conv1D" in capsys.readouterr().err


def test_target_picks_the_format(tiny, tmp_path, capsys):
    """--target vllm without --format: gptq when every layer is 4/8-bit symmetric, else compressed-tensors."""
    w4 = ckpt(tiny, "w4s", lambda m: {n: make_spec(8 if "mlp" in n else 4, 32, sym=True) for n in linear_names(m)})
    assert run(["export", str(w4), "--target", "vllm", "-o", str(tmp_path / "a"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "gptq"
    w3 = ckpt(tiny, "w3s", lambda m: {n: LayerSpec(bits=3, group_size=32, sym=True) for n in linear_names(m)})
    assert run(["export", str(w3), "--target", "vllm", "-o", str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "compressed-tensors"
    assert run(["export", str(w3), "--target", "gptqmodel", "--format", "compressed-tensors",
                "-o", str(tmp_path / "c")]) == 2
    assert "gptqmodel does not read compressed-tensors" in capsys.readouterr().err
