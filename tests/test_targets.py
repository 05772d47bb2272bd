"""Planning and quantizing under a serving target's rules: only served candidates are offered, fused
shards are tied, and the result exports for that target without --fix."""
from __future__ import annotations

import json

import pytest

from helpers import save_tiny, word_text
from lwq.cli import run
from lwq.formats.targets import TARGETS, check, served_spec
from lwq.spec import LayerSpec, make_spec

SMALL = ["--nsamples", "4", "--seqlen", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    save_tiny(root / "model", "llama")  # down_proj: 160 inputs
    (root / "calib.txt").write_text(word_text(3000))
    return root


def test_rules_follow_the_engines():
    vllm, hf, gm = (TARGETS.get(n) for n in ("vllm", "transformers", "gptqmodel"))
    assert check(vllm.rule("gptq"), make_spec(4, 128, sym=True), 256) == []
    assert check(vllm.rule("gptq"), make_spec(3, 128, sym=True), 256) == ["3-bit is not served (4/8)"]
    assert check(vllm.rule("gptq"), make_spec(4, 128), 256) == ["asymmetric (zero points) is not served"]
    assert check(vllm.rule("gptq"), make_spec(4, 256, sym=True), 512) == ["group size 256 is not served (-1/32/64/128)"]
    assert check(vllm.rule("compressed-tensors"), make_spec(6, 64, sym=True), 192) == []  # int6 -> 6-bit
    assert check(vllm.rule("compressed-tensors"), make_spec(4, 64, sym=True, act_bits=8), 192)  # W4A8: no
    assert check(hf.rule("compressed-tensors"), make_spec(3, 64, sym=True), 160) == \
        ["group size 64 does not divide 160 inputs"]
    assert check(gm.rule("gptq"), make_spec(3, 64), 160) == []  # zero points and ragged groups: fine
    # planning: the spec a target serves at the same width, or none
    assert served_spec(vllm.widest(), make_spec(3, 64), 160) == make_spec(3, 32, sym=True)
    assert served_spec(vllm.widest(), make_spec(3, 256), 512) == make_spec(3, 128, sym=True)
    assert served_spec(gm.widest(), make_spec(6, 64), 160) is None
    assert served_spec(vllm.widest(), LayerSpec(bits=3, group_size=64, act_order=True), 192).act_order is False


def test_plan_for_vllm_offers_only_what_it_serves(tiny, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert run(["plan", str(tiny / "model"), "-o", str(out), "--data", str(tiny / "calib.txt"), "--json", *SMALL,
                "--budget", "3.5bit", "--group-size", "64", "--target", "vllm", "--scorer", "hessian"]) == 0
    doc = json.loads(capsys.readouterr().out)
    layers = doc["layers"]
    assert all(e["sym"] for e in layers.values()) and doc["bits_per_weight"] <= 3.5
    assert len({e["bits"] for e in layers.values()}) >= 2
    assert layers["model.layers.0.mlp.down_proj"]["group_size"] == 32  # 64 does not divide 160
    for b in range(2):
        p = f"model.layers.{b}"
        assert len({(layers[f"{p}.self_attn.{s}_proj"]["bits"], layers[f"{p}.self_attn.{s}_proj"]["group_size"])
                    for s in "qkv"}) == 1
        assert layers[f"{p}.mlp.gate_proj"]["bits"] == layers[f"{p}.mlp.up_proj"]["bits"]
    assert run(["plan", str(tiny / "model"), "-o", str(tmp_path / "g.json"), "--data", str(tiny / "calib.txt"),
                "--json", *SMALL, "--budget", "7bit", "--target", "gptqmodel", "--scorer", "hessian"]) == 0
    assert {e["bits"] for e in json.loads(capsys.readouterr().out)["layers"].values()} <= {2, 3, 4, 8}  # no 6-bit


def test_quantize_for_vllm_exports_without_fix(tiny, tmp_path, capsys):
    ckpt = tmp_path / "q"
    assert run(["quantize", str(tiny / "model"), "-o", str(ckpt), "--data", str(tiny / "calib.txt"), *SMALL,
                "--budget", "3.5bit", "--group-size", "64", "--target", "vllm", "--scorer", "hessian",
                "--refine", "none", "--quiet"]) == 0
    capsys.readouterr()
    assert run(["export", str(ckpt), "--target", "vllm", "-o", str(tmp_path / "v"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["requantized"] == [] and doc["format"] == "compressed-tensors"

    uni = tmp_path / "u"
    assert run(["quantize", str(tiny / "model"), "-o", str(uni), "--bits", "4", "--group-size", "64",
                "--target", "vllm", "--quiet", "--json"]) == 0
    capsys.readouterr()
    assert run(["export", str(uni), "--target", "vllm", "-o", str(tmp_path / "uv"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "gptq" and doc["requantized"] == [] and doc["default"]["sym"] is True

    plan = json.loads((ckpt / "plan.json").read_text())
    plan["layers"]["model.layers.0.self_attn.k_proj"]["bits"] = 2  # breaks the fused q/k/v group
    (tmp_path / "bad.json").write_text(json.dumps(plan))
    assert run(["quantize", str(tiny / "model"), "-o", str(tmp_path / "b"), "--plan", str(tmp_path / "bad.json"),
                "--target", "vllm", "--refine", "none", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vllm fuses q_proj/k_proj/v_proj" in err and not (tmp_path / "b").exists()
    assert run(["quantize", str(tiny / "model"), "-o", str(tmp_path / "b"), "--bits", "4", "--target", "nosuch"]) == 2
    assert "unknown serving target 'nosuch'" in capsys.readouterr().err
