"""The measured-error database on several devices: task splitting, worker processes (two CPU
workers stand in for two GPUs: the same code path, ``spawn`` and all), errors from workers, and
``--devices`` on ``lwq plan`` / ``lwq quantize``."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import save_tiny, word_text
from lwq.allocate.candidates import spec_key
from lwq.cli import run
from lwq.errors import BadInput, LwqError
from lwq.score.workers import MeasureTask, ModelSource, make_tasks, measure_local, measure_parallel, parse_devices
from lwq.models.arch import linear_names
from lwq.pipeline.load import load_model
from lwq.spec import make_spec

SPECS = [make_spec(2, 32), make_spec(4, 32)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("measure")
    save_tiny(root / "model", "llama", layers=3)
    (root / "calib.txt").write_text(word_text(3000))
    return root


def block_of(name: str) -> int:
    return int(name.split(".")[2])


def test_make_tasks_cover_every_pair_once_biggest_first():
    names = [f"model.layers.{b}.{rel}" for b in range(4) for rel in ("q", "k", "v")]
    todo = {SPECS[0]: names, SPECS[1]: names[3:]}
    tasks = make_tasks(todo, block_of, 4)
    pairs = [(t.spec, n) for t in tasks for n in t.names]
    assert len(pairs) == len(set(pairs)) == len(names) + len(names) - 3
    assert all(block_of(n) == t.block for t in tasks for n in t.names)
    costs = [(4 - t.block) * len(t.names) for t in tasks]
    assert costs == sorted(costs, reverse=True) and tasks[0].block == 0


def test_two_workers_measure_what_one_process_measures(tiny):
    model = load_model(str(tiny / "model"), "float32", "cpu")
    names = linear_names(model)
    samples = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    tasks = make_tasks({sp: names for sp in SPECS}, block_of, 3)
    steps: list[tuple[int, int]] = []
    local = measure_local(model, samples, tasks)
    par = measure_parallel(ModelSource(str(tiny / "model"), "float32"), samples, tasks, ["cpu", "cpu"],
                           lambda i, n: steps.append((i, n)))
    keys = {spec_key(sp) for sp in SPECS}
    assert set(par) == set(local) == set(names) and all(set(v) == keys for v in par.values())
    for name in names:
        for k in keys:
            assert par[name][k] == pytest.approx(local[name][k], rel=1e-4, abs=1e-9)
            assert par[name][k] >= 0
        assert par[name][spec_key(SPECS[0])] > par[name][spec_key(SPECS[1])]
    assert steps == [(i + 1, len(tasks)) for i in range(len(tasks))]


def test_worker_failure_is_one_error_with_its_exit_code(tiny):
    samples = torch.randint(0, 128, (2, 16))
    tasks = [MeasureTask(SPECS[0], 0, ("model.layers.0.self_attn.q_proj",))]
    with pytest.raises(LwqError, match=r"measuring on cpu failed: no such model path") as info:
        measure_parallel(ModelSource(str(tiny / "missing")), samples, tasks, ["cpu", "cpu"])
    assert info.value.exit_code == 2
    assert measure_parallel(ModelSource(str(tiny / "missing")), samples, [], ["cpu", "cpu"]) == {}


def test_parse_devices():
    assert parse_devices(None) == [] and parse_devices("") == []
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]
    with pytest.raises(BadInput, match="invalid device"):
        parse_devices("cpu,gpu9")
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="no CUDA GPU"):
            parse_devices("all")
        with pytest.raises(BadInput, match="no CUDA GPU"):
            parse_devices("cuda:0,cuda:1")


@pytest.mark.parametrize("trials", ["rtn", "backend"])
def test_plan_cli_with_devices_matches_single_process(tiny, tmp_path, capsys, trials):
    """RTN trials agree to float noise; GPTQ trials (the default) to within GPTQ's sensitivity to
    summation order (the workers run with fewer threads), far below the gaps between candidates."""
    base = ["plan", str(tiny / "model"), "--data", str(tiny / "calib.txt"), "--json", "--nsamples", "4",
            "--seqlen", "24", "--device", "cpu", "--budget", "3.25bit", "--candidate-bits", "2,3,4",
            "--measure-with", trials]
    assert run([*base, "-o", str(tmp_path / "one.json"), "--error-db", str(tmp_path / "one-db.json")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert run([*base, "-o", str(tmp_path / "two.json"), "--error-db", str(tmp_path / "two-db.json"),
                "--devices", "cpu,cpu"]) == 0, capsys.readouterr().err
    two = json.loads(capsys.readouterr().out)
    db1 = json.loads((tmp_path / "one-db.json").read_text())
    db2 = json.loads((tmp_path / "two-db.json").read_text())
    assert db1["meta"]["trials"] == db2["meta"]["trials"] == trials
    assert db1["entries"].keys() == db2["entries"].keys()
    gap = max(r["gptq w2 g128|gptq"] - r["gptq w4 g128|gptq"] for r in db1["entries"].values())
    assert gap > 0
    for name, row in db1["entries"].items():
        for key, value in row.items():
            slack = 1e-4 * abs(value) + 1e-12 if trials == "rtn" else 0.2 * abs(value) + 0.02 * gap
            assert abs(db2["entries"][name][key] - value) <= slack, (name, key)
    if trials == "rtn":
        assert {n: e["bits"] for n, e in two["layers"].items()} == {n: e["bits"] for n, e in one["layers"].items()}


def test_error_db_of_other_trials_is_refused(tiny, tmp_path, capsys):
    base = ["plan", str(tiny / "model"), "--data", str(tiny / "calib.txt"), "--json", "--nsamples", "4",
            "--seqlen", "24", "--device", "cpu", "--budget", "3.25bit", "--candidate-bits", "2,4",
            "--error-db", str(tmp_path / "db.json")]
    assert run([*base, "-o", str(tmp_path / "a.json"), "--measure-with", "rtn"]) == 0
    capsys.readouterr()
    assert run([*base, "-o", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "measured with rtn trials, not backend" in err and "\n" not in err
    assert not (tmp_path / "b.json").exists()
    assert run([*base, "-o", str(tmp_path / "c.json"), "--measure-with", "bogus"]) == 2
    assert "measure_with must be one of backend, rtn" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["plan", "{m}", "-o", "{o}", "--budget", "3bit", "--devices", "cuda:7"], "CUDA|does not exist"),
    (["quantize", "{m}", "-o", "{o}", "--bits", "4", "--devices", "cpu,cpu"], "needs --budget"),
    (["plan", "{m}", "-o", "{o}", "--budget", "3bit", "--devices", "tpu"], "invalid device"),
])
def test_bad_devices_are_one_line_errors(tiny, tmp_path, capsys, argv, message):
    import re

    out = tmp_path / "out"
    args = [a.format(m=tiny / "model", o=out) for a in argv]
    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(message, err)
    assert not out.exists()


def test_a_killed_worker_stops_the_run_with_one_error(tiny):
    import multiprocessing
    import os
    import signal

    model = load_model(str(tiny / "model"), "float32", "cpu")
    samples = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    tasks = make_tasks({sp: linear_names(model) for sp in SPECS}, block_of, 3)

    def kill_workers(done, _total):
        if done == 1:
            for p in multiprocessing.active_children():
                os.kill(p.pid, signal.SIGKILL)

    with pytest.raises(LwqError, match=r"measuring worker died on cpu \(exit -9\).* task\(s\) left") as info:
        measure_parallel(ModelSource(str(tiny / "model"), "float32"), samples, tasks, ["cpu", "cpu"], kill_workers)
    assert info.value.exit_code == 1
    assert not multiprocessing.active_children()


def test_probe_quantizer_hook_gets_hessians_and_gptq_beats_rtn(tiny):
    from lwq.backends.quant import rtn_fake_quant
    from lwq.score.trials import backend_quantizer
    from lwq.score.workers import run_task
    from lwq.models.arch import linear_weight
    from lwq.score.sensitivity import SensitivityProbe

    model = load_model(str(tiny / "model"), "float32", "cpu")
    samples = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    probe = SensitivityProbe(model, samples, batch_size=2)
    names = list(probe.units("linear"))
    seen = {}

    def identity(W, H):
        seen[tuple(W.shape)] = H
        assert H.shape == (W.shape[1], W.shape[1]) and torch.allclose(H, H.t())
        assert torch.linalg.eigvalsh(H.double()).min() > -1e-6  # XᵀX/n is positive semi-definite
        return W

    assert set(probe.measure(names, "linear", quantizer=identity).values()) == {0.0}
    assert len(seen) >= 3  # attention, o_proj and MLP inputs have their own shapes
    rtn = probe.measure(names, "linear", bits=2, group_size=32)
    same = probe.measure(names, "linear", quantizer=lambda W, H: rtn_fake_quant(W, 2, 32))
    assert same == pytest.approx(rtn, rel=1e-6)
    spec = make_spec(2, 32, backend="gptq")
    rtn_spec = make_spec(2, 32)
    W = linear_weight(model.get_submodule(names[0])).detach().float()
    stored = backend_quantizer(rtn_spec)(W, torch.eye(W.shape[1]))  # the rtn backend, packed and read back
    same = torch.isclose(stored, rtn_fake_quant(W, 2, 32), rtol=1e-2, atol=1e-3).float().mean()
    assert same > 0.95  # fp16-rounded scales move a few values across a rounding boundary
    assert len(torch.unique(stored[0, :32])) <= 4  # a 2-bit grid per group
    task = MeasureTask(spec, 0, tuple(n for n in names if ".0." in n))
    gptq = run_task(probe, task, follow_backend=True)
    plain = run_task(probe, task)
    assert plain == pytest.approx({n: rtn[n] for n in task.names}, rel=1e-6)
    assert sum(gptq.values()) < sum(plain.values())  # GPTQ's error feedback lowers the damage


def test_quantize_budget_with_devices_writes_the_same_checkpoint(tiny, tmp_path, capsys):
    base = ["quantize", str(tiny / "model"), "--data", str(tiny / "calib.txt"), "--json", "--nsamples", "4",
            "--seqlen", "24", "--device", "cpu", "--budget", "3.25bit", "--candidate-bits", "2,3,4",
            "--group-size", "32", "--measure-with", "rtn"]
    assert run([*base, "-o", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    one = json.loads(capsys.readouterr().out)
    assert run([*base, "-o", str(tmp_path / "two"), "--devices", "cpu,cpu"]) == 0, capsys.readouterr().err
    two = json.loads(capsys.readouterr().out)
    assert two["bits_per_weight"] == one["bits_per_weight"] <= 3.25
    plans = [json.loads((tmp_path / d / "plan.json").read_text())["layers"] for d in ("one", "two")]
    assert {n: e["bits"] for n, e in plans[0].items()} == {n: e["bits"] for n, e in plans[1].items()}
    assert ((tmp_path / "two" / "model.safetensors").read_bytes()
            == (tmp_path / "one" / "model.safetensors").read_bytes())
