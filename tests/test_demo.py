"""The demo: the model builder (a small schedule) and the whole demo pipeline on it."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from lwq.pipeline.demo import MARKER, check_output, run_demo
from lwq.errors import BadInput
from lwq.models.toy import DemoConfig, build_demo_model, stdlib_docstrings


def test_stdlib_docstrings_split_is_deterministic_and_disjoint() -> None:
    train, held = stdlib_docstrings()
    assert len(train) > 100_000 and len(held) > 10_000
    assert stdlib_docstrings() == (train, held)
    assert held[:2000] not in train


@pytest.mark.slow
def test_demo_pipeline_on_a_small_build(tmp_path: Path) -> None:
    cfg = replace(DemoConfig(), vocab=300, layers=2, steps=25, batch=4)
    losses: list[float] = []
    folder = build_demo_model(tmp_path / "demo", cfg, lambda s, n, loss: losses.append(loss))
    assert (folder / "model" / "model.safetensors").is_file()
    assert len(losses) == cfg.steps and losses[-1] < losses[0]  # it trains
    out = tmp_path / "out"
    result = run_demo(folder, str(out))
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["fp32 (original)"]["perplexity"] < rows["uniform GPTQ 2-bit g128"]["perplexity"]
    mixed = rows["lwq mixed 3.25bit (dp)"]
    assert mixed["bits_per_weight"] <= 3.25
    assert rows["lwq mixed 2.5bit (dp)"]["bits_per_weight"] <= 2.5
    assert (out / "report" / "report.md").is_file() and (out / "report" / "pareto.png").is_file()
    assert (json.loads((out / "mixed-3.25bit" / "lwq_eval.json").read_text())["perplexity"]
            == pytest.approx(mixed["perplexity"]))
    assert str(tmp_path / "out") in (out / "report" / "report.md").read_text()  # built aside, paths say where it is
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden build folder left
    assert check_output(out, force=False) == out  # its own output folder is replaced on the next run
    (out / "keep.txt").write_text("the user's")  # ... but not once a user file is in it
    with pytest.raises(BadInput, match="is not a demo output"):
        check_output(out, force=True)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    (other / MARKER).write_text("{}")  # a bare marker is not enough
    for force in (False, True):
        with pytest.raises(BadInput, match="is not a demo output"):
            run_demo(folder, str(other), force=force)
    assert (other / "keep.txt").read_text() == "x"
