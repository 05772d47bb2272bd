"""`lwq eval` and `lwq info` through the CLI: JSON, gates and exit codes, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import fixture_data, fixture_model, save_tiny, word_text
from lwq.cli import run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    folder = save_tiny(root / "model", "llama")
    text = root / "text.txt"
    text.write_text(word_text(3000))
    return str(folder), str(text)


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict]:
    code = run(argv)
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip().startswith("{") else {}


def test_eval_json_keys(tiny: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    model, text = tiny
    code, doc = _json(capsys, ["eval", model, "--data", text, "--seqlen", "32", "--max-samples", "5", "--json"])
    assert code == 0
    for key in ("perplexity", "nll", "tokens", "seqlen", "model", "stride", "windows"):
        assert key in doc
    assert doc["windows"] == 5 and doc["tokens"] == 5 * 31 and doc["seqlen"] == 32
    # random weights over 128 tokens: perplexity is near the vocabulary size, not 1 and not inf
    assert 20 < doc["perplexity"] < 1000


def test_eval_gates_set_exit_code(tiny: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    model, text = tiny
    base = ["eval", model, "--data", text, "--seqlen", "32", "--max-samples", "3", "--json"]
    code, doc = _json(capsys, base + ["--max-ppl", "1e6"])
    assert code == 0 and doc["passed"]
    code, doc = _json(capsys, base + ["--max-ppl", "1.5"])
    assert code == 1 and not doc["passed"] and doc["gates"][0]["gate"] == "max_ppl"
    code, doc = _json(capsys, base + ["--baseline", model, "--max-ppl-increase", "5%"])
    assert code == 0 and doc["ppl_increase"] == pytest.approx(0.0, abs=1e-9)


def test_eval_gate_fails_against_better_baseline(tiny: tuple[str, str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model, text = tiny
    other = save_tiny(tmp_path / "other", "llama", seed=7)
    argv = ["eval", str(other), "--data", text, "--seqlen", "32", "--max-samples", "3", "--json",
            "--baseline", model, "--max-ppl-increase", "0%"]
    code, doc = _json(capsys, argv)
    assert (code == 1) == (doc["ppl_increase"] > 0)


@pytest.mark.parametrize("argv,needle", [
    (["eval", "/no/such/path"], "no such model path"),
    (["eval", "{tmp}"], "no config.json"),
    (["eval", "{model}", "--max-ppl", "abc"], "--max-ppl"),
    (["eval", "{model}", "--max-ppl-increase", "lots", "--baseline", "{model}"], "percentage"),
    (["eval", "{model}", "--max-ppl-increase", "5%"], "needs --baseline"),
    (["eval", "{model}", "--data", "/no/such.txt"], "no such text source"),
    (["eval", "{model}", "--data", "{text}", "--seqlen", "100000"], "exceeds the context"),
    (["eval", "{model}", "--data", "{text}", "--stride", "0"], "stride"),
    (["info", "/no/such/path"], "no such model path"),
])
def test_bad_input_one_line_exit_2(tiny: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   argv: list[str], needle: str) -> None:
    model, text = tiny
    argv = [a.format(model=model, text=text, tmp=tmp_path) for a in argv]
    code = run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]


def test_no_traceback_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lwq", "eval", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:")


def test_info_json(tiny: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _json(capsys, ["info", tiny[0], "--json"])
    assert code == 0 and doc["num_blocks"] == 2 and len(doc["linear_layers"]) == 14
    sizes = doc["sizes"]
    assert sizes["16"]["bytes"] > sizes["8"]["bytes"] > sizes["4"]["bytes"] > sizes["3"]["bytes"] > sizes["2"]["bytes"]
    assert 4.0 < sizes["4"]["bits_per_weight"] < 5.0


def test_eval_on_fixture_model(capsys: pytest.CaptureFixture[str]) -> None:
    model, data = fixture_model("docs8"), fixture_data("docs-eval.txt")
    code, doc = _json(capsys, ["eval", str(model), "--data", str(data), "--max-samples", "20", "--json"])
    assert code == 0
    # the fixture's recorded perplexity over 80 windows is 61.4; 20 windows land nearby
    assert 40 < doc["perplexity"] < 90


def test_eval_reads_blocks_from_disk_when_the_model_does_not_fit(tiny: tuple[str, str], capsys, monkeypatch) -> None:
    import lwq.eval.perplexity as ppl_mod

    calls: list[str] = []
    real = ppl_mod.perplexity_by_blocks
    monkeypatch.setattr(ppl_mod, "perplexity_by_blocks", lambda *a, **k: calls.append("blocks") or real(*a, **k))
    base = ["eval", tiny[0], "--data", tiny[1], "--seqlen", "32", "--max-samples", "6", "--json", "--device", "cpu"]
    code, whole = _json(capsys, base)
    assert code == 0 and calls == []
    code, small = _json(capsys, [*base, "--max-memory", "10KB"])
    assert code == 0 and calls == ["blocks"]
    assert small["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)
    assert (small["tokens"], small["windows"]) == (whole["tokens"], whole["windows"])
    assert run([*base, "--max-memory", "lots"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-memory")
