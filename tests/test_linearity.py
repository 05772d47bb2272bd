"""The linearity estimate (``--scorer linearity``): Fisher-measured coefficients against direct noise
injection, a_l * t**2 per candidate, the database round trip and its refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import save_tiny, tiny_model, word_text
from lwq.allocate.candidates import load_error_db, make_candidates, save_error_db
from lwq.cli import run
from lwq.errors import BadInput
from lwq.score.trials import backend_quantizer
from lwq.models.arch import model_shapes
from lwq.score.fisher import noise_like as _noise
from lwq.score.linearity import linearity_coefficients, linearity_errors, relative_error

IDS = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def direct_kl(model, name: str, seeds=range(100, 106), level: float = 0.05) -> float:
    """Mean next-token KL per token with seeded noise of relative size ``level`` on one layer, / level**2."""
    mod = model.get_submodule(name)
    W = mod.weight.data.clone()
    out = []
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=IDS).logits[:, :-1].float(), -1)
        for s in seeds:
            mod.weight.data = W + _noise(W, [s], level)[0]
            lp = torch.log_softmax(model(input_ids=IDS).logits[:, :-1].float(), -1)
            out.append(float((ref.exp() * (ref - lp)).sum(-1).mean()) / level**2)
        mod.weight.data = W
    return sum(out) / len(out)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_coefficients_track_direct_noise_injection():
    model = tiny_model("llama")
    coeffs = linearity_coefficients(model, IDS)
    names = list(coeffs)
    direct = [direct_kl(model, n) for n in names]
    assert spearman([coeffs[n] for n in names], direct) >= 0.8
    big = max(range(len(names)), key=lambda i: direct[i])
    assert 0.33 < coeffs[names[big]] / direct[big] < 3.0  # the same quantity, to sampling noise


def test_a_scaled_up_layer_is_more_sensitive():
    model = tiny_model("llama")
    name = "model.layers.1.self_attn.v_proj"
    before = linearity_coefficients(model, IDS, [name])[name]
    with torch.no_grad():
        model.get_submodule(name).weight.mul_(4.0)  # the same relative noise is now 4x larger in absolute size
    after = linearity_coefficients(model, IDS, [name])[name]
    assert after > 2.0 * before


@pytest.fixture()
def planned(tmp_path):
    model = tiny_model("llama")
    layers = make_candidates(model_shapes(model), (2, 4), "gptq", 32)
    out, db = linearity_errors(model, IDS, layers)
    return model, layers, out, db


def test_candidate_error_is_coefficient_times_relative_error(planned):
    model, layers, out, db = planned
    lc = next(x for x in out if x.name == "model.layers.0.mlp.up_proj")
    x = []
    hook = model.get_submodule(lc.name).register_forward_hook(
        lambda _m, a, _o: x.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=IDS[:16])
    hook.remove()
    X = torch.cat(x).float()
    W = model.get_submodule(lc.name).weight.detach().float()
    for c in lc.candidates:
        t2 = relative_error(W, backend_quantizer(c.spec)(W, X.t() @ X))
        assert c.error == pytest.approx(db.meta["coefficients"][lc.name] * t2, rel=1e-6)
    assert db.meta["estimate"] == "linearity" and db.meta["levels"] == [0.05] and db.meta["seeds"] == [0, 1, 2, 3]
    two, four = (c.error for c in lc.candidates)
    assert two > four > 0


def test_database_round_trip_and_refusals(planned, tmp_path, monkeypatch):
    model, layers, out, db = planned
    path = tmp_path / "db.json"
    save_error_db(db, path)
    again = load_error_db(path)
    import lwq.score.linearity as lin

    monkeypatch.setattr(lin, "fisher_pass", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    reused, _ = linearity_errors(model, IDS, layers, again)
    assert [c.error for lc in reused for c in lc.candidates] == [c.error for lc in out for c in lc.candidates]
    with pytest.raises(BadInput, match="do not match this run"):
        linearity_errors(model, IDS, layers, again, trials="rtn")
    from lwq.allocate.candidates import ErrorDB

    measured = ErrorDB({"model.layers.0.mlp.up_proj": {"x": 1.0}}, {"trials": "backend"})
    with pytest.raises(BadInput, match="holds sensitivity estimates, not linearity"):
        linearity_errors(model, IDS, layers, measured)


def test_cli_plans_with_linearity_and_refuses_a_foreign_database(tmp_path, capsys):
    save_tiny(tmp_path / "m", "llama")
    (tmp_path / "t.txt").write_text(word_text(3000))
    base = ["plan", str(tmp_path / "m"), "--budget", "3.5bit", "--data", str(tmp_path / "t.txt"), "--nsamples", "4",
            "--seqlen", "32", "--group-size", "32", "--device", "cpu", "--quiet"]
    assert run([*base, "--scorer", "linearity", "-o", str(tmp_path / "p.json"), "--error-db",
                str(tmp_path / "lin.json"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["scorer"] == "linearity" and doc["bits_per_weight"] <= 3.5
    assert json.loads((tmp_path / "lin.json").read_text())["meta"]["estimate"] == "linearity"
    assert run([*base, "-o", str(tmp_path / "q.json"), "--error-db", str(tmp_path / "lin.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds linearity estimates, not measured sensitivity" in err
    assert run(["score", str(tmp_path / "m"), "--method", "linearity", "--data", str(tmp_path / "t.txt"),
                "--nsamples", "4", "--seqlen", "32", "--granularity", "linear", "--json", "--quiet"]) == 0
    scores = json.loads(capsys.readouterr().out)["layers"]
    assert len(scores) == 14 and all(s["scores"]["linearity"] > 0 for s in scores)


def whole_model_sums(model, ids, names, seeds=(0, 1, 2, 3), level=0.05):
    """The Fisher sums by one backward pass through the whole model (the reference for the block sweep)."""
    from lwq.score.fisher import LABEL_SEED, quadratic

    mods = {n: model.get_submodule(n) for n in names}
    xs, ys = {}, {}

    def keep(name):
        def hook(_m, args, out):
            xs[name], ys[name] = args[0].detach(), out
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in mods.items()]
    for p in model.parameters():
        p.requires_grad_(False)
    sums = {n: torch.zeros(len(seeds), dtype=torch.float64) for n in names}
    try:
        for w in range(ids.shape[0]):
            emb = model.get_input_embeddings()(ids[w:w + 1]).requires_grad_(True)
            logits = model(inputs_embeds=emb).logits[:, :-1].float()
            probs = torch.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1])
            y = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(LABEL_SEED + w)).reshape(1, -1)
            logp = torch.log_softmax(logits, -1).gather(-1, y[..., None]).sum()
            grads = torch.autograd.grad(logp, [ys[n] for n in names])
            for n, g in zip(names, grads):
                sums[n] += quadratic(xs[n], g, _noise(mods[n].weight.detach(), seeds, level)).double()
    finally:
        for h in hooks:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    return sums


def test_block_sweep_equals_the_whole_model_backward_pass():
    from lwq.score.fisher import fisher_pass

    model = tiny_model("llama")
    names = [n for n in model_shapes(model)]
    ref = whole_model_sums(model, IDS[:4], names)
    got = fisher_pass(model, IDS[:4], names, seeds=(0, 1, 2, 3))
    assert got.tokens == 4 * 31 and set(got.sums) == set(names)
    for n in names:
        assert torch.allclose(got.sums[n], ref[n], rtol=1e-4), n
    assert all(p.requires_grad for p in model.parameters())  # left as found


def test_offloaded_and_parallel_linearity_match_the_resident_model(tmp_path):
    from lwq.score.workers import ModelSource, ParallelMeasure
    from lwq.models.lazy import lazy_or_whole
    from lwq.models.placement import offload

    folder = save_tiny(tmp_path / "m", "llama")
    model = tiny_model("llama")
    layers = make_candidates(model_shapes(model), (2, 4), "gptq", 32)
    ref, ref_db = linearity_errors(model, IDS, layers)
    lazy, loader, how = lazy_or_whole(str(folder), "float32", "cpu")
    assert loader is not None, how
    assert any(p.is_meta for p in lazy.parameters())  # blocks stay on disk until their turn
    placement = offload(lazy, torch.device("cpu"), loader)
    off, off_db = linearity_errors(lazy, IDS, layers, placement=placement)
    steps = []
    par, par_db = linearity_errors(model, IDS, layers, on_step=lambda i, n: steps.append((i, n)),
                                   parallel=ParallelMeasure(ModelSource(str(folder), "float32"), ("cpu", "cpu")))
    assert steps == [(1, 2), (2, 2)]
    for other, db in ((off, off_db), (par, par_db)):
        for lc, lo in zip(ref, other):
            for c, o in zip(lc.candidates, lo.candidates):
                assert o.error == pytest.approx(c.error, rel=1e-4), (lc.name, c.spec)
        assert db.meta["coefficients"].keys() == ref_db.meta["coefficients"].keys()
