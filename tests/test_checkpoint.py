"""Checkpoint round trips per backend, sharding, tied weights, integrity checks, atomic replacement."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import save_tiny, tiny_model, word_text
from lwq.backends import bnb_status
from lwq.errors import BadInput
from lwq.formats.checkpoint import MANIFEST, load_checkpoint, save_checkpoint
from lwq.formats.folder import sha256_file
from lwq.formats.qlinear import QuantizedLinear
from lwq.models.arch import linear_names
from lwq.pipeline import LoadOptions, quantize_to_checkpoint
from lwq.pipeline.blockwise import quantize_model
from lwq.spec import make_spec

CPU = LoadOptions(device="cpu")
BACKENDS = [("rtn", 4, 32), ("rtn-mse", 3, 64), ("gptq", 3, 32), ("bnb-nf4", 4, 64), ("bnb-fp4", 4, 64),
            ("bnb-int8", 8, -1)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    save_tiny(root / "model", "llama")
    (root / "calib.txt").write_text(word_text(3000))
    return root


def logits(model, seed=0):
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("backend,bits,group", BACKENDS, ids=[b[0] for b in BACKENDS])
def test_round_trip_per_backend(tiny, tmp_path, backend, bits, group):
    if backend.startswith("bnb") and bnb_status() is not None:
        pytest.skip(f"bitsandbytes unusable: {bnb_status()}")
    spec = make_spec(bits, group, backend=backend)
    out = tmp_path / "q"
    res = quantize_to_checkpoint(str(tiny / "model"), str(out), lambda m: {n: spec for n in linear_names(m)},
                                 data=str(tiny / "calib.txt"), nsamples=8, seqlen=32, load=CPU)
    loaded = load_checkpoint(out, device="cpu")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantizedLinear)
    assert torch.allclose(logits(loaded), logits(res.model), atol=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "lwq" and qc["format_version"] == 2 and qc["default"] == spec.to_dict()
    assert set(qc["layers"]) == set(linear_names(res.model)) and len(qc["layers"]) == 14
    assert (out / "tokenizer.json").is_file()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_file(out / "model.safetensors")
    assert res.summary["bits_per_weight"] > bits


def test_sharded_tied_gpt2_round_trip(tmp_path):
    model = tiny_model("gpt2")
    plan = {n: make_spec(4, 32) for n in linear_names(model)}
    quantize_model(model, plan, None, "cpu")
    out = save_checkpoint(model, tmp_path / "q", plan, "tiny-gpt2", {}, max_shard_bytes=20_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    loaded = load_checkpoint(out, device="cpu")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)


@pytest.fixture()
def saved(tmp_path):
    model = tiny_model("llama", layers=1)
    plan = {n: make_spec(4, 32) for n in linear_names(model)}
    quantize_model(model, plan, None, "cpu")
    return save_checkpoint(model, tmp_path / "q", plan, "tiny", {}), model, plan


def test_truncated_shard_refused(saved):
    out = saved[0]
    shard = out / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(BadInput, match="model.safetensors.*truncated"):
        load_checkpoint(out, device="cpu")


def test_modified_shard_refused(saved):
    out = saved[0]
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="model.safetensors.*sha256"):
        load_checkpoint(out, device="cpu")


def test_manifest_mismatch_and_missing_refused(saved):
    out = saved[0]
    m = json.loads((out / MANIFEST).read_text())
    m["files"]["model-2.safetensors"] = {"sha256": "0" * 64, "size": 1}
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BadInput, match="model-2.safetensors is missing"):
        load_checkpoint(out, device="cpu")
    (out / MANIFEST).unlink()
    with pytest.raises(BadInput, match="lwq_manifest.json"):
        load_checkpoint(out, device="cpu")


def test_missing_and_unexpected_tensors_refused(saved):
    out = saved[0]
    shard = out / "model.safetensors"
    tensors = load_file(str(shard))

    def rewrite(ts):
        save_file(ts, str(shard), metadata={"format": "pt"})
        m = json.loads((out / MANIFEST).read_text())
        m["files"]["model.safetensors"] = {"sha256": sha256_file(shard), "size": shard.stat().st_size}
        (out / MANIFEST).write_text(json.dumps(m))

    rewrite({k: v for k, v in tensors.items() if not k.endswith("o_proj.scales")})
    with pytest.raises(BadInput, match="lacks 1 tensor.*o_proj.scales"):
        load_checkpoint(out, device="cpu")
    rewrite({**tensors, "model.layers.0.extra": torch.zeros(2)})
    with pytest.raises(BadInput, match="does not have.*model.layers.0.extra"):
        load_checkpoint(out, device="cpu")


def test_existing_output_refused_without_force_and_replaced_with_it(saved):
    out, model, plan = saved
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(BadInput, match="already exists.*--force"):
        save_checkpoint(model, out, plan, "tiny", {})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "notes.txt").write_text("the user's")  # no longer exactly what lwq wrote: never deleted
    with pytest.raises(BadInput, match="not an lwq checkpoint folder"):
        save_checkpoint(model, out, plan, "tiny", {"note": 1}, force=True)
    assert (out / "notes.txt").read_text() == "the user's"
    (out / "notes.txt").unlink()
    (out / "lwq_eval.json").write_text("{}")  # what lwq itself adds beside a checkpoint: replaceable
    save_checkpoint(model, out, plan, "tiny", {"note": 1}, force=True)
    assert not (out / "lwq_eval.json").exists()
    assert json.loads((out / MANIFEST).read_text())["note"] == 1
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp folders left
    load_checkpoint(out, device="cpu")


def test_bad_format_version_refused(saved):
    out = saved[0]
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="format_version 99"):
        load_checkpoint(out, device="cpu")
