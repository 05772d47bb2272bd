"""Calibration statistics (``lwq.calib.stats``), their storage (``lwq.calib.store``), the lazy loader
(``lwq.models.lazy``) and ``lwq calibrate`` through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import save_tiny, tiny_model, word_text
from lwq.calib.stats import collect_stats
from lwq.calib.store import load_calib, save_calib
from lwq.cli import run
from lwq.errors import BadInput
from lwq.models.arch import linear_names
from lwq.models.lazy import load_lazy
from lwq.pipeline.load import load_model


def _direct_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every linear's input rows (tokens, in) from one ordinary forward pass, through hooks."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, args, _o, n=n: seen.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]).double()))
        for n in linear_names(model)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hessian_equals_xtx(arch: str) -> None:
    model = tiny_model(arch, layers=2)
    ids = torch.randint(3, 128, (5, 24), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model, ids, "cpu", batch_size=2)  # 3 batches: exercises the running mean
    direct = _direct_inputs(model, ids)
    assert list(stats.linears) == linear_names(model)
    for name, st in stats.linears.items():
        X = direct[name]
        assert st.tokens == X.shape[0] == 5 * 24
        torch.testing.assert_close(st.hessian.double() * st.tokens, X.t() @ X, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(st.absmax.double(), X.abs().amax(dim=0), rtol=1e-5, atol=1e-6)


def test_group_members_share_one_hessian() -> None:
    stats = collect_stats(tiny_model("llama"), torch.randint(3, 128, (2, 16)), "cpu")
    q, k = stats.linears["model.layers.0.self_attn.q_proj"], stats.linears["model.layers.0.self_attn.k_proj"]
    assert q.hessian is k.hessian and k.hessian_key == "model.layers.0.self_attn.q_proj"
    assert stats.linears["model.layers.0.mlp.down_proj"].hessian.shape == (160, 160)


def test_block_stats_match_hidden_states() -> None:
    model = tiny_model("llama", layers=3)
    ids = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(2))
    stats = collect_stats(model, ids, "cpu")
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(2):  # the last entry of hidden_states has the final norm applied
        a, b = hs[i].reshape(-1, 64).double(), hs[i + 1].reshape(-1, 64).double()
        st = stats.blocks[f"model.layers.{i}"]
        assert st.cos == pytest.approx(float(F.cosine_similarity(a, b, dim=-1).mean()), abs=1e-5)
        assert st.lim == pytest.approx(1 - st.cos)
        assert st.in_norm_mean == pytest.approx(float(a.norm(dim=-1).mean()), rel=1e-5)
        assert st.out_norm_std == pytest.approx(float(b.norm(dim=-1).std(unbiased=False)), rel=1e-4, abs=1e-6)
        assert st.tokens == 60


def test_lazy_loader_matches_eager_and_frees_blocks(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", "llama", layers=3)
    ids = torch.randint(3, 128, (2, 16))
    eager = collect_stats(load_model(str(folder), "float32", "cpu"), ids, "cpu")
    model, loader = load_lazy(str(folder), "float32", "cpu")
    assert all(p.is_meta for p in model.model.layers.parameters())
    lazy = collect_stats(model, ids, "cpu", loader=loader)
    assert all(p.is_meta for p in model.model.layers.parameters())  # every block released after its turn
    for name in eager.linears:
        torch.testing.assert_close(lazy.linears[name].hessian, eager.linears[name].hessian)
    assert [b.cos for b in lazy.blocks.values()] == pytest.approx([b.cos for b in eager.blocks.values()])


def test_save_load_round_trip_and_checks(tmp_path: Path) -> None:
    model = tiny_model("llama")
    stats = collect_stats(model, torch.randint(3, 128, (2, 16)), "cpu")
    out = save_calib(stats, tmp_path / "c", "tiny", {"seed": 3, "data": "x.txt"})
    back = load_calib(out, model)
    assert back.meta["model"] == "tiny" and back.meta["seed"] == 3 and back.meta["nsamples"] == 2
    assert back.blocks == stats.blocks
    for name, st in stats.linears.items():
        assert torch.equal(back.linears[name].hessian, st.hessian)
        assert torch.equal(back.linears[name].absmax, st.absmax)
        assert back.linears[name].shape == st.shape and back.linears[name].tokens == st.tokens
    assert (back.linears["model.layers.1.self_attn.v_proj"].hessian
            is back.linears["model.layers.1.self_attn.q_proj"].hessian)
    with pytest.raises(BadInput, match="already exists"):
        save_calib(stats, out, "tiny")
    save_calib(stats, out, "tiny", force=True)
    with pytest.raises(BadInput, match="another model"):
        load_calib(out, tiny_model("llama", layers=3))
    with pytest.raises(BadInput, match="another model"):
        load_calib(out, tiny_model("llama", hidden=32))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("calib")
    text = root / "text.txt"
    text.write_text(word_text(2000))
    return str(save_tiny(root / "model", "llama", layers=3)), str(text)


def test_cli_calibrate_json_and_folder(tiny: tuple[str, str], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    model, text = tiny
    out = tmp_path / "calib"
    argv = ["calibrate", model, "--data", text, "--nsamples", "3", "--seqlen", "32", "-o", str(out), "--json"]
    assert run(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["nsamples"] == 3 and doc["seqlen"] == 32 and doc["loader"] == "lazy"
    assert list(doc["blocks"]) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    saved = json.loads((out / "calib.json").read_text())
    assert saved["model"] == str(Path(model).resolve()) and saved["model_type"] == "llama"
    assert saved["linears"]["model.layers.2.mlp.up_proj"]["shape"] == [160, 64]
    assert load_calib(out).linears["model.layers.0.mlp.down_proj"].tokens == 96
    assert run(argv) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--nsamples", "0"], "nsamples must be positive"),
    (["--seqlen", "100000"], "exceeds the context"),
])
def test_cli_calibrate_bad_input(tiny: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 extra: list[str], message: str) -> None:
    model, text = tiny
    code = run(["calibrate", model, "--data", text, "-o", str(tmp_path / "c"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()
