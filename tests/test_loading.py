"""Loading checkpoints on every path (``lwq.load``, ``import lwq`` + ``from_pretrained``, ``lwq eval``):
tied embeddings load, the source's bf16 is kept for what is not quantized, and broken checkpoints or
inputs (NaN/Inf, edited configs, wrong shapes, symlink loops, plans of other models) are refused in
one line that names what is wrong."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import save_tiny, word_text
from lwq.cli import run
from lwq.errors import BadInput

QUICK = ["--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("loading")
    save_tiny(r / "tied", "llama", tied=True, dtype=torch.bfloat16)
    (r / "text.txt").write_text(word_text(3000))
    assert run(["quantize", str(r / "tied"), "-o", str(r / "ckpt"), "--bits", "4", "--group-size", "32",
                "--backend", "rtn", *QUICK]) == 0
    return r


def remanifest(folder: Path) -> None:
    """Rewrite the manifest's checksums, as a tool that edits a checkpoint 'properly' would: what is
    refused must then be refused for what the files hold, not for a checksum."""
    from lwq.formats.checkpoint import MANIFEST
    from lwq.formats.folder import sha256_file

    doc = json.loads((folder / MANIFEST).read_text())
    for section in ("files", "others"):
        for name in doc.get(section, {}):
            doc[section][name] = {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(doc))


def edited(root: Path, tmp: Path, tensors=None, config=None) -> Path:
    """A copy of the checkpoint with its tensors and/or config.json edited, manifest rewritten."""
    out = tmp / "edited"
    shutil.copytree(root / "ckpt", out)
    if tensors is not None:
        st = load_file(str(out / "model.safetensors"))
        tensors(st)
        save_file(st, str(out / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    remanifest(out)
    return out


def from_pretrained(path: Path):
    from lwq.formats.hf_register import register
    from transformers import AutoModelForCausalLM

    register()
    return AutoModelForCausalLM.from_pretrained(str(path))


def every_path_refuses(path: Path, root: Path, capsys, *needles: str) -> None:
    """lwq.load and from_pretrained raise one-line BadInputs, ``lwq eval`` exits 2 with one line; all
    three name ``needles``."""
    import lwq

    for load in (lambda: lwq.load(str(path), device="cpu"), lambda: from_pretrained(path)):
        with pytest.raises(BadInput) as info:
            load()
        msg = str(info.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg
    capsys.readouterr()
    code = run(["eval", str(path), "--data", str(root / "text.txt"), "--seqlen", "32", "--max-samples", "2", *QUICK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert all(n in err for n in needles), err


def test_tied_bf16_checkpoint_loads_on_every_path_and_keeps_bf16(root, capsys):
    import lwq

    ckpt = root / "ckpt"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert "lm_head.weight" not in dtypes  # tied: one tensor
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["model.norm.weight"] == "BF16"
    assert dtypes["model.layers.0.input_layernorm.weight"] == "BF16"
    assert dtypes["model.layers.0.self_attn.q_proj.scales"] == "F16"  # the quantized data keeps its layout
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"

    hf = from_pretrained(ckpt)
    ours = lwq.load(str(ckpt), device="cpu")
    assert hf.lm_head.weight is hf.model.embed_tokens.weight and hf.dtype == torch.bfloat16
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    src = load_file(str(root / "tied" / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(hf.model.embed_tokens.weight, src)
    assert torch.equal(ours.model.embed_tokens.weight.bfloat16(), src)
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(input_ids=ids).logits.float(), ours(input_ids=ids).logits
    assert torch.isfinite(a).all() and (a - b).abs().max() < 0.05 * b.abs().max()
    capsys.readouterr()
    assert run(["eval", str(ckpt), "--data", str(root / "text.txt"), "--seqlen", "32", "--max-samples", "2",
                *QUICK]) == 0


@pytest.mark.parametrize("where,value", [("model.layers.1.mlp.down_proj.scales", float("nan")),
                                         ("model.layers.0.input_layernorm.weight", float("inf")),
                                         ("model.embed_tokens.weight", float("-inf"))])
def test_non_finite_tensor_is_refused_naming_it(root, tmp_path, capsys, where, value):
    def poison(st):
        st[where].view(-1)[3] = value

    every_path_refuses(edited(root, tmp_path, tensors=poison), root, capsys, "NaN/Inf", where)


def test_tensor_of_another_shape_is_refused_in_one_line(root, tmp_path, capsys):
    def grow(st):
        st["model.norm.weight"] = torch.ones(65, dtype=torch.bfloat16)

    every_path_refuses(edited(root, tmp_path, tensors=grow), root, capsys, "model.norm.weight", "[65]", "[64]")


def test_edited_config_that_changes_shapes_is_refused_in_one_line(root, tmp_path, capsys):
    def widen(cfg):
        cfg["intermediate_size"] += 32

    every_path_refuses(edited(root, tmp_path, config=widen), root, capsys, "config.json makes it", "more differ")


def test_edited_config_that_transformers_rejects_is_one_line(root, tmp_path, capsys):
    """transformers' own validation (a multi-line error on the way in) becomes one line and exit 2
    through lwq; ``from_pretrained`` validates the config before lwq's quantizer runs, so that path is
    transformers' own error."""
    import lwq

    bad = edited(root, tmp_path, config=lambda cfg: cfg.update(num_attention_heads=7))
    with pytest.raises(BadInput, match="not a multiple of the number of attention heads") as info:
        lwq.load(str(bad), device="cpu")
    assert "\n" not in str(info.value)
    capsys.readouterr()
    code = run(["eval", str(bad), "--data", str(root / "text.txt"), "--seqlen", "32", *QUICK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "attention heads" in err, err


def test_source_model_of_another_shape_is_refused_on_both_loaders(root, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(root / "tied", src)
    st = load_file(str(src / "model.safetensors"))
    st["model.layers.1.mlp.up_proj.weight"] = st["model.layers.1.mlp.up_proj.weight"][:-2].clone()
    save_file(st, str(src / "model.safetensors"), metadata={"format": "pt"})
    for argv in (["quantize", str(src), "-o", str(tmp_path / "q"), "--bits", "4", "--backend", "rtn", *QUICK],
                 ["eval", str(src), "--data", str(root / "text.txt"), "--seqlen", "32", *QUICK]):
        capsys.readouterr()
        code = run(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "model.layers.1.mlp.up_proj.weight" in err and "[158, 64]" in err and "[160, 64]" in err, err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("kind", ["loop", "dangling"])
@pytest.mark.parametrize("command", ["eval", "quantize", "info"])
def test_symlink_loop_or_dangling_link_exits_2_with_its_own_message(root, tmp_path, capsys, monkeypatch,
                                                                    kind, command):
    monkeypatch.chdir(tmp_path)
    link = Path("model")  # a bare name, which would otherwise be taken for a hub id
    os.symlink("model" if kind == "loop" else "gone", link)
    argv = {"eval": ["eval", "model", "--data", str(root / "text.txt")],
            "quantize": ["quantize", "model", "-o", "out", "--bits", "4"], "info": ["info", "model"]}[command]
    capsys.readouterr()
    code = run([*argv, *QUICK] if command != "info" else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert ("symlink loop" if kind == "loop" else "broken symlink (to gone") in err, err
    assert os.path.islink(link) and not Path("out").exists()


def test_plan_of_another_model_is_refused_naming_the_first_layer(root, tmp_path, capsys):
    small, wide = save_tiny(tmp_path / "small", "llama"), save_tiny(tmp_path / "wide", "llama", hidden=96)
    plan = tmp_path / "plan.json"
    assert run(["plan", str(small), "--budget", "3.5bit", "--scorer", "zd", "-o", str(plan), *QUICK]) == 0
    capsys.readouterr()
    code = run(["quantize", str(wide), "--plan", str(plan), "-o", str(tmp_path / "q"), *QUICK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    first = next(iter(json.loads(plan.read_text())["layers"]))
    assert f"layer {first} has" in err and "the plan was made for" in err and str(small) in err, err
    deeper = save_tiny(tmp_path / "deeper", "llama", layers=3)
    assert run(["plan", str(deeper), "--budget", "3.5bit", "--scorer", "zd", "-o", str(plan), "--force", *QUICK]) == 0
    capsys.readouterr()
    assert run(["quantize", str(small), "--plan", str(plan), "-o", str(tmp_path / "q"), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown module 'model.layers.2." in err and f"the plan was made for {deeper}" in err, err
    assert not (tmp_path / "q").exists()


def test_half_precision_on_cpu_says_what_it_costs_and_the_summary_names_the_dtype(root, tmp_path, capsys):
    capsys.readouterr()
    assert run(["quantize", str(root / "tied"), "-o", str(tmp_path / "bf"), "--bits", "4", "--group-size", "32",
                "--backend", "rtn", "--dtype", "bfloat16", "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "note: computing in bfloat16 on CPU (float32 is the default there): less memory" in err, err
    assert json.loads(out)["dtype"] == "bfloat16"
    assert run(["quantize", str(root / "tied"), "-o", str(tmp_path / "fp"), "--bits", "4", "--group-size", "32",
                "--backend", "rtn", "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "note:" not in err and json.loads(out)["dtype"] == "float32"
    with safe_open(str(tmp_path / "bf" / "model.safetensors"), "pt") as f:  # stored as the source, either way
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_byte_budget_counts_what_is_not_quantized_in_the_source_dtype(tmp_path, capsys, dtype):
    """The rest (embeddings, head, norms) is stored in the source's dtype, and a byte budget pays for it
    at that size: the checkpoint's tensors fit the budget whichever the dtype."""
    src = save_tiny(tmp_path / "src", "llama", dtype=dtype)
    (tmp_path / "text.txt").write_text(word_text(2000))
    budget = 100_000
    assert run(["quantize", str(src), "-o", str(tmp_path / "q"), "--budget", f"{budget}B", "--scorer", "zd",
                "--backend", "rtn", "--group-size", "32", *QUICK]) == 0
    summary = json.loads((tmp_path / "q" / "lwq_manifest.json").read_text())["summary"]
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        rest = {k: f.get_slice(k) for k in f.keys() if not k.startswith("model.layers.") or "norm" in k}
        rest_bytes = sum(s.get_shape()[0] * (s.get_shape()[1] if len(s.get_shape()) > 1 else 1)
                         * (4 if s.get_dtype() == "F32" else 2) for s in rest.values())
        assert {s.get_dtype() for s in rest.values()} == {"F32" if dtype == torch.float32 else "BF16"}
    assert summary["quantized_bytes"] + rest_bytes <= budget, (summary["quantized_bytes"], rest_bytes)
    assert summary["quantized_bytes"] > 0.9 * (budget - rest_bytes) - 4096  # and the plan uses what is left


def test_stored_dtype_comes_from_the_weights_when_config_names_none_and_is_never_wider_than_computed(tmp_path):
    def rest_dtypes(ckpt):
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys() if "norm" in k or "embed" in k or "lm_head" in k}

    src = save_tiny(tmp_path / "bf", "llama", dtype=torch.bfloat16)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(cfg))
    args = ["--bits", "4", "--group-size", "32", "--backend", "rtn", "--device", "cpu", "--quiet"]
    assert run(["quantize", str(src), "-o", str(tmp_path / "q1"), *args]) == 0
    assert rest_dtypes(tmp_path / "q1") == {"BF16"}  # read from the safetensors headers, not assumed float32
    fp32 = save_tiny(tmp_path / "fp", "llama")
    assert run(["quantize", str(fp32), "-o", str(tmp_path / "q2"), "--dtype", "bfloat16", *args]) == 0
    assert rest_dtypes(tmp_path / "q2") == {"BF16"}  # computed in bf16: fp32 storage would hold bf16 values
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["dtype"] == "bfloat16"
    assert run(["quantize", str(fp32), "-o", str(tmp_path / "q3"), *args]) == 0
    assert rest_dtypes(tmp_path / "q3") == {"F32"}
