"""Model loading, the architecture table and block-by-block execution, per architecture."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY_ARCHS, fixture_model, save_tiny, tiny_model
from lwq.errors import BadInput, LwqError
from lwq.models.arch import ARCH_TABLE, arch_for, get_blocks, linear_names, linear_shape
from lwq.models.blocks import capture_block_inputs, head_logits, run_block
from lwq.models.load import load_tokenizer, looks_local, resolve_dtype
from lwq.pipeline.load import load_model


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_save_and_reload_offline(arch: str, tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / arch, arch)
    model = load_model(str(folder), "float32", "cpu")
    assert load_tokenizer(str(folder)) is not None
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    ref = tiny_model(arch)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_table_row_used_and_linears_found(arch: str) -> None:
    model = tiny_model(arch, layers=3)
    spec = arch_for(model)
    assert spec.name == arch and spec is ARCH_TABLE[arch]
    names = linear_names(model)
    assert len(names) == 3 * len(spec.linears)
    for n in names:
        out_f, in_f = linear_shape(model.get_submodule(n))
        assert out_f > 0 and in_f > 0


def test_generic_fallback_finds_blocks_and_linears() -> None:
    model = tiny_model("llama", layers=2)
    model.config.model_type = "somethingnew"
    spec = arch_for(model)
    assert spec.name.startswith("generic") and spec.blocks == "model.layers"
    assert set(spec.linears) == set(ARCH_TABLE["llama"].linears)
    assert spec.norm == "model.norm"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_block_by_block_equals_full_forward(arch: str) -> None:
    model = tiny_model(arch, layers=3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        inputs = capture_block_inputs(model, [ids[:1], ids[1:]])
        outs = []
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            for block in get_blocks(model):
                hidden = run_block(block, hidden, kwargs)
            outs.append(head_logits(model, hidden))
    assert torch.allclose(torch.cat(outs), want, atol=1e-4)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such model path"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(BadInput, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BadInput, match="cannot read"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(BadInput, match="safetensors"):
        load_model(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(BadInput, match="pickle"):
        load_model(str(tmp_path))


def test_non_causal_lm_folder_is_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                         vocab_size=50)).save_pretrained(str(tmp_path), safe_serialization=True)
    with pytest.raises(BadInput, match="not a causal language model"):
        load_model(str(tmp_path), device="cpu")


def test_hub_id_without_network_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not looks_local("someorg/some-model")
    with pytest.raises(LwqError, match="Hugging Face hub"):
        load_model("someorg/some-model-that-is-not-cached", device="cpu")


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda"), "bfloat16") == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(BadInput):
        resolve_dtype("float8", torch.device("cpu"))


def test_fixture_model_loads() -> None:
    model = load_model(str(fixture_model("docs8")), device="cpu")
    assert len(get_blocks(model)) == 8 and len(linear_names(model)) == 56


def test_a_table_row_that_does_not_fit_says_why():
    """A llama whose blocks lack a table linear falls back to the generic layout, naming what is missing."""
    from lwq.models.arch import arch_for

    model = tiny_model("llama")
    for block in model.model.layers:
        del block.self_attn.q_proj
    spec = arch_for(model)
    assert spec.name == "generic:llama" and "self_attn.q_proj" in spec.why_generic
    assert arch_for(tiny_model("llama")).why_generic == ""
