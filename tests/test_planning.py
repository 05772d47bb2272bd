"""Planning on real models: error tables, the KL evaluator, ``lwq plan`` with every solver, the
measured-error database, and ``lwq quantize --budget`` / ``--plan`` (a tiny random llama; docs8 once)."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import fixture_data, fixture_model, save_tiny, tiny_model, word_text
from lwq.allocate.recipes import Recipe
from lwq.cli import run
from lwq.errors import BadInput
from lwq.models.arch import linear_names
from lwq.pipeline.plan import error_table, plan_model
from lwq.score.measured import KlEvaluator
from lwq.spec import make_spec

PLAN_KEYS = {"version", "budget", "solver", "scorer", "bits_per_weight", "total_bytes", "layers"}
LAYER_KEYS = {"bits", "group_size", "sym", "backend", "format", "act_bits", "act_order", "cost_bytes", "estimate"}
SMALL = ["--nsamples", "4", "--seqlen", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("planning")
    save_tiny(root / "model", "llama")
    (root / "calib.txt").write_text(word_text(3000))
    return root


def plan_cli(tiny, out, *extra):
    return run(["plan", str(tiny / "model"), "-o", str(out), "--data", str(tiny / "calib.txt"), "--json", *SMALL,
                *extra])


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("solver,extra", [
    ("order", ["--scorer", "lim"]),
    ("random", ["--scorer", "zd"]),
    ("dp", []),
    ("ilp", ["--tie", "fused", "--scorer", "hessian"]),
])
def test_plan_json_within_budget_for_each_solver(tiny, tmp_path, capsys, solver, extra):
    out = tmp_path / "plan.json"
    assert plan_cli(tiny, out, "--budget", "4.0bit", "--solver", solver, *extra) == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert PLAN_KEYS <= set(doc) and doc["version"] == 1 and doc["budget"] == "4.0bit" and doc["solver"] == solver
    assert doc["bits_per_weight"] <= 4.0
    assert json.loads(out.read_text())["layers"] == doc["layers"]
    layers = doc["layers"]
    assert list(layers) == linear_names(tiny_model("llama"))
    for entry in layers.values():
        assert LAYER_KEYS <= set(entry) and entry["backend"] == "gptq" and entry["cost_bytes"] > 0
    assert doc["total_bytes"] == sum(e["cost_bytes"] for e in layers.values())
    numel = sum(e["numel"] for e in layers.values())
    assert doc["bits_per_weight"] == pytest.approx(8 * doc["total_bytes"] / numel, abs=1e-5)
    assert len({e["bits"] for e in layers.values()}) >= 2, (
        "a 4.0-bit budget mixes 3 and 4 bits (all at 4 bits is 4.3 bpw; one block of two at 4 bits fits)")
    if solver == "ilp":
        for b in range(2):
            p = f"model.layers.{b}"
            assert len({layers[f"{p}.self_attn.{s}_proj"]["bits"] for s in "qkv"}) == 1
            assert layers[f"{p}.mlp.gate_proj"]["bits"] == layers[f"{p}.mlp.up_proj"]["bits"]


def test_search_recipe_with_options_stays_within_budget(tiny, tmp_path, capsys):
    recipe = tmp_path / "search.yaml"
    recipe.write_text("budget: 3.25bit\nsolver: search\nscorer: sensitivity\nbits: [2, 3, 4, 8]\n"
                      "options:\n  generations: 2\n  offspring: 3\n  fidelity: 128\n  low_fidelity: 32\n")
    assert plan_cli(tiny, tmp_path / "plan.json", "--config", str(recipe)) == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert doc["solver"] == "search" and doc["budget"] == "3.25bit" and doc["bits_per_weight"] <= 3.25
    info = doc["meta"]["solver_info"]
    assert info["evaluations"] >= 1 and info["loss"] <= info["start_loss"]
    assert {e["bits"] for e in doc["layers"].values()} <= {2, 3, 4, 8}


@pytest.mark.slow
def test_measured_errors_fall_with_bits_on_docs8():
    from lwq.calib.data import calibration_samples
    from lwq.models.load import load_tokenizer
    from lwq.pipeline.load import load_model

    path = fixture_model("docs8")
    model = load_model(str(path), "float32", "cpu")
    samples = calibration_samples(load_tokenizer(str(path)), str(fixture_data("docs-calib.txt")), 4, 32)
    layers, db = error_table(model, samples, Recipe(bits=(2, 4, 8)))
    assert len(layers) == 56 and db.meta["nsamples"] == 4
    for lc in layers:  # sym auto: each width is measured with and without zero points
        assert sorted((c.spec.bits, c.spec.sym) for c in lc.candidates) == [(b, s) for b in (2, 4, 8)
                                                                               for s in (False, True)]
        for sym in (False, True):
            errs = [c.error for c in sorted(lc.candidates, key=lambda c: c.spec.bits) if c.spec.sym == sym]
            assert all(a > b for a, b in zip(errs, errs[1:])), (lc.name, errs)
            assert errs[-1] >= 0
    assert any(a.error != b.error for lc in layers for a, b in zip(lc.candidates[::2], lc.candidates[1::2]))
    two_bit = {lc.name: lc.candidates[0].error for lc in layers}
    assert max(two_bit.values()) > 3 * min(two_bit.values()), "layers differ in sensitivity"


def test_error_db_is_reused_without_measuring(tiny, tmp_path, capsys, monkeypatch):
    dbf = tmp_path / "errors.json"
    assert plan_cli(tiny, tmp_path / "a.json", "--budget", "3.5bit", "--error-db", str(dbf)) == 0
    first = json.loads(capsys.readouterr().out)
    db = json.loads(dbf.read_text())
    assert set(db["entries"]) == set(first["layers"])

    def no_measuring(*_a, **_k):
        raise AssertionError("measured again although the database holds every candidate")

    monkeypatch.setattr("lwq.score.sensitivity.SensitivityProbe", no_measuring)
    assert plan_cli(tiny, tmp_path / "b.json", "--budget", "3.5bit", "--error-db", str(dbf)) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["layers"] == first["layers"]
    assert plan_cli(tiny, tmp_path / "c.json", "--budget", "3.0bit", "--error-db", str(dbf)) == 0
    lower = json.loads(capsys.readouterr().out)
    assert lower["bits_per_weight"] <= 3.0 < first["bits_per_weight"]
    # without the database the patched measurement is reached
    assert plan_cli(tiny, tmp_path / "d.json", "--budget", "3.5bit") == 1


def test_kl_evaluator_restores_weights_and_orders_plans():
    model = tiny_model("llama")
    names = linear_names(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    ev = KlEvaluator(model, samples)
    full = int(samples.numel())
    kl = {b: ev({n: make_spec(b, 32, backend="rtn") for n in names}, full) for b in (2, 4, 16)}
    assert kl[16] == 0.0 and ev({}, full) == 0.0
    assert kl[2] > kl[4] > 0
    one = ev({names[0]: make_spec(2, 32, backend="rtn")}, full)
    assert 0 < one < kl[2]
    assert ev({n: make_spec(2, 32, backend="rtn") for n in names}, 32) >= 0  # low fidelity: one sample
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plan_model_api_returns_reusable_db(monkeypatch):
    model = tiny_model("llama")
    samples = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    plan, db = plan_model(model, samples, Recipe(budget="3.25bit", bits=(2, 3, 4)))
    assert plan.bits_per_weight <= 3.25 and plan.solver == "dp" and plan.scorer == "sensitivity"
    assert db is not None and set(db.entries) == set(plan.layers)
    assert all(e["gptq w2 g128|gptq"] > e["gptq w4 g128|gptq"] for e in db.entries.values())

    def no_measuring(*_a, **_k):
        raise AssertionError("measured again although the database holds every candidate")

    monkeypatch.setattr("lwq.score.sensitivity.SensitivityProbe", no_measuring)
    plan2, db2 = plan_model(model, samples, Recipe(budget="3.25bit", bits=(2, 3, 4)), db=db)
    assert plan2.specs == plan.specs and db2.entries == db.entries
    plan3, _ = plan_model(model, samples, Recipe(budget="2.9bit", bits=(2, 3, 4)), db=db)
    assert plan3.bits_per_weight <= 2.9 < plan.bits_per_weight
    with pytest.raises(BadInput, match="budget"):
        plan_model(model, samples, Recipe(bits=(2, 3, 4)))


def quantize_cli(tiny, out, *extra):
    return run(["quantize", str(tiny / "model"), "-o", str(out), "--data", str(tiny / "calib.txt"), "--json",
                *SMALL, *extra])


def shard_bytes(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


def specs_of(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]["layers"]


def test_quantize_budget_then_plan_reproduces_and_hand_edits_apply(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert quantize_cli(tiny, out, "--budget", "3.25bit", "--scorer", "hessian") == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert doc["bits_per_weight"] <= 3.25 and doc["budget"] == "3.25bit" and doc["solver"] == "dp"
    assert doc["output"] == str(out.resolve()) and not doc["budget_exceeded"]
    plan = json.loads((out / "plan.json").read_text())
    assert {n: e["bits"] for n, e in plan["layers"].items()} == {n: s["bits"] for n, s in specs_of(out).items()}

    again = tmp_path / "q2"
    assert quantize_cli(tiny, again, "--plan", str(out / "plan.json")) == 0, capsys.readouterr().err
    redo = json.loads(capsys.readouterr().out)
    assert redo["bits_per_weight"] == pytest.approx(doc["bits_per_weight"])
    assert specs_of(again) == specs_of(out)
    # a --plan run reads one block at a time (no planning needs the whole model) and writes the same bytes
    assert doc["loader"] == "eager" and redo["loader"] == "lazy"
    assert shard_bytes(again) == shard_bytes(out)

    name = next(iter(plan["layers"]))
    new_bits = 8 if plan["layers"][name]["bits"] != 8 else 2
    plan["layers"][name] = {"bits": new_bits}  # a hand edit: the rest of the entry follows the bits
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(plan))
    third = tmp_path / "q3"
    code = quantize_cli(tiny, third, "--plan", str(edited))
    captured = capsys.readouterr()
    edited_doc = json.loads(captured.out)
    # a plan over its own stated budget is written as asked, and the run fails (exit 1, one line)
    assert code == (1 if edited_doc["budget_exceeded"] else 0), captured.err
    if new_bits == 8:
        assert edited_doc["budget_exceeded"] and edited_doc["bits_per_weight"] > 3.25
        assert "exceeds the budget 3.25bit" in captured.err.strip().splitlines()[-1]
    specs = specs_of(third)
    assert specs[name]["bits"] == new_bits
    assert {n: s for n, s in specs.items() if n != name} == {n: s for n, s in specs_of(out).items() if n != name}


def test_bad_plans_and_modes_are_one_line_errors(tiny, tmp_path, capsys):
    good = tmp_path / "plan.json"
    assert plan_cli(tiny, good, "--budget", "4bit", "--scorer", "lim", "--solver", "order") == 0
    capsys.readouterr()
    plan = json.loads(good.read_text())
    first = next(iter(plan["layers"]))
    unknown = dict(plan, layers={**plan["layers"], "model.layers.0.self_attn.qq_proj": plan["layers"][first]})
    five = dict(plan, layers={**plan["layers"], first: {**plan["layers"][first], "bits": 5}})
    for doc, message in ((unknown, "unknown module"), (five, "bits")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(doc))
        assert quantize_cli(tiny, tmp_path / "never", "--plan", str(bad)) == 2
        assert message in one_error_line(capsys)
        assert not (tmp_path / "never").exists()
    assert quantize_cli(tiny, tmp_path / "never", "--bits", "4", "--budget", "3.25bit") == 2
    assert "--bits" in one_error_line(capsys) and not (tmp_path / "never").exists()


@pytest.mark.parametrize("command", ["plan", "quantize"])
def test_empty_candidate_bits_is_refused_not_the_default(tiny, tmp_path, capsys, command):
    """An empty --candidate-bits '' is a mistake, not a request for the default widths (issue 16)."""
    out = tmp_path / ("plan.json" if command == "plan" else "q")
    code = run([command, str(tiny / "model"), "-o", str(out), "--data", str(tiny / "calib.txt"), "--budget", "3.5bit",
                "--candidate-bits", "", *SMALL])
    assert code == 2
    assert "bits must be integers" in one_error_line(capsys)
    assert not out.exists()
