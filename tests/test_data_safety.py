"""Never lose a user's data, never publish a torn checkpoint (issue 16): the one output rule for every
command that writes, the output lock, and integrity on the transformers load path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import save_tiny, word_text
from lwq.cli import run

SMALL = ["--nsamples", "4", "--seqlen", "32", "--device", "cpu"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    save_tiny(root / "model", "llama")
    (root / "text.txt").write_text(word_text(3000))
    assert run(["quantize", str(root / "model"), "--bits", "4", "--group-size", "32", "-o", str(root / "q"),
                "--quiet"]) == 0
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_force_never_deletes_user_folders(tiny, tmp_path, capsys):
    """quantize/calibrate/export/report with --force refuse a folder of user files, a bare marker file
    in one, the command's own input and a folder holding it; the files are untouched."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    (user / "lwq_manifest.json").write_text("{}")  # a bare marker proves nothing
    before = snapshot(user)
    model, data, ckpt = str(tiny / "model"), str(tiny / "text.txt"), str(tiny / "q")
    cases = [
        ["quantize", model, "--bits", "4", "-o", str(user), "--force"],
        ["calibrate", model, "--data", data, "-o", str(user), "--force", *SMALL],
        ["export", ckpt, "-o", str(user), "--force"],
        ["report", ckpt, "-o", str(user), "--force"],
    ]
    for argv in cases:
        assert run(argv) == 2, argv
        assert "refusing to replace it even with --force" in one_line(capsys), argv
        assert snapshot(user) == before, argv
    model_before = snapshot(tiny / "model")
    for argv in (["calibrate", model, "--data", data, "-o", model, "--force", *SMALL],
                 ["quantize", model, "--bits", "4", "-o", str(tiny), "--force"],
                 ["quantize", model, "--bits", "4", "-o", str(tiny / "model" / "inner"), "--force"],
                 ["report", ckpt, "-o", ckpt, "--force"]):
        assert run(argv) == 2, argv
        assert "must not be, contain or lie inside the input" in one_line(capsys), argv
    assert snapshot(tiny / "model") == model_before and (tiny / "q" / "model.safetensors").is_file()


def test_force_replaces_lwq_outputs_of_the_same_kind(tiny, tmp_path, capsys):
    cal = tmp_path / "cal"
    argv = ["calibrate", str(tiny / "model"), "--data", str(tiny / "text.txt"), "-o", str(cal), *SMALL, "--quiet"]
    assert run(argv) == 0
    assert run(argv) == 2 and "already exists" in one_line(capsys)
    assert run(argv + ["--force"]) == 0
    assert run(["quantize", str(tiny / "model"), "--bits", "3", "-o", str(cal), "--force"]) == 2
    assert "not an lwq checkpoint folder" in one_line(capsys)  # a calibration folder is not a checkpoint
    rep = tmp_path / "rep"
    assert run(["report", str(tiny / "q"), "-o", str(rep)]) == 0
    capsys.readouterr()
    md = (rep / "report.md").read_text()
    assert run(["report", str(tiny / "q"), "-o", str(rep)]) == 2 and "already exists" in one_line(capsys)
    (rep / "report.md").write_text("my edits")
    assert run(["report", str(tiny / "q"), "-o", str(rep), "--force"]) == 0  # still exactly the report's files
    capsys.readouterr()
    assert (rep / "report.md").read_text() == md
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


