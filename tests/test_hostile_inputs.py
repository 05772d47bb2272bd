"""The hostile-input corpus across every command (issue 16): each case exits 2 with one ``error:``
line naming what is wrong, prints no traceback and leaves every existing file as it was. Together
with ``test_bad_inputs.py`` (quantize's model, plan and budget cases) it holds over 80 cases."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import interrupt_after_block, save_tiny, word_text
from lwq.cli import run

QUICK = ["--device", "cpu", "--quiet"]
SMALL = ["--nsamples", "4", "--seqlen", "32"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("hostile")
    good = save_tiny(r / "good", "llama")
    save_tiny(r / "gpt2", "gpt2")  # 256 positions
    (r / "text.txt").write_text(word_text(3000))
    assert run(["quantize", str(good), "-o", str(r / "ckpt"), "--bits", "4", "--group-size", "32", *QUICK]) == 0
    save_tiny(r / "nonfinite", "llama")
    st = load_file(str(r / "nonfinite" / "model.safetensors"))
    st["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(st, str(r / "nonfinite" / "model.safetensors"), metadata={"format": "pt"})
    (r / "a-file").write_text("a file\n")
    (r / "user").mkdir()
    (r / "user" / "notes.txt").write_text("precious\n")
    (r / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "budget: *i\n")
    (r / "unknown-key.yaml").write_text("budget: 3bit\nsolverr: dp\n")
    (r / "deep.json").write_text("[" * 100000 + "]" * 100000)
    plans = {
        "int6-3bit": {"version": 1, "default": {"bits": 3, "group_size": 32, "format": "int6"}, "layers": {}},
        "w2a8": {"version": 1, "default": {"bits": 2, "group_size": 32, "act_bits": 8, "format": "gptq"}, "layers": {}},
        "bad-regex": {"version": 1, "default": {"bits": 4, "group_size": 32}, "layers": {"re:(": {"bits": 8}}},
        "w4a8-8bit": {"version": 1, "default": {"bits": 8, "group_size": 32, "format": "w4a8", "act_bits": 8},
                      "layers": {}},
    }
    for name, doc in plans.items():
        (r / f"plan-{name}.json").write_text(json.dumps(doc))
    (r / "rows-nan.json").write_text('[{"label": "a", "bits_per_weight": 3.0, "perplexity": NaN}]')
    (r / "rows-bad.json").write_text('{"label": "a"}')
    return r


def Q(*extra: str) -> list[str]:
    return ["quantize", "{root}/good", "-o", "{root}/out", *extra, *QUICK]


def P(*extra: str) -> list[str]:
    return ["plan", "{root}/good", "-o", "{root}/out.json", *extra, "--device", "cpu", "--quiet"]


DATA = ["--data", "{root}/text.txt", *SMALL]
EDATA = ["--data", "{root}/text.txt", "--seqlen", "32"]
CASES = {
    # info
    "info: no such model": (["info", "{root}/nope"], "no such model path"),
    "info: a file": (["info", "{root}/a-file"], "not a folder"),
    # calibrate
    "calibrate: a checkpoint": (["calibrate", "{root}/ckpt", *DATA, "-o", "{root}/out", *QUICK], "lwq checkpoint"),
    "calibrate: missing data": (["calibrate", "{root}/good", "--data", "{root}/none.txt", "-o", "{root}/out", *QUICK],
                                "none.txt"),
    "calibrate: output is a file": (["calibrate", "{root}/good", *DATA, "-o", "{root}/a-file", *QUICK], "not a folder"),
    "calibrate: output is the model": (["calibrate", "{root}/good", *DATA, "-o", "{root}/good", "--force", *QUICK],
                                       "must not be"),
    "calibrate: user folder --force": (["calibrate", "{root}/good", *DATA, "-o", "{root}/user", "--force", *QUICK],
                                       "even with --force"),
    "calibrate: seqlen beyond context": (["calibrate", "{root}/gpt2", "--data", "{root}/text.txt", "--nsamples", "2",
                                          "--seqlen", "4096", "-o", "{root}/out", *QUICK], "256"),
    "calibrate: nsamples 0": (["calibrate", "{root}/good", "--data", "{root}/text.txt", "--nsamples", "0",
                               "-o", "{root}/out", *QUICK], "nsamples"),
    # score
    "score: a checkpoint": (["score", "{root}/ckpt", *DATA, "--method", "lim", *QUICK], "lwq checkpoint"),
    "score: unknown method": (["score", "{root}/good", *DATA, "--method", "nope", *QUICK], "nope"),
    "score: seqlen beyond context": (["score", "{root}/gpt2", "--data", "{root}/text.txt", "--nsamples", "2",
                                      "--seqlen", "4096", "--method", "lim", *QUICK], "256"),
    "score: bad granularity": (["score", "{root}/good", *DATA, "--granularity", "atom", *QUICK], "granularity"),
    # plan
    "plan: a checkpoint": (["plan", "{root}/ckpt", "--budget", "3bit", "-o", "{root}/out.json", *QUICK],
                           "lwq checkpoint"),
    "plan: -o a folder": (["plan", "{root}/good", "--budget", "3bit", "-o", "{root}/user", *QUICK], "folder"),
    "plan: unknown solver": (P("--budget", "3bit", "--solver", "nope"), "nope"),
    "plan: unknown scorer": (P("--budget", "3bit", "--scorer", "nope"), "nope"),
    "plan: full-width digits": (P("--budget", "\uff13bit"), "budget"),
    "plan: arabic-indic digits": (P("--budget", "\u0663.25bit"), "budget"),
    "plan: superscript digit": (P("--budget", "\u00b3bit"), "budget"),
    "plan: bad candidate bits": (P("--budget", "3bit", "--candidate-bits", "2,x"), "bits"),
    "plan: empty candidate bits": (P("--budget", "3bit", "--candidate-bits", ""), "bits"),
    "plan: unknown tie": (P("--budget", "3bit", "--tie", "knot", "--solver", "ilp"), "tie"),
    "plan: unknown target": (P("--budget", "3bit", "--target", "nosuch"), "nosuch"),
    "plan: NaN weights": (["plan", "{root}/nonfinite", "--budget", "3bit", "-o", "{root}/out.json", "--scorer", "zd",
                           *QUICK], "model.layers.1.mlp.down_proj"),
    "plan: missing recipe": (P("--config", "{root}/none.yaml"), "none.yaml"),
    "plan: YAML alias bomb": (P("--config", "{root}/bomb.yaml"), "bomb.yaml"),
    "plan: unknown recipe key": (P("--config", "{root}/unknown-key.yaml"), "solverr"),
    "plan: no budget": (P(), "budget"),
    "plan: infeasible": (P("--budget", "0.5bit", *DATA), "infeasible"),
    "plan: seed 2**70": (P("--budget", "3bit", "--seed", str(2**70)), "seed"),
    "plan: bad max-memory": (P("--budget", "3bit", "--max-memory", "12XB"), "max-memory"),
    # quantize
    "quantize: seed 2**70": (Q("--bits", "4", "--seed", str(2**70)), "seed"),
    "quantize: negative seed": (Q("--bits", "4", "--seed", "-1"), "seed"),
    "quantize: W2A8": (Q("--bits", "2", "--act-bits", "8"), "int8 activations"),
    "quantize: plan int6 at 3 bits": (Q("--plan", "{root}/plan-int6-3bit.json"), "int6"),
    "quantize: plan W2A8": (Q("--plan", "{root}/plan-w2a8.json"), "int8 activations"),
    "quantize: plan w4a8 at 8 bits": (Q("--plan", "{root}/plan-w4a8-8bit.json"), "w4a8"),
    "quantize: plan bad regex": (Q("--plan", "{root}/plan-bad-regex.json"), "regular expression"),
    "quantize: plan nested too deep": (Q("--plan", "{root}/deep.json"), "deep.json"),
    "quantize: refine steps -1": (Q("--bits", "4", "--refine-steps", "-1"), "refine"),
    "quantize: refine lr 0": (Q("--bits", "4", "--refine-lr", "0", *DATA), "refine"),
    "quantize: refine bogus": (Q("--bits", "4", "--refine", "bogus"), "bogus"),
    "quantize: grid bogus": (Q("--bits", "4", "--grid", "bogus"), "bogus"),
    "quantize: target nosuch": (Q("--bits", "4", "--target", "nosuch"), "nosuch"),
    "quantize: smooth alpha 2": (Q("--bits", "4", "--act-bits", "8", "--smooth-alpha", "2"), "smooth-alpha"),
    "quantize: group size 100": (Q("--bits", "4", "--group-size", "100"), "group size"),
    "quantize: two modes": (Q("--bits", "4", "--budget", "3bit"), "only one of"),
    "quantize: nothing to do": (Q(), "nothing to do"),
    "quantize: devices without budget": (Q("--bits", "4", "--devices", "cpu,cpu"), "devices"),
    "quantize: act-order with rtn": (Q("--bits", "4", "--act-order"), "act-order"),
    "quantize: bnb with refine": (Q("--bits", "4", "--backend", "bnb-nf4", "--refine", "block", *DATA), "refine"),
    "quantize: user folder --force": (["quantize", "{root}/good", "-o", "{root}/user", "--bits", "4", "--force",
                                       *QUICK], "even with --force"),
    "quantize: output inside the model": (["quantize", "{root}/good", "-o", "{root}/good/q", "--bits", "4", *QUICK],
                                          "must not be"),
    "quantize: seqlen 1": (Q("--bits", "4", "--backend", "gptq", "--data", "{root}/text.txt", "--seqlen", "1"),
                           "seqlen"),
    "quantize: infeasible before calibrating": (Q("--budget", "0.5bit", *DATA), "infeasible"),
    # eval
    "eval: max-ppl nan": (["eval", "{root}/ckpt", *EDATA, "--max-ppl", "nan", *QUICK], "max-ppl"),
    "eval: max-ppl-increase abc": (["eval", "{root}/ckpt", *EDATA, "--max-ppl-increase", "abc", *QUICK],
                                   "max-ppl-increase"),
    "eval: seqlen beyond context": (["eval", "{root}/gpt2", "--data", "{root}/text.txt", "--seqlen", "4096", *QUICK],
                                    "256"),
    "eval: missing data": (["eval", "{root}/ckpt", "--data", "{root}/none.txt", *QUICK], "none.txt"),
    "eval: no such model": (["eval", "{root}/nope", *EDATA, *QUICK], "no such model path"),
    "eval: NaN weights": (["eval", "{root}/nonfinite", *EDATA, *QUICK], "model.layers.1.mlp.down_proj"),
    # export
    "export: not an lwq folder": (["export", "{root}/good", "-o", "{root}/out"], "not an lwq checkpoint"),
    "export: unknown format": (["export", "{root}/ckpt", "--format", "awq", "-o", "{root}/out"], "awq"),
    "export: unknown target": (["export", "{root}/ckpt", "--target", "nosuch", "-o", "{root}/out"], "nosuch"),
    "export: into the checkpoint": (["export", "{root}/ckpt", "-o", "{root}/ckpt/gptq"], "must not be"),
    "export: output is a file": (["export", "{root}/ckpt", "-o", "{root}/a-file"], "not a folder"),
    "export: user folder --force": (["export", "{root}/ckpt", "-o", "{root}/user", "--force"], "even with --force"),
    "export: asymmetric to compressed-tensors": (["export", "{root}/ckpt", "--format", "compressed-tensors",
                                                  "-o", "{root}/out"], "asymmetric"),
    "export: target does not read the format": (["export", "{root}/ckpt", "--target", "gptqmodel", "--format",
                                                 "compressed-tensors", "-o", "{root}/out"], "does not read"),
    # report
    "report: nothing to report": (["report", "-o", "{root}/out"], "at least one"),
    "report: missing results": (["report", "--results", "{root}/none.json", "-o", "{root}/out"], "none.json"),
    "report: results not rows": (["report", "--results", "{root}/rows-bad.json", "-o", "{root}/out"], "rows-bad"),
    "report: results with NaN": (["report", "--results", "{root}/rows-nan.json", "-o", "{root}/out"], "perplexity"),
    "report: output is a file": (["report", "{root}/ckpt", "-o", "{root}/a-file"], "not a folder"),
    "report: user folder --force": (["report", "{root}/ckpt", "-o", "{root}/user", "--force"], "even with --force"),
    "report: not a checkpoint": (["report", "{root}/good", "-o", "{root}/out"], "good"),
    # demo
    "demo: output is a file": (["demo", "-o", "{root}/a-file"], "not a folder"),
    "demo: user folder": (["demo", "-o", "{root}/user"], "not a demo output"),
    "demo: user folder --force": (["demo", "-o", "{root}/user", "--force"], "not a demo output"),
}


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_one_line(root, case, capsys):
    argv, want = CASES[case]
    before = tree(root)
    capsys.readouterr()
    code = run([a.format(root=root) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert want.lower() in lines[0].lower(), lines[0]
    assert tree(root) == before
    assert not (root / "out").exists() and not (root / "out.json").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


def test_corrupt_block_in_the_work_folder_is_bad_input(root, tmp_path, capsys, monkeypatch):
    from lwq.pipeline.workdir import work_dir

    out = tmp_path / "q"
    argv = ["quantize", str(root / "good"), "-o", str(out), "--bits", "3", "--backend", "gptq", *DATA[:1],
            str(root / "text.txt"), *SMALL, *QUICK]
    resume_blocks = interrupt_after_block(monkeypatch, 0)
    assert run(argv) == 130
    resume_blocks()
    block = next(work_dir(out).glob("block-*.safetensors"))
    block.write_bytes(os.urandom(200))
    capsys.readouterr()
    assert run(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and block.name in err and "--force" in err


def test_paths_that_are_not_utf8_are_named(root, tmp_path, capsys):
    """A model folder or an output whose name holds undecodable bytes is named in one line (safetensors
    and tokenizers take UTF-8 paths only), before anything is read or written."""
    import shutil

    src = os.fsdecode(os.fsencode(str(tmp_path)) + b"/model-\xff\xfe")
    shutil.copytree(root / "good", src)
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/out-\xe9")
    for argv in (["quantize", src, "-o", str(tmp_path / "o"), "--bits", "4"],
                 ["quantize", str(root / "good"), "-o", out, "--bits", "4"],
                 ["info", src]):
        assert run(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "is not valid UTF-8" in err and "\\udc" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [os.path.basename(src)]


def test_info_describes_a_checkpoint(root, capsys):
    assert run(["info", str(root / "ckpt"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["num_blocks"] == 2 and doc["num_linears"] == 14


def test_corrupt_block_in_a_calibration_folder_is_bad_input(root, tmp_path, capsys):
    cal = tmp_path / "cal"
    assert run(["calibrate", str(root / "good"), "--data", str(root / "text.txt"), *SMALL, "-o", str(cal),
                *QUICK]) == 0
    block = next(cal.glob("*.safetensors"))
    block.write_bytes(os.urandom(300))
    capsys.readouterr()
    assert run(["plan", str(root / "good"), "--budget", "4bit", "--calib", str(cal), "--scorer", "hessian",
                "-o", str(tmp_path / "p.json"), *DATA, *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot read the tensors of" in err and not (tmp_path / "p.json").exists()
