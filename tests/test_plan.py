"""Plans: round trip, strict parsing with one-line errors, regex keys and default resolution, the PNG."""
from __future__ import annotations

import json

import pytest

from lwq.allocate import run_solver
from lwq.allocate.candidates import make_candidates, with_importance
from lwq.allocate.planfile import Plan, PlanEntry, load_plan, plan_from_allocation, reprice, save_plan
from lwq.allocate.plot import plot_bits
from lwq.errors import BadInput
from lwq.formats.bytes import layer_bytes
from lwq.spec import LayerSpec, make_spec

NAMES = [f"model.layers.{b}.{s}" for b in range(2) for s in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
SHAPES = {n: ((192, 512) if n.endswith("down_proj") else (192, 192)) for n in NAMES}


def solved_plan():
    layers = make_candidates(SHAPES, (2, 3, 4, 8), backend="gptq")
    layers = with_importance(layers, {n: float(i + 1) for i, n in enumerate(NAMES)})
    numel = sum(lc.numel for lc in layers)
    alloc = run_solver("dp", layers, int(3.5 * numel / 8))
    return layers, alloc, plan_from_allocation(layers, alloc, budget="3.5bit", scorer="lim")


def write(tmp_path, doc):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return p


def test_round_trip(tmp_path):
    layers, alloc, plan = solved_plan()
    assert plan.total_bytes == alloc.total_bytes and plan.bits_per_weight == pytest.approx(alloc.bits_per_weight)
    assert plan.bits_per_weight <= 3.5
    path = tmp_path / "sub" / "plan.json"
    save_plan(plan, path)
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["budget"] == "3.5bit" and doc["solver"] == "dp"
    assert doc["total_bytes"] == alloc.total_bytes and list(doc["layers"]) == NAMES
    first = doc["layers"][NAMES[0]]
    assert set(first) >= {"bits", "group_size", "sym", "backend", "format", "act_bits", "act_order", "cost_bytes",
                          "estimate"}
    back = load_plan(path, NAMES)
    assert back.specs == plan.specs and back.total_bytes == plan.total_bytes
    assert [e.estimate for e in back.layers.values()] == pytest.approx([e.estimate for e in plan.layers.values()])
    assert back.bits_per_weight == pytest.approx(plan.bits_per_weight)
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left behind


def test_regex_and_default_resolve_to_explicit_entries(tmp_path):
    doc = {"version": 1, "default": {"bits": 4, "group_size": 128, "backend": "gptq"},
           "layers": {"re:.*mlp\\.down_proj": {"bits": 8}, "re:.*layers\\.1\\..*": {"bits": 3},
                      NAMES[0]: {"bits": 2, "group_size": 64}}}
    plan = load_plan(write(tmp_path, doc), NAMES)
    assert list(plan.layers) == NAMES  # model order
    bits = {n: e.spec.bits for n, e in plan.layers.items()}
    assert bits == {NAMES[0]: 2, NAMES[1]: 4, NAMES[2]: 8, NAMES[3]: 3, NAMES[4]: 3, NAMES[5]: 8}
    assert plan.layers[NAMES[0]].spec.group_size == 64 and plan.layers[NAMES[0]].spec.backend == "gptq"
    assert plan.layers[NAMES[1]].spec == make_spec(4, 128, backend="gptq")
    priced = reprice(plan, SHAPES)
    assert priced.layers[NAMES[2]].cost_bytes == layer_bytes(192, 512, make_spec(8, backend="gptq"))
    assert priced.bits_per_weight is not None


def test_hand_edited_bits_get_matching_format_and_reprice(tmp_path):
    _, _, plan = solved_plan()
    save_plan(plan, tmp_path / "plan.json")
    doc = json.loads((tmp_path / "plan.json").read_text())
    doc["layers"][NAMES[1]] = {"bits": 16}
    edited = load_plan(write(tmp_path, doc), NAMES)
    assert edited.layers[NAMES[1]].spec.format == "fp16"
    assert reprice(edited, SHAPES).layers[NAMES[1]].cost_bytes == 2 * 192 * 192


@pytest.mark.parametrize("doc,match", [
    ('{"version": 1,\n  "layers": {,}}', r"plan.json:2:\d+: invalid JSON"),
    ({"version": 2, "layers": {NAMES[0]: {"bits": 4}}}, "version must be 1"),
    ({"version": 1, "layers": {"model.layers.0.self_attn.q_prj": {"bits": 4}}}, "did you mean"),
    ({"version": 1, "layers": {"encoder.x": {"bits": 4}}}, "unknown module 'encoder.x'; valid names include"),
    ({"version": 1, "layers": {NAMES[0]: {"bits": 5}}}, r"layers\['model.layers.0.self_attn.q_proj'\]: bits must"),
    ({"version": 1, "layers": {NAMES[0]: {"bits": "4"}}}, "bits must be an integer"),
    ({"version": 1, "layers": {NAMES[0]: {"bits": 4, "sym": "no"}}}, "sym must be bool"),
    ({"version": 1, "layers": {NAMES[0]: {"bits": 4, "colour": 1}}}, "unknown key"),
    ({"version": 1, "layers": {NAMES[0]: {"bits": 4}}}, "5 layer\\(s\\) missing"),
    ({"version": 1, "layers": {NAMES[0]: 4}}, "expected an object"),
    ({"version": 1, "layers": {}}, "non-empty"),
    ({"version": 1, "layers": {NAMES[0]: {"bits": 4, "cost_bytes": "x"}}}, "cost_bytes must be an integer"),
    ({"version": 1, "lay": {}}, "unknown key"),
    ({"version": 1, "default": {"bits": 4}, "layers": {"re:(": {"bits": 8}}}, "bad regular expression"),
    ({"version": 1, "default": {"bits": 4}, "layers": {"re:.*gate_proj": {"bits": 8}}}, "matches no module"),
    ([1, 2], "expected a JSON object"),
    ('{"version": 1, "layers": {"a": {"bits": 4}, "a": {"bits": 8}}}', "'a' appears twice"),
])
def test_strict_errors(tmp_path, doc, match):
    with pytest.raises(BadInput, match=match) as e:
        load_plan(write(tmp_path, doc), NAMES)
    assert "\n" not in str(e.value)


def test_regex_needs_names_and_missing_file(tmp_path):
    doc = {"version": 1, "default": {"bits": 4}, "layers": {}}
    with pytest.raises(BadInput, match="need the model's layer names"):
        load_plan(write(tmp_path, doc), None)
    assert len(load_plan(write(tmp_path, doc), NAMES).layers) == len(NAMES)
    with pytest.raises(BadInput, match="no such plan"):
        load_plan(tmp_path / "nope.json")


def test_plot_bits_writes_png(tmp_path):
    _, _, plan = solved_plan()
    mixed = Plan({**plan.layers, NAMES[0]: PlanEntry(LayerSpec(bits=16, format="fp16"), 2 * 192 * 192, 0.0, 192 * 192)},
                 budget="3.5bit", solver="dp")
    out = plot_bits(mixed, tmp_path / "bits.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
