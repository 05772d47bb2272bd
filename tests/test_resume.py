"""Resume after a kill (``lwq.pipeline.workdir``): a run killed after block k and continued with ``--resume``
writes exactly the bytes of an uninterrupted run; SIGINT exits 130 and keeps the work folder."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from helpers import PROJECT, interrupt_after_block, run_killed_after_block, save_tiny, word_text
from lwq.cli import run
from lwq.formats.folder import sha256_file
from lwq.pipeline.workdir import work_dir

GPTQ = ["--bits", "3", "--backend", "gptq", "--nsamples", "8", "--seqlen", "32", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save_tiny(root / "model", "llama", layers=4)
    (root / "calib.txt").write_text(word_text(3000))
    return root


def shards(folder) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference(tiny):
    """An uninterrupted GPTQ run (the bytes every resumed run must reproduce)."""
    out = tiny / "reference"
    assert run(["quantize", str(tiny / "model"), "-o", str(out), "--data", str(tiny / "calib.txt"), *GPTQ]) == 0
    return shards(out)


def args(tiny, out, *extra):
    return ["quantize", str(tiny / "model"), "-o", str(out), "--data", str(tiny / "calib.txt"), *GPTQ, *extra]


def test_sigkill_after_block_then_resume_is_byte_identical(tiny, reference, tmp_path):
    out = tmp_path / "q"
    proc = run_killed_after_block(1, args(tiny, out), env={**os.environ, "PYTHONPATH": str(PROJECT)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    state = json.loads((work_dir(out) / "state.json").read_text())
    assert state["next_block"] == 2
    assert (work_dir(out) / "inputs-00002.safetensors").is_file()
    assert run(args(tiny, out, "--resume", "--json")) == 0
    assert shards(out) == reference
    assert not work_dir(out).exists()


def test_sigint_exits_130_keeps_progress_and_resumes(tiny, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    resume_blocks = interrupt_after_block(monkeypatch, 2)
    assert run(args(tiny, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: interrupted after 3 of 4 blocks") and "--resume" in err[0]
    assert json.loads((work_dir(out) / "state.json").read_text())["next_block"] == 3
    resume_blocks()
    # without --resume (or --force) the unfinished run is protected
    assert run(args(tiny, out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert run(args(tiny, out, "--resume")) == 0
    assert shards(out) == reference


def test_resume_with_other_arguments_is_refused(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    resume_blocks = interrupt_after_block(monkeypatch, 0)
    assert run(args(tiny, out)) == 130
    resume_blocks()
    capsys.readouterr()
    assert run(args(tiny, out, "--resume", "--seed", "5")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different run" in err[0] and "seed" in err[0]
    # --force starts over and the run completes
    assert run(args(tiny, out, "--force")) == 0
    assert out.is_dir() and not work_dir(out).exists()


def test_resume_without_a_work_folder_just_runs(tiny, reference, tmp_path):
    out = tmp_path / "q"
    assert run(args(tiny, out, "--resume")) == 0
    assert shards(out) == reference


def test_eager_resume_restores_a_usable_model(tiny, tmp_path):
    """The API path with the model fully in memory: the resumed model computes what the
    uninterrupted one does and the files match."""
    from lwq.errors import LwqError
    from lwq.models.arch import linear_names
    from lwq.pipeline import LoadOptions, quantize_to_checkpoint
    from lwq.spec import make_spec

    spec = make_spec(4, 32, backend="gptq")
    common = dict(plan=lambda m: {n: spec for n in linear_names(m)}, data=str(tiny / "calib.txt"), nsamples=8,
                  seqlen=32, load=LoadOptions(device="cpu"))
    ref = quantize_to_checkpoint(str(tiny / "model"), str(tmp_path / "ref"), **common)

    def stop(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(LwqError) as info:
        quantize_to_checkpoint(str(tiny / "model"), str(tmp_path / "q"), on_block=stop, **common)
    assert info.value.exit_code == 130
    res = quantize_to_checkpoint(str(tiny / "model"), str(tmp_path / "q"), resume=True, **common)
    assert res.summary["resumed_from_block"] == 2
    assert shards(tmp_path / "q") == shards(tmp_path / "ref")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(res.model(ids).logits, ref.model(ids).logits)


def test_rtn_resume_needs_no_inputs(tiny, tmp_path, monkeypatch):
    out, ref = tmp_path / "q", tmp_path / "ref"
    rtn = ["--bits", "4", "--group-size", "32", "--device", "cpu", "--quiet"]
    assert run(["quantize", str(tiny / "model"), "-o", str(ref), *rtn]) == 0
    resume_blocks = interrupt_after_block(monkeypatch, 1)
    assert run(["quantize", str(tiny / "model"), "-o", str(out), *rtn]) == 130
    assert not list(work_dir(out).glob("inputs-*"))
    resume_blocks()
    assert run(["quantize", str(tiny / "model"), "-o", str(out), *rtn, "--resume"]) == 0
    assert shards(out) == shards(ref)


@pytest.mark.slow
def test_budget_resume_reuses_the_saved_plan(tiny, tmp_path, monkeypatch):
    import lwq.pipeline.quantize as pipeline  # where quantize_with_budget looks plan_for_model up

    budget = ["--budget", "4.2bit", "--scorer", "lim", "--candidate-bits", "3,4", "--group-size", "32",
              "--data", str(tiny / "calib.txt"), "--nsamples", "8", "--seqlen", "32", "--device", "cpu", "--quiet"]
    ref, out = tmp_path / "ref", tmp_path / "q"
    assert run(["quantize", str(tiny / "model"), "-o", str(ref), *budget]) == 0
    resume_blocks = interrupt_after_block(monkeypatch, 1)
    assert run(["quantize", str(tiny / "model"), "-o", str(out), *budget]) == 130
    assert (work_dir(out) / "plan.json").is_file()
    resume_blocks()

    def no_planning(*_a, **_k):
        raise AssertionError("planning was redone on resume")

    monkeypatch.setattr(pipeline, "plan_for_model", no_planning)
    assert run(["quantize", str(tiny / "model"), "-o", str(out), *budget, "--resume"]) == 0
    assert shards(out) == shards(ref)
    assert json.loads((out / "plan.json").read_text()) == json.loads((ref / "plan.json").read_text())


def test_resume_after_the_source_weights_changed_is_refused(tiny, tmp_path, monkeypatch, capsys):
    """Same size, other bytes: the fingerprint hashes the weight files, so the run is not continued on
    a different model (which would mix old and new blocks)."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny / "model", model)
    out = tmp_path / "q"
    argv = ["quantize", str(model), "-o", str(out), "--data", str(tiny / "calib.txt"), *GPTQ]
    resume_blocks = interrupt_after_block(monkeypatch, 0)
    assert run(argv) == 130
    resume_blocks()
    shard = model / "model.safetensors"
    size = shard.stat().st_size
    tensors = load_file(str(shard))
    key = next(k for k in tensors if k.endswith("layers.3.mlp.down_proj.weight"))
    tensors[key] = tensors[key] * 1.5  # fine-tuned weights: same shapes, same file size
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert shard.stat().st_size == size
    capsys.readouterr()
    assert run(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different run" in err[0] and "model" in err[0]