HOLD = """
import sys, time
from pathlib import Path
from lwq.fileio import OutputLock
with OutputLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_writer_fails_at_once_and_stale_locks_are_recovered(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        for argv in (["quantize", str(tiny / "model"), "--bits", "4", "-o", str(out)],
                     ["export", str(tiny / "q"), "-o", str(out)]):
            assert run(argv) == 2
            err = one_line(capsys)
            assert f"being written by another lwq process (pid {holder.pid})" in err
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays, the kernel lock goes
        holder.wait()
    assert (tmp_path / ".q.lock").exists()
    assert run(["quantize", str(tiny / "model"), "--bits", "4", "-o", str(out), "--quiet"]) == 0
    assert (out / "model.safetensors").is_file() and not (tmp_path / ".q.lock").exists()


def test_transformers_refuses_missing_tensors_and_edited_config(tiny, tmp_path):
    import shutil

    import lwq  # noqa: F401  (registers the transformers integration)
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lwq.errors import BadInput

    bad = tmp_path / "missing"
    shutil.copytree(tiny / "q", bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors[next(k for k in tensors if k.endswith(".scales"))]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((bad / "lwq_manifest.json").read_text())
    import hashlib

    data = (bad / "model.safetensors").read_bytes()
    manifest["files"]["model.safetensors"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (bad / "lwq_manifest.json").write_text(json.dumps(manifest))  # a consistent manifest, a missing tensor
    with pytest.raises(BadInput, match=r"lacks 1 tensor\(s\), e.g. .*\.scales"):
        AutoModelForCausalLM.from_pretrained(str(bad))

    edited = tmp_path / "edited"
    shutil.copytree(tiny / "q", edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["rope_theta"] = 1.0
    (edited / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="config.json"):
        AutoModelForCausalLM.from_pretrained(str(edited))
    with pytest.raises(BadInput, match="config.json"):
        lwq.load(str(edited), device="cpu")
    ok = AutoModelForCausalLM.from_pretrained(str(tiny / "q"))
    with torch.no_grad():
        assert torch.isfinite(ok(input_ids=torch.ones(1, 4, dtype=torch.long)).logits).all()


def test_spec_combinations_no_layout_holds_are_refused(tiny, tmp_path, capsys):
    from lwq.errors import BadInput
    from lwq.spec import LayerSpec

    for kw, why in ((dict(bits=2, act_bits=8), "int8 activations need the w4a8"),
                    (dict(bits=3, format="int6"), "int6 holds 6-bit weights"),
                    (dict(bits=8, format="w4a8", act_bits=8, sym=True), "w4a8 holds 4-bit")):
        with pytest.raises(BadInput, match=why):
            LayerSpec(**kw)
    plan = {"version": 1, "default": {"bits": 2, "group_size": 32, "act_bits": 8, "format": "gptq"}, "layers": {}}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    assert run(["quantize", str(tiny / "model"), "--plan", str(tmp_path / "p.json"), "-o", str(tmp_path / "o")]) == 2
    assert "int8 activations need the w4a8" in one_line(capsys) and not (tmp_path / "o").exists()


def test_json_never_carries_bare_nan(tiny, tmp_path, capsys):
    rows = tmp_path / "rows.json"
    rows.write_text('[{"label": "a", "bits_per_weight": 3.0, "perplexity": 10.0},'
                    ' {"label": "b", "bits_per_weight": 4.0, "perplexity": 9.0}]')
    from lwq.commands.common import emit_json

    emit_json({"ppl": float("nan"), "rows": [float("inf"), 1.5], "nested": {"x": float("-inf")}})
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out
    assert json.loads(out) == {"ppl": None, "rows": [None, 1.5], "nested": {"x": None}}


def test_infeasible_budget_is_refused_before_any_forward_pass(tiny, tmp_path, capsys, monkeypatch):
    import lwq.calib.data as data

    def boom(*a, **k):
        raise AssertionError("calibration ran before the budget was checked")

    monkeypatch.setattr(data, "calibration_samples", boom)
    monkeypatch.setattr(data, "self_generated_samples", boom)
    for cmd in ("quantize", "plan"):
        out = tmp_path / f"{cmd}-o"
        assert run([cmd, str(tiny / "model"), "--budget", "0.5bit", "-o", str(out), "--data",
                    str(tiny / "text.txt"), *SMALL]) == 2
        err = one_line(capsys)
        assert "budget 0.5bit is infeasible: the minimum is" in err and not out.exists()


def test_backtracking_plan_regex_is_refused_in_bounded_time(tiny, tmp_path, capsys, monkeypatch):
    """Regex keys run on an engine with a time limit per match: a pattern that costs more is refused
    with one line (here a backreference-heavy one under a tight limit, so the test runs fast)."""
    import time

    import lwq.allocate.planfile as plan_mod

    monkeypatch.setattr(plan_mod, "REGEX_SECONDS", 0.002)
    evil = r"re:(.*)(.*)(.*)(.*)(.*)\1\2\3\4\5j"  # ~20 ms per name, polynomial blow-up
    plan = {"version": 1, "default": {"bits": 4, "group_size": 32}, "layers": {evil: {"bits": 8}}}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    t0 = time.monotonic()
    assert run(["quantize", str(tiny / "model"), "--plan", str(tmp_path / "p.json"), "-o", str(tmp_path / "o")]) == 2
    assert time.monotonic() - t0 < 60
    assert "catastrophic backtracking" in one_line(capsys) and not (tmp_path / "o").exists()
    # the classic exponential pattern of Python's re finishes at once on this engine
    import regex

    monkeypatch.setattr(plan_mod, "REGEX_SECONDS", 1.0)
    classic = regex.compile("(a|aa|.)*(a|aa|.)*(a|aa|.)*(a|aa|.)*(a|aa|.)*x")
    t0 = time.monotonic()
    assert plan_mod._matches(classic, "re:...", "model.layers.10.self_attn.o_proj" * 3, "plan") is False
    assert time.monotonic() - t0 < 1.0


def test_library_warnings_never_precede_the_error_line(tiny, monkeypatch, capsys):
    """A third-party FutureWarning raised on the way to a refusal is not printed: the error is the
    only line on stderr."""
    import warnings

    import lwq.pipeline.load as loading
    from lwq.errors import BadInput

    def noisy(*a, **k):
        warnings.warn("`foo` is deprecated and will be removed in v9", FutureWarning)
        warnings.warn("some library advice", UserWarning)
        raise BadInput("the refusal")

    monkeypatch.setattr(loading, "load_model", noisy)  # what `lwq info` loads with
    assert run(["info", str(tiny / "model")]) == 2
    assert capsys.readouterr().err == "error: the refusal\n"
