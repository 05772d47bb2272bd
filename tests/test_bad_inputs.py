"""The bad-input corpus: every case gives exactly one ``error:`` line on stderr, the documented exit
code (2 bad input, 1 other failure), no traceback, and leaves every existing file as it was."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import PROJECT, save_tiny, word_text
from lwq.cli import run

QUICK = ["--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    good = save_tiny(root / "good", "llama")
    (root / "calib.txt").write_text(word_text(2000))
    (root / "only-config").mkdir()
    (root / "only-config" / "config.json").write_bytes((good / "config.json").read_bytes())
    weights = (good / "model.safetensors").read_bytes()
    for name, data in (("garbage", os.urandom(4096)), ("truncated", weights[: len(weights) // 2])):
        save_tiny(root / name, "llama")
        (root / name / "model.safetensors").write_bytes(data)
    save_tiny(root / "bad-json-config", "llama")
    (root / "bad-json-config" / "config.json").write_text('{"model_type": "llama",')
    for name, model_type, archs in (("unknown-arch", "nosuchmodel", ["NoSuchForCausalLM"]),
                                    ("not-causal", "llama", ["LlamaForSequenceClassification"])):
        save_tiny(root / name, "llama")
        cfg = json.loads((root / name / "config.json").read_text())
        cfg.update(model_type=model_type, architectures=archs)
        (root / name / "config.json").write_text(json.dumps(cfg))
    save_tiny(root / "nonfinite", "llama")
    st = load_file(str(root / "nonfinite" / "model.safetensors"))
    st["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    st["model.layers.0.self_attn.k_proj.weight"][1, 2] = float("inf")
    save_file(st, str(root / "nonfinite" / "model.safetensors"), metadata={"format": "pt"})
    assert run(["quantize", str(good), "-o", str(root / "ckpt"), "--bits", "4", "--group-size", "32", *QUICK]) == 0
    assert run(["quantize", str(good), "-o", str(root / "tampered"), "--bits", "4", "--group-size", "32", *QUICK]) == 0
    shard = root / "tampered" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x55
    shard.write_bytes(bytes(data))
    (root / "a-file").write_text("not a folder\n")
    (root / "user-folder").mkdir()
    (root / "user-folder" / "notes.txt").write_text("precious\n")
    plans = {
        "unknown-module": {"version": 1, "default": {"bits": 4}, "layers": {"model.layers.9.mlp.up_proj": {"bits": 4}}},
        "bits-5": {"version": 1, "default": {"bits": 5, "group_size": 32}, "layers": {}},
        "wrong-types": {"version": 1, "default": {"bits": "four", "group_size": 32}, "layers": {}},
        "not-an-object": [1, 2, 3],
        "no-version": {"default": {"bits": 4}, "layers": {}},
    }
    for name, doc in plans.items():
        (root / f"plan-{name}.json").write_text(json.dumps(doc))
    (root / "plan-syntax.json").write_text('{"version": 1, "default": {"bits": 4,}, "layers": {}}')
    return root


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def check_one_line(code: int, err: str, want_code: int, want: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == want_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert want.lower() in lines[0].lower(), lines[0]


def Q(model: str, *extra: str) -> list[str]:
    return ["quantize", model, "-o", "{root}/out", *extra, *QUICK]


GPTQ = ["--data", "{root}/calib.txt", "--nsamples", "4", "--seqlen", "32"]
BUDGET = ["--data", "{root}/calib.txt", "--nsamples", "4", "--seqlen", "32"]

CASES = {
    "missing model path": (Q("{root}/no-such-model", "--bits", "4"), 2, "no such model path"),
    "model path is a file": (Q("{root}/a-file", "--bits", "4"), 2, "not a folder"),
    "config.json not JSON": (Q("{root}/bad-json-config", "--bits", "4"), 2, "cannot read"),
    "only config.json": (Q("{root}/only-config", "--bits", "4"), 2, "no *.safetensors"),
    "garbage safetensors": (Q("{root}/garbage", "--bits", "4"), 2, "corrupt or truncated"),
    "truncated safetensors": (Q("{root}/truncated", "--bits", "4"), 2, "corrupt or truncated"),
    "manifest mismatch (eval)": (["eval", "{root}/tampered", "--data", "{root}/calib.txt", "--seqlen", "32",
                                  "--device", "cpu"], 2, "does not match its sha256"),
    "manifest mismatch (load)": (["info", "{root}/tampered"], 2, "sha256"),
    "NaN/Inf weights": (Q("{root}/nonfinite", "--bits", "4"), 2, "model.layers.0.self_attn.k_proj"),
    "unknown architecture": (Q("{root}/unknown-arch", "--bits", "4"), 2, "unsupported model_type 'nosuchmodel'"),
    "not a causal LM": (Q("{root}/not-causal", "--bits", "4"), 2, "not a causal language model"),
    "quantize a checkpoint": (Q("{root}/ckpt", "--bits", "4"), 2, "already an lwq checkpoint"),
    **{f"budget {b!r}": (Q("{root}/good", f"--budget={b}", *BUDGET), 2, "budget")
       for b in ("abc", "-3bit", "0bit", "4XB", "nan", "inf bit", "3,25bit", "", "40bit")},
    "infeasible budget": (Q("{root}/good", "--budget=1bit", *BUDGET), 2, "infeasible"),
    "plan: unknown module": (Q("{root}/good", "--plan", "{root}/plan-unknown-module.json"), 2, "unknown module"),
    "plan: bits not offered": (Q("{root}/good", "--plan", "{root}/plan-bits-5.json"), 2, "bits"),
    "plan: JSON syntax error": (Q("{root}/good", "--plan", "{root}/plan-syntax.json"), 2, "invalid JSON"),
    "plan: wrong types": (Q("{root}/good", "--plan", "{root}/plan-wrong-types.json"), 2, "bits"),
    "plan: not an object": (Q("{root}/good", "--plan", "{root}/plan-not-an-object.json"), 2, "expected a JSON object"),
    "plan: no version": (Q("{root}/good", "--plan", "{root}/plan-no-version.json"), 2, "version"),
    "plan: missing file": (Q("{root}/good", "--plan", "{root}/no-plan.json"), 2, "no such plan file"),
    "output is a file": (["quantize", "{root}/good", "-o", "{root}/a-file", "--bits", "4", *QUICK], 2, "not a folder"),
    "output is a file (--force)": (["quantize", "{root}/good", "-o", "{root}/a-file", "--bits", "4", "--force",
                                    *QUICK], 2, "not a folder"),
    "output exists": (["quantize", "{root}/good", "-o", "{root}/ckpt", "--bits", "4", *QUICK], 2, "--force"),
    "--force on a user folder": (["quantize", "{root}/good", "-o", "{root}/user-folder", "--bits", "4", "--force",
                                  *QUICK], 2, "not an lwq checkpoint"),
    "missing calibration file": (Q("{root}/good", "--bits", "4", "--backend", "gptq", "--data", "{root}/none.txt",
                                   "--nsamples", "4", "--seqlen", "32"), 2, "none.txt"),
    "unknown backend": (Q("{root}/good", "--bits", "4", "--backend", "nope"), 2, "nope"),
    "bits not offered": (Q("{root}/good", "--bits", "5"), 2, "bits"),
    "bad nsamples": (Q("{root}/good", "--bits", "4", "--nsamples", "0"), 2, "nsamples"),
    "bad dtype": (Q("{root}/good", "--bits", "4", "--dtype", "int3"), 2, "dtype"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(corpus, case, capsys):
    argv, code, want = CASES[case]
    before = tree_hashes(corpus)
    got = run([a.format(root=corpus) for a in argv])
    check_one_line(got, capsys.readouterr().err, code, want)
    assert tree_hashes(corpus) == before
    assert not (corpus / "out").exists()


def test_unreadable_model_folder(corpus, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads folders whatever their permissions")
    folder = save_tiny(tmp_path / "locked", "llama")
    folder.chmod(0)
    try:
        got = run(["quantize", str(folder), "-o", str(tmp_path / "out"), "--bits", "4", *QUICK])
    finally:
        folder.chmod(0o755)
    assert got == 2 and capsys.readouterr().err.startswith("error: ")


def test_full_disk_keeps_the_previous_output(corpus, tmp_path, monkeypatch, capsys):
    """A write error (ENOSPC while writing the shards) is one line with exit 1; the existing
    checkpoint replaced with --force survives, no temporary folder is left, and once there is space
    again ``--resume`` writes the checkpoint without quantizing anything again."""
    import lwq.formats.folder as ckpt  # where every shard is written

    out = tmp_path / "q"
    argv = ["quantize", str(corpus / "good"), "-o", str(out), "--bits", "4", "--group-size", "32", *QUICK]
    assert run([*argv[:5], "2", *argv[6:]]) == 0
    before = tree_hashes(out)
    real = ckpt.write_safetensors

    def full_disk(path, tensors, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "write_safetensors", full_disk)
    capsys.readouterr()
    check_one_line(run([*argv, "--force"]), capsys.readouterr().err, 1, "could not write")
    assert tree_hashes(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]
    assert json.loads((tmp_path / "q.partial" / "state.json").read_text())["next_block"] == 2
    monkeypatch.setattr(ckpt, "write_safetensors", real)
    import lwq.pipeline.blockwise

    monkeypatch.setattr(lwq.pipeline.blockwise, "quantize_block", None)  # nothing is left to quantize
    assert run([*argv, "--force", "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_block"] == 2
    assert json.loads((out / "config.json").read_text())["quantization_config"]["default"]["bits"] == 4


def test_full_disk_in_the_work_folder(corpus, tmp_path, monkeypatch, capsys):
    import lwq.pipeline.workdir

    def full_disk(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lwq.pipeline.workdir, "save_file", full_disk)
    got = run(["quantize", str(corpus / "good"), "-o", str(tmp_path / "q"), "--bits", "4", *QUICK])
    check_one_line(got, capsys.readouterr().err, 1, "No space left on device")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("model,want", [("garbage", "corrupt or truncated"), ("no-such-model", "no such model path")])
def test_real_process_prints_no_traceback(corpus, model, want):
    proc = subprocess.run([sys.executable, "-m", "lwq", "quantize", str(corpus / model), "-o", str(corpus / "out"),
                           "--bits", "4", *QUICK], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)})
    check_one_line(proc.returncode, proc.stderr, 2, want)
    assert proc.stdout == ""


def test_debug_shows_the_traceback(corpus):
    with pytest.raises(Exception, match="no such model path"):
        run(["quantize", str(corpus / "no-such-model"), "-o", str(corpus / "out"), "--bits", "4", "--debug", *QUICK])


def test_nonfinite_weights_are_refused_before_quantizing():
    from lwq.errors import BadInput
    from lwq.pipeline.blockwise import check_finite

    block = torch.nn.Module()
    block.a, block.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with torch.no_grad():
        block.b.weight[0, 0] = float("-inf")
    check_finite(block, "m.0", ["a"])
    with pytest.raises(BadInput, match=r"m\.0\.b"):
        check_finite(block, "m.0", ["a", "b"])


def test_model_without_a_block_list_is_unsupported():
    from lwq.errors import BadInput
    from lwq.models.arch import arch_for

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"model_type": "flat"})()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(BadInput, match="no decoder block list"):
        arch_for(Flat())
