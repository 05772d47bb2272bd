"""Scorers (``lwq.score``) on constructed cases with known answers, and ``lwq score`` through the CLI."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import fixture_data, fixture_model, save_tiny, tiny_model, word_text
from lwq.backends.quant import rtn_fake_quant
from lwq.calib.stats import collect_stats
from lwq.cli import run
from lwq.errors import BadInput
from lwq.score import SCORERS, ScoreConfig, ScoreInputs, parse_methods, ranks
from lwq.score.hessian import hessian_error, hessian_scores
from lwq.score.lim import lim_scores
from lwq.score.sensitivity import sensitivity_scores
from lwq.score.zd import zd_scores, zd_share

IDS = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))


def test_identity_block_scores_lowest_under_lim() -> None:
    model = tiny_model("llama", layers=4)
    block = model.model.layers[2]
    with torch.no_grad():  # attention and MLP add nothing: the block returns its input
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    stats = collect_stats(model, IDS, "cpu")
    scores = lim_scores(stats, "block")
    assert scores["model.layers.2"] == pytest.approx(0.0, abs=1e-6)
    assert min(scores, key=scores.get) == "model.layers.2"
    assert all(v > 1e-3 for k, v in scores.items() if k != "model.layers.2")
    per_linear = lim_scores(stats, "linear")
    assert per_linear["model.layers.2.mlp.up_proj"] == scores["model.layers.2"]
    assert ranks(scores)["model.layers.2"] == 4


def test_zd_share_and_planted_outliers() -> None:
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(256, 256, generator=g)
    assert zd_share(gauss) == pytest.approx(0.3173, abs=0.01)  # P(|z| > 1) of a normal
    model = tiny_model("llama", layers=2)
    target = "model.layers.1.mlp.gate_proj"
    with torch.no_grad():
        w = model.get_submodule(target).weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.02)
        w.view(-1)[:20] = 5.0  # a few huge outliers inflate the std: almost nothing is beyond 1 std
    assert zd_share(w) < 0.05
    desc = zd_scores(model, "linear", "descending")
    asc = zd_scores(model, "linear", "ascending")
    assert min(desc, key=desc.get) == target and max(asc, key=asc.get) == target
    blocks = zd_scores(model, "block", "ascending")
    assert max(blocks, key=blocks.get) == "model.layers.1"
    assert blocks["model.layers.0"] == pytest.approx(sum(v for k, v in asc.items() if ".0." in k) / 7)


def test_hessian_error_equals_direct_output_error() -> None:
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(48, 200, generator=g), torch.randn(300, 200, generator=g)
    for bits, gs in ((3, 128), (2, 64), (4, -1)):
        direct = float(((W - rtn_fake_quant(W, bits, gs)) @ X.t()).pow(2).sum())
        assert hessian_error(W, X.t() @ X, bits, gs) == pytest.approx(direct, rel=1e-4)


def test_hessian_scores_sum_linears_per_block() -> None:
    model = tiny_model("llama", layers=2)
    stats = collect_stats(model, IDS, "cpu")
    lin = hessian_scores(model, stats, "linear", bits=3)
    blk = hessian_scores(model, stats, "block", bits=3)
    assert blk["model.layers.1"] == pytest.approx(sum(v for k, v in lin.items() if k.startswith("model.layers.1.")))
    assert hessian_scores(model, stats, "block", bits=2)["model.layers.1"] > blk["model.layers.1"]


def test_sensitivity_finds_scaled_up_layer_and_restores_weights() -> None:
    model = tiny_model("llama", layers=3)
    target = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(target).weight.mul_(30.0)
    before = copy.deepcopy(model.state_dict())
    lin = sensitivity_scores(model, IDS, "linear", bits=2, group_size=32)
    # the scaled layer beats every linear of the other blocks; inside its block, the MLP's earlier
    # linears are amplified by it too, so it only has to rank among the top two there
    assert all(lin[target] > v for k, v in lin.items() if not k.startswith("model.layers.1."))
    assert ranks(lin)[target] <= 2
    blk = sensitivity_scores(model, IDS, "block", bits=2, group_size=32)
    assert max(blk, key=blk.get) == "model.layers.1"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sensitivity_tail_rerun_equals_full_forward() -> None:
    model = tiny_model("llama", layers=3)
    fast = sensitivity_scores(model, IDS, "block", bits=2, group_size=32, metric="kl", batch_size=3)
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=IDS).logits, -1)
        q = copy.deepcopy(model)
        for lin in q.model.layers[2].modules():
            if isinstance(lin, torch.nn.Linear):
                lin.weight.copy_(rtn_fake_quant(lin.weight, 2, 32))
        cur = F.log_softmax(q(input_ids=IDS).logits, -1)
    kl = float((ref.exp() * (ref - cur)).sum(-1).mean())
    assert fast["model.layers.2"] == pytest.approx(kl, rel=1e-4)
    nll = sensitivity_scores(model, IDS, "block", bits=2, group_size=32, metric="nll")
    assert set(nll) == set(fast) and nll != fast


def test_registry_and_config_errors() -> None:
    assert {"lim", "zd", "hessian", "sensitivity"} <= set(SCORERS.names())
    assert parse_methods("lim, zd,lim") == ["lim", "zd"]
    with pytest.raises(BadInput, match="valid: .*hessian"):
        parse_methods("lim,magic")
    with pytest.raises(BadInput, match="granularity"):
        ScoreConfig(granularity="row")
    model = tiny_model("llama", layers=2)
    out = SCORERS.get("zd").fn(ScoreInputs(model=model), ScoreConfig(granularity="block"))
    assert list(out) == ["model.layers.0", "model.layers.1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("score")
    text = root / "text.txt"
    text.write_text(word_text(2000))
    return str(save_tiny(root / "model", "llama", layers=3)), str(text)


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert run(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_cli_score_json_shape(tiny: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, text = tiny
    methods = ["lim", "zd", "hessian", "sensitivity"]
    for gran, n in (("block", 3), ("linear", 21)):
        doc = _json(capsys, ["score", model, "--data", text, "--method", ",".join(methods), "--granularity", gran,
                             "--nsamples", "2", "--seqlen", "16", "--json", "--plot", str(tmp_path / f"{gran}.png")])
        assert doc["granularity"] == gran and len(doc["layers"]) == n
        names = [layer["name"] for layer in doc["layers"]]
        assert names[0].startswith("model.layers.0") and names[-1].startswith("model.layers.2")
        for m in methods:
            assert sorted(layer["ranks"][m] for layer in doc["layers"]) == list(range(1, n + 1))
            best = min(doc["layers"], key=lambda layer: layer["ranks"][m])
            assert best["scores"][m] == max(layer["scores"][m] for layer in doc["layers"])
        assert (tmp_path / f"{gran}.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_score_from_calibration_folder(tiny: tuple[str, str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model, text = tiny
    calib = tmp_path / "calib"
    assert run(["calibrate", model, "--data", text, "--nsamples", "2", "--seqlen", "16", "-o", str(calib),
                "--quiet"]) == 0
    capsys.readouterr()
    direct = _json(capsys, ["score", model, "--data", text, "--method", "lim,hessian", "--nsamples", "2",
                            "--seqlen", "16", "--json"])
    via = _json(capsys, ["score", str(calib), "--method", "lim,hessian", "--json"])  # reloads the recorded model
    for a, b in zip(via["layers"], direct["layers"]):
        assert a["name"] == b["name"] and a["scores"] == pytest.approx(b["scores"], rel=1e-5)
    other = save_tiny(tmp_path / "other", "llama", layers=2)
    code = run(["score", str(calib), "--model", str(other), "--method", "zd"])
    err = capsys.readouterr().err
    assert code == 2 and "another model" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--method", "lim,magic"], "valid: hessian, lim, linearity, sensitivity, zd"),
    (["--method", "lim", "--nsamples", "0"], "nsamples must be positive"),
    (["--method", "sensitivity", "--seqlen", "100000"], "exceeds the context"),
    (["--method", "lim", "--granularity", "row"], "granularity"),
])
def test_cli_score_bad_input(tiny: tuple[str, str], capsys: pytest.CaptureFixture[str], argv: list[str],
                             message: str) -> None:
    model, text = tiny
    code = run(["score", model, "--data", text, "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_docs8_first_block_is_most_important(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On the real fixture, block 0 (which turns embeddings into the residual stream) dominates both
    LIM and measured sensitivity."""
    model, data = fixture_model("docs8"), fixture_data("docs-calib.txt")
    doc = _json(capsys, ["score", str(model), "--data", str(data), "--method", "lim,sensitivity",
                         "--nsamples", "4", "--seqlen", "64", "--json"])
    first = doc["layers"][0]
    assert first["name"] == "model.layers.0" and first["ranks"] == {"lim": 1, "sensitivity": 1}
