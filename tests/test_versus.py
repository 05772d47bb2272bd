"""benchmarks/versus.py on a tiny model: one ruler for every tool (its byte count equals lwq's own)."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import PROJECT, save_tiny, word_text


def test_versus_counts_bytes_like_lwq_and_scores_fp32_and_lwq(tmp_path):
    model = save_tiny(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(word_text(3000))
    out = tmp_path / "versus.json"
    r = subprocess.run([sys.executable, str(PROJECT / "benchmarks" / "versus.py"), "--model", str(model),
                        "--calib", str(text), "--eval", str(text), "--nsamples", "4", "--seqlen", "32",
                        "--eval-seqlen", "32", "--group-size", "32", "--lwq", "w4=--bits 4 --refine-steps 2",
                        "--lwq", "w3sym=--bits 3 --sym --refine none", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["tool"] for row in rows] == ["fp32", "lwq", "lwq"]
    # hidden 64 / intermediate 160 at g32: codes + fp16 scales + packed zeros, no g_idx
    assert abs(rows[1]["bpw"] - (4 + 16 / 32 + 4 / 32)) < 1e-9
    assert abs(rows[2]["bpw"] - (3 + 16 / 32)) < 1e-9  # symmetric: no zeros stored
    assert rows[0]["ppl"] > 1 and rows[1]["ppl"] > 1 and "| lwq |" in r.stdout
