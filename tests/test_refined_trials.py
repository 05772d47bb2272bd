"""Refined trials for planning (lwq.pipeline.refined_trials, ``--measure-with refined``): per block and
width, the ratio of the refined to the unrefined block-output error scales the backend trials' errors."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import save_tiny, tiny_model, word_text
from lwq.allocate.candidates import make_candidates
from lwq.allocate.recipes import Recipe
from lwq.cli import run
from lwq.errors import BadInput
from lwq.models.arch import model_shapes
from lwq.pipeline.refine import RefineConfig
from lwq.pipeline.refined_trials import (refined_errors, refinement_ratios, scale_errors, trial_config,
                                         width_plans)

IDS = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _layers(model, bits=(2, 4), backend="gptq"):
    return make_candidates(model_shapes(model), bits, backend, 32, False, 16)


def test_width_plans_give_every_refinable_linear_one_spec_per_width():
    model = tiny_model("llama")
    plans = width_plans(_layers(model, (2, 3, 4)), "model.layers")
    assert sorted(plans) == [0, 1] and sorted(plans[0]) == [2, 3, 4]
    assert len(plans[1][3]) == 7 and all(s.bits == 3 for s in plans[1][3].values())
    nf4 = make_candidates(model_shapes(model), (4,), "bnb-nf4", 64, False, 16)
    assert width_plans(nf4, "model.layers") == {}  # nothing refinement can tune


def test_trial_config_compresses_the_run():
    t = trial_config(RefineConfig(steps=200, lr=0.5, batch=4, norms=False))
    assert (t.steps, t.lr, t.batch, t.norms) == (25, None, 4, False) and t.step_size == pytest.approx(1 / 25)
    assert trial_config(RefineConfig(steps=3)).steps == 1


def test_ratios_are_measured_per_block_and_width_and_leave_the_model_alone():
    model = tiny_model("llama", seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    ratios = refinement_ratios(model, IDS, _layers(model), RefineConfig(steps=40), on_step=lambda i, n: steps.append(i))
    assert sorted(ratios) == [(0, 2), (0, 4), (1, 2), (1, 4)] and steps == [1, 2]
    assert all(0 < r <= 1 for r in ratios.values())
    assert min(ratios.values()) < 0.95  # refinement lowers some block's error
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_scale_errors_multiplies_each_candidate_by_its_block_and_width():
    model = tiny_model("llama")
    layers = [lc.replace_errors([1.0 + k for k in range(len(lc.candidates))]) for lc in _layers(model)]
    out = scale_errors(layers, {(0, 2): 0.5, (1, 4): 0.25}, "model.layers")
    for lc, new in zip(layers, out):
        for c, n in zip(lc.candidates, new.candidates):
            i = int(lc.name.split(".")[2])
            want = {(0, 2): 0.5, (1, 4): 0.25}.get((i, c.spec.bits), 1.0)
            assert n.error == pytest.approx(c.error * want) and n.spec == c.spec


def test_refined_errors_need_refinement_and_data():
    model = tiny_model("llama")
    with pytest.raises(BadInput, match="needs --refine block"):  # refused before anything is measured
        Recipe(refine="none", measure_with="refined")
    with pytest.raises(BadInput, match="needs --refine block"):
        Recipe(refine_steps=0, measure_with="refined")
    with pytest.raises(BadInput, match="pass --data"):
        refined_errors(model, None, _layers(model), Recipe(measure_with="refined"))


def test_cli_plans_with_refined_trials(tmp_path, capsys):
    save_tiny(tmp_path / "m", "llama")
    (tmp_path / "t.txt").write_text(word_text(3000))
    base = ["plan", str(tmp_path / "m"), "--budget", "3bit", "--data", str(tmp_path / "t.txt"), "--nsamples", "8",
            "--seqlen", "32", "--group-size", "32", "--candidate-bits", "2,3,4", "--device", "cpu", "--quiet"]
    assert run([*base, "--measure-with", "refined", "-o", str(tmp_path / "r.json"), "--error-db",
                str(tmp_path / "db.json")]) == 0
    plan = json.loads((tmp_path / "r.json").read_text())
    ratios = plan["meta"]["refinement_ratios"]
    assert sorted(ratios) == [f"{i}:{b}" for i in range(2) for b in (2, 3, 4)]
    assert plan["meta"]["recipe"]["measure_with"] == "refined"
    # the database keeps backend trials, so a backend plan reuses it, and the ratios beside them
    db = json.loads((tmp_path / "db.json").read_text())
    assert db["meta"]["trials"] == "backend" and db["meta"]["refinement"]["ratios"] == ratios
    assert db["meta"]["refinement"]["steps"] == 25 and db["meta"]["refinement"]["norms"] is True
    db["meta"]["refinement"]["ratios"] = {k: 0.5 for k in ratios}  # reuse shows: these are not measured
    (tmp_path / "db.json").write_text(json.dumps(db))
    assert run([*base, "--measure-with", "refined", "-o", str(tmp_path / "r2.json"), "--error-db",
                str(tmp_path / "db.json")]) == 0
    assert set(json.loads((tmp_path / "r2.json").read_text())["meta"]["refinement_ratios"].values()) == {0.5}
    (tmp_path / "long.yaml").write_text("refine_steps: 80\n")
    assert run([*base, "--measure-with", "refined", "--config", str(tmp_path / "long.yaml"), "-o",
                str(tmp_path / "r3.json"), "--error-db", str(tmp_path / "db.json")]) == 0  # other trials: measured
    assert set(json.loads((tmp_path / "r3.json").read_text())["meta"]["refinement_ratios"].values()) != {0.5}
    assert run([*base, "-o", str(tmp_path / "b.json"), "--error-db", str(tmp_path / "db.json")]) == 0
    capsys.readouterr()
    assert run([*base, "--measure-with", "bogus", "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "refined" in err
