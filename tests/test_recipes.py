"""Recipes: strict YAML loading, command-line overrides, the shipped configs."""
from __future__ import annotations

from pathlib import Path

import pytest

from lwq.allocate.budget import parse_budget
from lwq.allocate.recipes import Recipe, load_recipe, merge, parse_bits
from lwq.errors import BadInput

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_shipped_recipes_load_and_are_documented():
    readme = (CONFIGS / "README.md").read_text()
    expect = {"balanced-3.25bit.yaml": ("dp", "sensitivity", "3.25bit"),
              "paper-order-3.25bit.yaml": ("order", "lim", "3.25bit"),
              "quality-search-3.5bit.yaml": ("search", "sensitivity", "3.5bit"),
              "fast-rtn-4bit.yaml": ("order", "zd", "4.5bit")}
    for name, (solver, scorer, budget) in expect.items():
        r = load_recipe(CONFIGS / name)
        assert (r.solver, r.scorer, r.budget) == (solver, scorer, budget)
        assert f"`{name}`" in readme
        parse_budget(r.budget)
    assert load_recipe(CONFIGS / "balanced-3.25bit.yaml").backend == "gptq"
    assert load_recipe(CONFIGS / "fast-rtn-4bit.yaml").backend == "rtn"
    assert load_recipe(CONFIGS / "quality-search-3.5bit.yaml").options["generations"] == 30


def test_load_values(tmp_path):
    r = load_recipe(write(tmp_path, "budget: 3bit\nsolver: ilp\nbits: [2, 4]\ntie: fused\ngroup_size: -1\n"))
    assert r == Recipe(budget="3bit", solver="ilp", bits=(2, 4), tie="fused", group_size=-1)


@pytest.mark.parametrize("text,match", [
    ("budget: 3bit\nbudgte: 4bit\n", "unknown key\\(s\\) budgte"),
    ("budget: 3\n", "needs a unit, e.g. 3bit"),
    ("budget: 3zz\n", "not understood"),
    ("solver: magic\n", "unknown solver 'magic'"),
    ("bits: [2, 5]\n", "bits must be"),
    ("bits: []\n", "bits must be"),
    ("group_size: 100\n", "group_size must be"),
    ("sym: maybe\n", "sym must be"),
    ("nsamples: 0\n", "nsamples must be a positive integer"),
    ("seqlen: 1.5\n", "seqlen must be"),
    ("act_bits: 4\n", "act_bits must be"),
    ("solver: order\ntie: block\n", "needs solver dp or ilp"),
    ("target: nosuch\n", "target must be one of gptqmodel, transformers, vllm"),
    ("solver: search\ntarget: vllm\n", "target vllm ties fused shards"),
    ("solver: dp\noptions: {generations: 3}\n", "does not take option 'generations'"),
    ("solver: search\noptions: {evaluate: 1}\n", "does not take option 'evaluate'"),
    ("budget: [3bit\n", r"r.yaml:\d+:\d+: invalid YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_recipes(tmp_path, text, match):
    with pytest.raises(BadInput, match=match) as e:
        load_recipe(write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_merge_flags_override(tmp_path):
    r = load_recipe(CONFIGS / "balanced-3.25bit.yaml")
    m = merge(r, {"budget": "3.5bit", "solver": None, "bits": "2,4,8", "group_size": 64})
    assert (m.budget, m.solver, m.bits, m.group_size) == ("3.5bit", "dp", (2, 4, 8), 64)
    assert r.budget == "3.25bit"  # the recipe itself is unchanged (frozen)
    s = merge(load_recipe(CONFIGS / "quality-search-3.5bit.yaml"), {"options": {"generations": 3}})
    assert s.options["generations"] == 3 and s.options["offspring"] == 8
    with pytest.raises(BadInput, match="unknown recipe override"):
        merge(r, {"colour": "red"})
    with pytest.raises(BadInput, match="command line: .*budget"):
        merge(r, {"budget": "lots"})


def test_parse_bits():
    assert parse_bits("2, 3,4") == (2, 3, 4)
    assert parse_bits([4, 2, 4]) == (4, 2)
    with pytest.raises(BadInput):
        parse_bits("2,x")


def test_sym_auto_offers_both_grids_only_where_the_estimate_prices_them(tmp_path):
    from lwq.pipeline.plan import candidate_grids

    r = load_recipe(write(tmp_path, "budget: 3.25bit\nsym: auto\n"))
    assert r.sym is None and Recipe().sym is None and r.to_dict()["sym"] == "auto"
    assert merge(r, {"sym": None}).sym is None and merge(r, {"sym": True}).sym is True
    assert merge(Recipe(sym=False), {}).to_dict()["sym"] is False
    assert candidate_grids(r) == (False, True)  # sensitivity measures each candidate
    assert candidate_grids(Recipe(scorer="hessian")) == (False, True)
    assert candidate_grids(Recipe(scorer="lim", solver="order")) == (False,)  # importance x 4^-bits: blind to grids
    assert candidate_grids(Recipe(sym=True)) == (True,) and candidate_grids(Recipe(sym=False)) == (False,)
    with pytest.raises(BadInput, match="sym must be true, false or auto"):
        load_recipe(write(tmp_path, "sym: maybe\n"))
