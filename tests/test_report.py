"""``lwq report``: PNGs of bits per layer, importance and the Pareto front, and report.md."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import save_tiny, word_text
from lwq.cli import run
from lwq.eval.report import ResultRow, pareto_front
from lwq.models.arch import linear_names
from lwq.pipeline import LoadOptions, quantize_to_checkpoint
from lwq.spec import make_spec


def test_pareto_front():
    rows = [ResultRow("a", 2.5, 40.0), ResultRow("b", 3.0, 20.0), ResultRow("c", 3.5, 25.0), ResultRow("d", 4.5, 12.0),
            ResultRow("e", 16.0, 12.0)]
    assert [r.label for r in pareto_front(rows)] == ["a", "b", "d"]


def check_png(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, img.shape
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 8, f"{path.name}: only {len(colours)} colours"
    assert (img[..., :3] < 0.5).mean() > 0.002  # something dark is drawn (text, axes, bars)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    save_tiny(root / "model", "llama")
    (root / "text.txt").write_text(word_text(2000))
    out = []
    for label, bits in (("w3mix", 3), ("w4mix", 4)):
        def plan(m, bits=bits):
            return {n: make_spec(bits if i % 3 else 8, 32) for i, n in enumerate(linear_names(m))}
        ck = root / label
        quantize_to_checkpoint(str(root / "model"), str(ck), plan, load=LoadOptions(device="cpu"))
        out.append(ck)
    names = linear_names_of(out[0])
    scores = {"methods": ["hessian", "zd"], "layers": [{"name": n, "scores": {"hessian": float(i), "zd": float(i % 4)}}
                                                       for i, n in enumerate(names)]}
    (out[0] / "scores.json").write_text(json.dumps(scores))
    return root, out


def linear_names_of(ckpt):
    return list(json.loads((ckpt / "config.json").read_text())["quantization_config"]["layers"])


def test_report_writes_valid_pngs_and_markdown(ckpts, tmp_path, capsys):
    root, (a, b) = ckpts
    for ck in (a, b):
        assert run(["eval", str(ck), "--data", str(root / "text.txt"), "--seqlen", "32", "--max-samples", "4",
                    "--json"]) == 0
        (ck / "lwq_eval.json").write_text(capsys.readouterr().out)
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"label": "fp16", "bits_per_weight": 16, "perplexity": 120.0}]))
    out = tmp_path / "rep"
    assert run(["report", str(a), str(b), "-o", str(out), "--results", str(results), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["bits-w3mix.png", "bits-w4mix.png", "importance-w3mix.png", "pareto.png"]
    for p in pngs:
        check_png(out / p)
    assert [r["label"] for r in doc["rows"]] == ["w3mix", "w4mix", "fp16"]
    bpw = {s["label"]: s["bits_per_weight"] for s in doc["checkpoints"]}
    assert 3 < bpw["w3mix"] < bpw["w4mix"] < 8
    md = (out / "report.md").read_text()
    for needle in ("## w3mix", "## w4mix", "bits-w3mix.png", "importance-w3mix.png", "pareto.png", "| fp16 | 16.000"):
        assert needle in md, needle


def test_report_errors_are_one_line(tmp_path, capsys):
    assert run(["report", "-o", str(tmp_path / "r")]) == 2
    assert "give at least one checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"label": "x"}]')
    assert run(["report", "-o", str(tmp_path / "r"), "--results", str(bad)]) == 2
    assert "needs label, bits_per_weight and perplexity" in capsys.readouterr().err
