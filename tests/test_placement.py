"""Planning on a model larger than its device: blocks kept in CPU memory or read from disk for their
turn give the same measurements, KL and plans as a model held whole (on CPU the device is the CPU;
"does not fit" is forced by pretending the device has no free memory)."""
from __future__ import annotations

import json
import queue

import pytest
import torch

from helpers import save_tiny, word_text
from lwq.allocate.candidates import spec_key
from lwq.models.blocks import ResidentBlocks
from lwq.cli import run
from lwq.score.workers import ModelSource, _sensitivity_runner, _worker, make_tasks, measure_local
from lwq.models.arch import get_blocks, linear_names
from lwq.models.lazy import LazyBlocks, load_lazy
from lwq.pipeline.load import load_model
from lwq.models.placement import Placement, fits, model_bytes, place
from lwq.score.measured import KlEvaluator
from lwq.score.sensitivity import SensitivityProbe
from lwq.spec import make_spec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    save_tiny(root / "model", "llama", layers=3)
    (root / "calib.txt").write_text(word_text(3000))
    return root


@pytest.fixture(scope="module")
def samples():
    return torch.randint(0, 128, (5, 20), generator=torch.Generator().manual_seed(3))


def spy_place(monkeypatch) -> list[Placement]:
    """Record every placement ``lwq.models.placement.place`` decides from now on."""
    placed: list[Placement] = []
    monkeypatch.setattr("lwq.models.placement.place", lambda *a, _p=place: placed.append(_p(*a)) or placed[-1])
    return placed


def no_room(monkeypatch):
    monkeypatch.setattr("lwq.models.placement.free_bytes", lambda _device: 1)


def test_fits_and_model_bytes(tiny):
    assert fits(10**12, None) and fits(80, 100) and not fits(81, 100) and not fits(50, 100, fraction=0.4)
    model = load_model(str(tiny / "model"), "float32", "cpu")
    skeleton, _ = load_lazy(str(tiny / "model"), "float32", "cpu")
    n = sum(p.numel() for p in model.parameters()) * 4
    assert model_bytes(model) >= n and model_bytes(skeleton) == model_bytes(model)  # meta counts by shape


def test_place_keeps_blocks_off_a_full_device(tiny, monkeypatch):
    model = load_model(str(tiny / "model"), "float32", "cpu")
    assert place(model, CPU) == Placement(CPU)
    skeleton, loader = load_lazy(str(tiny / "model"), "float32", "cpu")
    whole = place(skeleton, CPU, loader)
    assert whole == Placement(CPU) and not any(p.is_meta for p in skeleton.parameters())
    no_room(monkeypatch)
    resident = place(load_model(str(tiny / "model"), "float32", "cpu"), CPU)
    assert resident.offloaded and isinstance(resident.loader, ResidentBlocks)
    skeleton, loader = load_lazy(str(tiny / "model"), "float32", "cpu")
    lazy = place(skeleton, CPU, loader)
    assert lazy.loader is loader and all(p.is_meta for p in get_blocks(skeleton)[0].parameters())


@pytest.mark.parametrize("granularity", ["linear", "block"])
def test_probe_from_disk_or_cpu_memory_measures_the_same(tiny, samples, granularity):
    model = load_model(str(tiny / "model"), "float32", "cpu")
    ref = SensitivityProbe(model, samples, batch_size=2)
    names = list(ref.units(granularity))
    want = ref.measure(names, granularity, bits=2, group_size=32)
    resident = SensitivityProbe(model, samples, batch_size=2, device=CPU, loader=ResidentBlocks("cpu"))
    skeleton, loader = load_lazy(str(tiny / "model"), "float32", "cpu")
    lazy = SensitivityProbe(skeleton, samples, batch_size=2, device=CPU, loader=loader)
    assert all(p.is_meta for b in get_blocks(skeleton) for p in b.parameters())  # read per turn, then dropped
    for probe in (resident, lazy):
        got = probe.measure(list(reversed(names)), granularity, bits=2, group_size=32)
        assert list(got) == list(reversed(names))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert all(v > 0 for v in want.values())


def test_kl_evaluator_offloaded_matches_whole(tiny, samples):
    model = load_model(str(tiny / "model"), "float32", "cpu")
    names = linear_names(model)
    plan = {n: make_spec(2 if i % 2 else 4, 32, backend="rtn") for i, n in enumerate(names)}
    whole = KlEvaluator(model, samples, batch_size=2)
    off = KlEvaluator(model, samples, batch_size=2, device=CPU, loader=ResidentBlocks("cpu"))
    full = int(samples.numel())
    assert off(plan, full) == pytest.approx(whole(plan, full), rel=1e-6) and whole(plan, full) > 0
    late = {n: s for n, s in plan.items() if ".2." in n}  # only the last block: trials start there
    assert 0 < whole(late, full) < whole(plan, full)
    assert off(late, 20) == pytest.approx(whole(late, 20), rel=1e-6)


