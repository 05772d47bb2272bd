"""GPTQ export: read back by an independent dequantizer (tests/gptq_reference.py), refusals and --fix."""
from __future__ import annotations

import json

import pytest
import torch

from gptq_reference import load_gptq_model, read_gptq
from helpers import fixture_data, fixture_model, save_tiny, word_text
from lwq.calib.data import load_text, tokenize
from lwq.cli import run
from lwq.eval.perplexity import perplexity
from lwq.formats.qlinear import QuantizedLinear
from lwq.models.arch import linear_names
from lwq.models.load import load_tokenizer
from lwq.pipeline.load import load_model
from lwq.pipeline import LoadOptions, evaluate_ppl, quantize_to_checkpoint
from lwq.spec import LayerSpec, make_spec

CPU = LoadOptions(device="cpu")


def docs8_plan(model):
    """Mixed precision over 2/3/4/8 bits and group sizes 32/64/128 (ragged on 192 inputs), one layer kept fp16."""
    plan = {}
    for name in linear_names(model):
        block = int(name.split(".")[2])
        if "proj" in name and any(k in name for k in ("q_proj", "k_proj", "v_proj")):
            plan[name] = make_spec(4, 64) if block % 2 == 0 else make_spec(3, 128)
        elif "o_proj" in name:
            plan[name] = make_spec(8, 64)
        elif "gate_proj" in name or "up_proj" in name:
            plan[name] = make_spec(2, 32) if block == 0 else make_spec(4, 128)
        else:
            plan[name] = make_spec(16) if block == 7 else make_spec(3, 128, sym=block == 3)
    return plan


