"""Format version 2: no bytes for what is implied (g_idx without act-order, zero points of symmetric
layers); version 1 checkpoints (which stored both) still load; GPTQ export writes them back."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import rtn_quantized, save_tiny, word_text
from lwq.backends.quant import group_index
from lwq.formats.layouts import get_layout
from lwq.kernels.pack import pack
from lwq.formats.qlinear import QuantizedLinear
from lwq.spec import make_spec


@pytest.mark.parametrize("spec", [make_spec(3, 64), make_spec(4, 32, sym=True), make_spec(2, -1, sym=True),
                                  make_spec(4, 64, backend="gptq", act_order=True), make_spec(8, 128)])
def test_gptq_layout_stores_only_what_is_not_implied(spec):
    W = torch.randn(48, 172)
    qw = rtn_quantized(W, spec, seed=1)
    t = get_layout("gptq").pack(qw)
    assert ("g_idx" in t) == spec.act_order
    assert ("qzeros" in t) == (not spec.sym)
    assert sum(x.numel() * x.element_size() for x in t.values()) == get_layout("gptq").cost(48, 172, spec)
    empty = QuantizedLinear.empty(spec, 48, 172).tensors()
    assert {k: (v.shape, v.dtype) for k, v in empty.items()} == {k: (v.shape, v.dtype) for k, v in t.items()}
    g = qw.g_idx.long()
    want = qw.scale.half().float()[:, g] * (qw.q.float() - qw.zero[:, g].float())
    assert torch.equal(get_layout("gptq").dequantize(t, spec, (48, 172)), want)


def _to_v1(ckpt):
    """Rewrite a version 2 checkpoint as version 1 wrote it: g_idx and qzeros for every gptq layer."""
    config = json.loads((ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    qc["format_version"] = 1
    shard = ckpt / "model.safetensors"
    tensors = load_file(str(shard))
    for name, spec in qc["layers"].items():
        if spec["format"] != "gptq":
            continue
        out_f = tensors[f"{name}.scales"].shape[1]
        in_f = int(config["intermediate_size"] if name.endswith("down_proj") else config["hidden_size"])
        tensors.setdefault(f"{name}.g_idx", group_index(in_f, spec["group_size"]))
        if spec["sym"]:
            g = tensors[f"{name}.scales"].shape[0]
            z = torch.full((out_f, g), 1 << (spec["bits"] - 1), dtype=torch.int32)
            tensors[f"{name}.qzeros"] = pack(z.t().contiguous(), spec["bits"], dim=1).contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    manifest = json.loads((ckpt / "lwq_manifest.json").read_text())
    data = shard.read_bytes()
    manifest["files"]["model.safetensors"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest.pop("others")  # older manifests covered the shards only
    (ckpt / "lwq_manifest.json").write_text(json.dumps(manifest))
    return tensors


@pytest.mark.parametrize("sym", [False, True])
def test_version_1_checkpoints_still_load(tmp_path, sym):
    import lwq
    from lwq.cli import run

    model = save_tiny(tmp_path / "m")
    out = tmp_path / "q"
    argv = ["quantize", str(model), "--bits", "4", "--group-size", "32", "-o", str(out), "--quiet"]
    assert run(argv + (["--sym"] if sym else [])) == 0
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v2 = lwq.load(str(out), device="cpu")(ids).logits
    stored = set(load_file(str(out / "model.safetensors")))
    assert not any(k.endswith(".g_idx") for k in stored)
    assert any(k.endswith(".qzeros") for k in stored) == (not sym)
    v1_tensors = _to_v1(out)
    assert any(k.endswith(".g_idx") for k in v1_tensors)
    with torch.no_grad():
        v1 = lwq.load(str(out), device="cpu")(ids).logits
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(out))(ids).logits
    assert torch.equal(v1, v2)
    assert torch.allclose(hf, v2, atol=1e-5)


def test_gptq_export_writes_the_implied_tensors(tmp_path):
    from lwq.cli import run

    model = save_tiny(tmp_path / "m")
    (tmp_path / "c.txt").write_text(word_text(2000))
    out, exp = tmp_path / "q", tmp_path / "e"
    for argv in (["quantize", str(model), "--bits", "4", "--group-size", "32", "--sym", "-o", str(out), "--quiet"],
                 ["export", str(out), "--format", "gptq", "-o", str(exp)]):
        assert run(argv) == 0
    tensors = load_file(str(next(exp.glob("*.safetensors"))))
    name = "model.layers.0.mlp.down_proj"
    assert f"{name}.g_idx" in tensors and f"{name}.qzeros" in tensors
    assert torch.equal(tensors[f"{name}.g_idx"], group_index(tensors[f"{name}.g_idx"].numel(), 32))
