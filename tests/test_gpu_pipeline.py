"""The GPU path of the pipeline (skipped without CUDA; run these on a GPU machine with
``pytest -m gpu``): deterministic GPTQ on the GPU, one block on the GPU at a time, planning that
keeps blocks off a GPU that is too small, and two GPU workers for the error database."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import save_tiny, word_text
from lwq.cli import run

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    save_tiny(root / "model", "llama", layers=16, hidden=256)
    (root / "calib.txt").write_text(word_text(4000))
    return root


def quantize(tiny, out, *extra):
    return run(["quantize", str(tiny / "model"), "-o", str(out), "--data", str(tiny / "calib.txt"), "--nsamples", "8",
                "--seqlen", "64", "--device", "cuda", "--quiet", *extra])


def close_estimates(a, b):
    """Two plans' per-layer estimates agree up to GPTQ's sensitivity to summation order."""
    scale = max(e["estimate"] for e in a.values())
    assert scale > 0 and a.keys() == b.keys()
    for n, e in a.items():
        assert abs(b[n]["estimate"] - e["estimate"]) <= 0.05 * abs(e["estimate"]) + 0.01 * scale, n


def shards(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


def test_gptq_on_gpu_is_byte_identical_across_runs(tiny, tmp_path):
    args = ("--bits", "3", "--backend", "gptq", "--group-size", "64", "--act-order")
    assert quantize(tiny, tmp_path / "a", *args) == 0
    assert quantize(tiny, tmp_path / "b", *args) == 0
    assert shards(tmp_path / "a") == shards(tmp_path / "b")


def test_gpu_holds_about_one_block(tiny, tmp_path):
    from lwq.pipeline.load import load_model
    from lwq.models.placement import model_bytes

    torch.cuda.reset_peak_memory_stats()
    assert quantize(tiny, tmp_path / "q", "--bits", "4", "--backend", "gptq") == 0
    peak = torch.cuda.max_memory_allocated()
    whole = model_bytes(load_model(str(tiny / "model"), "float16", "cpu"))
    assert peak < 0.5 * whole  # sixteen blocks plus embeddings never sit on the GPU together


def test_planning_keeps_blocks_off_a_small_gpu_with_the_same_plan(tiny, tmp_path, capsys):
    base = ["plan", str(tiny / "model"), "--data", str(tiny / "calib.txt"), "--json", "--nsamples", "4",
            "--seqlen", "64", "--device", "cuda", "--budget", "3.25bit", "--candidate-bits", "2,3,4"]
    assert run([*base, "-o", str(tmp_path / "a.json")]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert run([*base, "-o", str(tmp_path / "b.json"), "--max-memory", "1MB"]) == 0
    small = json.loads(capsys.readouterr().out)
    close_estimates(whole["layers"], small["layers"])


def test_two_gpu_workers_fill_the_same_error_database(tiny, tmp_path, capsys):
    if torch.cuda.device_count() < 2:
        devices = "cuda:0,cuda:0"  # two workers sharing one GPU still exercise the path
    else:
        devices = "cuda:0,cuda:1"
    base = ["plan", str(tiny / "model"), "--data", str(tiny / "calib.txt"), "--json", "--nsamples", "4",
            "--seqlen", "64", "--device", "cuda", "--budget", "3.25bit", "--candidate-bits", "2,3,4"]
    assert run([*base, "-o", str(tmp_path / "one.json"), "--error-db", str(tmp_path / "one-db.json")]) == 0
    assert run([*base, "-o", str(tmp_path / "two.json"), "--error-db", str(tmp_path / "two-db.json"),
                "--devices", devices]) == 0
    capsys.readouterr()
    one = json.loads((tmp_path / "one-db.json").read_text())["entries"]
    two = json.loads((tmp_path / "two-db.json").read_text())["entries"]
    assert one.keys() == two.keys()
    scale = max(v for row in one.values() for v in row.values())
    assert scale > 0
    for name, row in one.items():
        for key, value in row.items():
            assert abs(two[name][key] - value) <= 0.05 * abs(value) + 0.01 * scale, (name, key)


def test_eval_block_by_block_on_the_gpu_matches_whole(tiny, capsys):
    base = ["eval", str(tiny / "model"), "--data", str(tiny / "calib.txt"), "--seqlen", "64", "--max-samples", "8",
            "--device", "cuda", "--json"]
    assert run(base) == 0
    whole = json.loads(capsys.readouterr().out)
    assert run([*base, "--max-memory", "1MB"]) == 0
    blocks = json.loads(capsys.readouterr().out)
    assert blocks["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-3)
