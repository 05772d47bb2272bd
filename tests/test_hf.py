"""``AutoModelForCausalLM.from_pretrained`` of lwq checkpoints after ``import lwq`` (lwq.formats.hf_register,
lwq.formats.hf_quantizer)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import PROJECT, save_tiny
from lwq.formats.qlinear import QuantizedLinear
from lwq.models.arch import linear_names
from lwq.pipeline import LoadOptions, quantize_to_checkpoint
from lwq.spec import make_spec


def mixed(model):
    plan = {}
    for i, name in enumerate(linear_names(model)):
        plan[name] = [make_spec(4, 32), make_spec(3, 64), make_spec(2, 32), make_spec(16), make_spec(6, 32),
                      make_spec(8, -1)][i % 6]
    return plan


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    save_tiny(root / "model", "llama")
    quantize_to_checkpoint(str(root / "model"), str(root / "q"), mixed, load=LoadOptions(device="cpu"))
    return root / "q"


def test_from_pretrained_gives_lwq_load(ckpt):
    import lwq
    from lwq.formats.hf_register import register
    from transformers import AutoModelForCausalLM

    register()
    assert register() is False  # idempotent
    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    ref = lwq.load(str(ckpt), device="cpu")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(layers) == set(linear_names(ref)) and len(layers) == 14
    assert layers["model.layers.0.self_attn.o_proj"].spec.format == "fp16"
    assert layers["model.layers.0.mlp.gate_proj"].spec.format == "int6"
    assert layers["model.layers.0.self_attn.q_proj"].scales.dtype == torch.float16  # kept as stored
    ours, theirs = model.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert model.config.quantization_config.to_dict()["quant_method"] == "lwq"


def test_from_pretrained_refuses_a_modified_shard(ckpt, tmp_path):
    import shutil

    from lwq.errors import BadInput
    from lwq.formats.hf_register import register
    from transformers import AutoModelForCausalLM

    register()
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BadInput, match="sha256"):
        AutoModelForCausalLM.from_pretrained(str(bad))


def test_import_lwq_is_lazy_and_registers_on_first_use(ckpt):
    """In a fresh interpreter: ``import lwq`` does not import transformers' quantizers, yet a later
    ``from_pretrained`` finds lwq's quantizer."""
    code = f"""
import sys, json
import lwq
lazy = "transformers.quantizers.auto" not in sys.modules and "torch" not in sys.modules
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r})
print(json.dumps({{"lazy": lazy, "cls": type(m.model.layers[1].mlp.down_proj).__name__,
                  "hooks": sum(type(f).__name__ == "_RegisterOnImport" for f in sys.meta_path)}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc == {"lazy": True, "cls": "QuantizedLinear", "hooks": 0}