@pytest.fixture(scope="module")
def docs8(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs8") / "ckpt"
    quantize_to_checkpoint(str(fixture_model("docs8")), str(out), docs8_plan, load=CPU)
    return out


def lwq_weights(path):
    model = load_model(str(path), device="cpu")
    return model, {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.slow
def test_docs8_export_matches_lwq_weights_and_perplexity(docs8, tmp_path, capsys):
    out = tmp_path / "gptq"
    assert run(["export", str(docs8), "--format", "gptq", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requantized"] == [] and summary["kept_16bit"] == ["model.layers.7.mlp.down_proj"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["desc_act"] is False
    assert qc["checkpoint_format"] == qc["format"] == "gptq_v2"  # asymmetric: zeros as they are (GPTQModel reads it)
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (3, 128, False)  # 12 q/k/v + 6 down_proj: the most common
    assert qc["dynamic"]["+:^model\\.layers\\.3\\.mlp\\.down_proj$"] == {"sym": True}
    assert "-:^model\\.layers\\.7\\.mlp\\.down_proj$" in qc["dynamic"]
    assert json.loads((out / "quantize_config.json").read_text()) == qc

    _, state, bits_of = read_gptq(out)
    lwq_model, weights = lwq_weights(docs8)
    plan = docs8_plan(lwq_model)
    for name, w in weights.items():
        assert bits_of[name] == plan[name].bits, name
        assert torch.equal(state[f"{name}.weight"], w.float()), name

    ref = load_gptq_model(out)
    text = fixture_data("docs-eval.txt")
    ids = tokenize(load_tokenizer(str(docs8)), load_text(str(text), "eval"))
    ours = evaluate_ppl(str(docs8), str(text), seqlen=128, max_windows=6, load=CPU)
    theirs = perplexity(ref, ids, 128, max_windows=6)
    assert theirs.tokens == ours.tokens
    assert theirs.perplexity == pytest.approx(ours.perplexity, rel=1e-5)
    original = load_model(str(fixture_model("docs8")), device="cpu").model.layers[0].mlp.gate_proj.weight
    assert (ref.model.layers[0].mlp.gate_proj.weight - original).abs().max() > 1e-3  # really the 2-bit layer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    save_tiny(root / "model", "llama")
    (root / "text.txt").write_text(word_text(3000))
    return root


def tiny_ckpt(tiny, name, plan_fn):
    out = tiny / name
    if not out.exists():
        quantize_to_checkpoint(str(tiny / "model"), str(out), plan_fn, load=CPU)
    return out


def odd_plan(model):
    """q/k/v at 4/2/4 bits (a fused group that differs), an int6 down_proj, a hand-made 6-bit GPTQ o_proj."""
    plan = {}
    for name in linear_names(model):
        if name.endswith("k_proj"):
            plan[name] = make_spec(2, 32)
        elif name.endswith("down_proj"):
            plan[name] = make_spec(6, 32)  # int6 format
        elif name.endswith("layers.1.self_attn.o_proj"):
            plan[name] = LayerSpec(bits=6, group_size=32, format="gptq")
        else:
            plan[name] = make_spec(4, 32)
    return plan


def test_refusals_are_one_line_and_fix_repairs(tiny, tmp_path, capsys):
    ckpt = tiny_ckpt(tiny, "odd", odd_plan)
    assert run(["export", str(ckpt), "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "6-bit is not served (2/3/4/8)" in err and "--fix" in err
    assert "model.layers.0.mlp.down_proj" in err and not (tmp_path / "a").exists()

    assert run(["export", str(ckpt), "-o", str(tmp_path / "g"), "--fix", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted(doc["requantized"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                                          "model.layers.1.self_attn.o_proj"]
    _, state, bits_of = read_gptq(tmp_path / "g")
    _, weights = lwq_weights(ckpt)
    for name, w in weights.items():
        if name in doc["requantized"]:  # 6 -> 8 bit, RTN from the dequantized weight: close
            assert bits_of[name] == 8 and (state[f"{name}.weight"] - w).abs().max() <= 0.01 * w.abs().max(), name
        else:  # copied code for code (asymmetric: gptq_v2 zeros)
            assert torch.equal(state[f"{name}.weight"], w), name

    # vLLM's GPTQ path takes 4/8-bit symmetric only: every layer here needs --fix
    assert run(["export", str(ckpt), "-o", str(tmp_path / "v"), "--target", "vllm", "--format", "gptq"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "asymmetric (zero points) is not served" in err
    assert run(["export", str(ckpt), "-o", str(tmp_path / "v"), "--target", "vllm", "--format", "gptq", "--fix",
                "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["checkpoint_format"] == "gptq" and doc["default"]["sym"] is True
    config, state, bits_of = read_gptq(tmp_path / "v")
    assert config["dtype"] == "float16"
    for i in (0, 1):
        assert {bits_of[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"} == {4}  # k_proj raised to its group
        assert bits_of[f"model.layers.{i}.mlp.down_proj"] == 8
    for name, w in weights.items():  # symmetric RTN of lwq's weights: within half a 4-bit step of them
        step = 2 * w.abs().amax(dim=1, keepdim=True) / 15
        assert bool(((state[f"{name}.weight"] - w).abs() <= 0.5 * step + 1e-3).all()), name
    ref = load_gptq_model(tmp_path / "v")
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    lwq_model = load_model(str(ckpt), device="cpu")
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, lwq_model(input_ids=ids).logits
    assert (a - b).abs().max() < 0.2 * b.abs().max()


def fused_plan(model):
    return {n: make_spec(2 if n.endswith("v_proj") else 4, 32, sym=True) for n in linear_names(model)}


def test_vllm_refuses_mismatched_fused_group_and_unserved_widths(tiny, tmp_path, capsys):
    ckpt = tiny_ckpt(tiny, "fused", fused_plan)
    assert run(["export", str(ckpt), "-o", str(tmp_path / "ok")]) == 0  # GPTQModel does not fuse
    capsys.readouterr()
    assert run(["export", str(ckpt), "-o", str(tmp_path / "v"), "--target", "vllm", "--format", "gptq"]) == 2
    assert "2-bit is not served (4/8)" in capsys.readouterr().err
    assert run(["export", str(ckpt), "-o", str(tmp_path / "v"), "--target", "vllm"]) == 2  # compressed-tensors
    err = capsys.readouterr().err
    assert "vllm fuses q_proj/k_proj/v_proj" in err and "model.layers.0.self_attn" in err and "v_proj w2 g32 sym" in err
    six = tiny_ckpt(tiny, "six", lambda m: {n: LayerSpec(bits=6, group_size=32, sym=True, format="gptq")
                                            for n in linear_names(m)})
    assert run(["export", str(six), "-o", str(tmp_path / "s"), "--target", "vllm", "--format", "gptq"]) == 2
    assert "6-bit is not served (4/8)" in capsys.readouterr().err
    assert run(["export", str(six), "-o", str(tmp_path / "s"), "--target", "vllm", "--format", "gptq", "--fix",
                "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default"]["bits"] == 8


def test_vllm_needs_whole_groups(tiny, tmp_path, capsys):
    ckpt = tiny_ckpt(tiny, "ragged", lambda m: {n: make_spec(4, 64, sym=True) for n in linear_names(m)})  # 160 in
    assert run(["export", str(ckpt), "-o", str(tmp_path / "v"), "--target", "vllm"]) == 2
    assert "group size 64 does not divide 160 inputs" in capsys.readouterr().err
    assert run(["export", str(ckpt), "-o", str(tmp_path / "v"), "--target", "vllm", "--fix", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "gptq" and doc["layers"]["model.layers.0.mlp.down_proj"]["group_size"] == 32
    config, state, _ = read_gptq(tmp_path / "v")
    assert config["dtype"] == "float16"


def test_transformers_gptq_needs_one_scheme(tiny, tmp_path, capsys):
    ckpt = tiny_ckpt(tiny, "fused", fused_plan)  # v_proj 2-bit, the rest 4-bit
    capsys.readouterr()
    assert run(["export", str(ckpt), "--target", "transformers", "--format", "gptq", "-o", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one width and group size for every block linear" in err and "w2 g32 sym" in err
    assert run(["export", str(ckpt), "--target", "transformers", "--format", "gptq", "--fix", "-o",
                str(tmp_path / "t"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dynamic"] == {} and doc["default"]["bits"] == 4
    assert sorted(doc["requantized"]) == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    _, _, bits_of = read_gptq(tmp_path / "t")
    assert set(bits_of.values()) == {4}


def test_output_rule(tiny, tmp_path, capsys):
    """An existing output needs --force, and --force replaces only an earlier export or an empty folder,
    never user files, the checkpoint itself or a folder holding it; non-lwq sources are refused."""
    ckpt = tiny_ckpt(tiny, "fused", fused_plan)
    out = tmp_path / "o"
    out.mkdir()
    assert run(["export", str(ckpt), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert run(["export", str(ckpt), "-o", str(out), "--force"]) == 0  # empty: nothing to lose
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert run(["export", str(ckpt), "-o", str(out), "--force"]) == 0  # an lwq export: replaced
    assert not list(tmp_path.glob(".o.*"))
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert run(["export", str(ckpt), "-o", str(user), "--force"]) == 2
    assert "not an lwq export" in capsys.readouterr().err and (user / "notes.txt").read_text() == "keep me"
    (out / "extra.txt").write_text("added by the user")
    assert run(["export", str(ckpt), "-o", str(out), "--force"]) == 2  # no longer exactly what lwq wrote
    assert (out / "extra.txt").is_file()
    capsys.readouterr()
    for bad in (ckpt, ckpt.parent, ckpt / "sub"):
        assert run(["export", str(ckpt), "-o", str(bad), "--force"]) == 2
        assert "must not be, contain or lie inside the input" in capsys.readouterr().err
    assert (ckpt / "model.safetensors").is_file()
    assert run(["export", str(tiny / "model"), "-o", str(tmp_path / "x")]) == 2
    assert "is not an lwq checkpoint" in capsys.readouterr().err
    assert run(["export", str(ckpt), "-o", str(tmp_path / "x"), "--format", "awq"]) == 2
    assert "unknown export format 'awq'; valid: gptq, compressed-tensors" in capsys.readouterr().err
    assert run(["export", str(ckpt), "-o", str(tmp_path / "x"), "--target", "nosuch"]) == 2
    assert "unknown serving target 'nosuch'; valid: gptqmodel, transformers, vllm" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_refined_symmetric_checkpoint_exports_exactly(tiny, tmp_path):
    """Refined symmetric layers (full-range grid: negative fp16 scales, no stored zeros or g_idx) come
    back from the GPTQ export through the independent dequantizer as the weights lwq computes with."""
    ckpt, out = tmp_path / "q", tmp_path / "g"
    assert run(["quantize", str(tiny / "model"), "--bits", "4", "--group-size", "32", "--sym", "--data",
                str(tiny / "text.txt"), "--nsamples", "8", "--seqlen", "32", "--refine-steps", "20", "-o", str(ckpt),
                "--quiet"]) == 0
    _, ours = lwq_weights(ckpt)
    assert any(bool((m.tensors()["scales"] < 0).any()) for m in load_model(str(ckpt), device="cpu").modules()
               if isinstance(m, QuantizedLinear))
    assert run(["export", str(ckpt), "--format", "gptq", "-o", str(out)]) == 0
    _, state, _ = read_gptq(out)
    for name, w in ours.items():
        assert torch.equal(state[f"{name}.weight"].float(), w), name