def test_worker_reads_blocks_from_disk_when_the_device_is_full(tiny, samples, monkeypatch):
    """The worker loop, run in this process so the full device can be faked."""
    model = load_model(str(tiny / "model"), "float32", "cpu")
    names = linear_names(model)
    tasks = make_tasks({make_spec(2, 32): names}, lambda n: int(n.split(".")[2]), 3)
    want = measure_local(model, samples, tasks)
    no_room(monkeypatch)
    placed = spy_place(monkeypatch)
    todo, results = queue.Queue(), queue.Queue()
    for item in enumerate(tasks):
        todo.put(item)
    todo.put(None)
    _worker(ModelSource(str(tiny / "model"), "float32"), "cpu", 2, _sensitivity_runner, (samples, False), todo, results)
    got: dict[str, float] = {}
    while not results.empty():
        msg = results.get()
        assert msg[0] == "ok", msg
        got.update(msg[2])
    assert len(placed) == 1 and isinstance(placed[0].loader, LazyBlocks)
    key = spec_key(make_spec(2, 32))
    assert got == pytest.approx({n: v[key] for n, v in want.items()}, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("extra", [[], ["--solver", "search"], ["--scorer", "hessian"]])
def test_plan_cli_offloaded_gives_the_same_plan(tiny, tmp_path, capsys, monkeypatch, extra):
    base = ["plan", str(tiny / "model"), "--data", str(tiny / "calib.txt"), "--json", "--nsamples", "4",
            "--seqlen", "20", "--device", "cpu", "--budget", "3.25bit", "--candidate-bits", "2,3,4", *extra]
    assert run([*base, "-o", str(tmp_path / "whole.json")]) == 0, capsys.readouterr().err
    whole = json.loads(capsys.readouterr().out)
    no_room(monkeypatch)
    placed = spy_place(monkeypatch)
    assert run([*base, "-o", str(tmp_path / "off.json")]) == 0, capsys.readouterr().err
    off = json.loads(capsys.readouterr().out)
    assert [p.offloaded for p in placed] == [True]
    assert {n: e["bits"] for n, e in off["layers"].items()} == {n: e["bits"] for n, e in whole["layers"].items()}
    for n, e in whole["layers"].items():
        assert off["layers"][n]["estimate"] == pytest.approx(e["estimate"], rel=1e-5, abs=1e-12)


def test_budgeted_quantize_plans_from_disk_when_memory_is_short(tiny, tmp_path, capsys, monkeypatch):
    args = ["quantize", str(tiny / "model"), "--budget", "3.25bit", "--candidate-bits", "2,3,4", "--group-size", "32",
            "--data", str(tiny / "calib.txt"), "--nsamples", "4", "--seqlen", "20", "--device", "cpu", "--json"]
    assert run([*args, "-o", str(tmp_path / "ref")]) == 0, capsys.readouterr().err
    ref = json.loads(capsys.readouterr().out)
    no_room(monkeypatch)
    placed = spy_place(monkeypatch)
    assert run([*args, "-o", str(tmp_path / "low")]) == 0, capsys.readouterr().err
    low = json.loads(capsys.readouterr().out)
    assert len(placed) == 1 and isinstance(placed[0].loader, LazyBlocks)  # planning read blocks from disk
    assert ref["loader"] == low["loader"] == "lazy"  # and so did quantizing, in both runs
    assert low["bits_per_weight"] <= 3.25 and low["bits_per_weight"] == ref["bits_per_weight"]
    for name in ("plan.json", "model.safetensors"):
        assert (tmp_path / "low" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_max_memory_option_keeps_blocks_off_the_device(tiny, tmp_path, capsys, monkeypatch):
    placed = spy_place(monkeypatch)
    base = ["plan", str(tiny / "model"), "--data", str(tiny / "calib.txt"), "--json", "--nsamples", "4",
            "--seqlen", "20", "--device", "cpu", "--budget", "3.5bit"]
    assert run([*base, "-o", str(tmp_path / "a.json"), "--max-memory", "1KiB"]) == 0, capsys.readouterr().err
    assert isinstance(placed[-1].loader, LazyBlocks)
    assert run([*base, "-o", str(tmp_path / "b.json"), "--max-memory", "1GB"]) == 0, capsys.readouterr().err
    assert placed[-1] == Placement(CPU)
    capsys.readouterr()
    for bad in ("3bit", "lots", "0.5x", "-1GB"):
        assert run([*base, "-o", str(tmp_path / "c.json"), "--max-memory", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --max-memory") and "\n" not in err
    assert not (tmp_path / "c.json").exists()


def test_free_bytes_reads_the_host_memory_for_the_cpu():
    from lwq.models.placement import free_bytes

    free = free_bytes(CPU)
    if free is None:
        pytest.skip("no /proc/meminfo here")
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert 0 < free <= total
    assert free_bytes(torch.device("meta")) is None
