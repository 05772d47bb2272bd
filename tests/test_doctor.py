"""``lwq doctor``: versions, CUDA, backends, kernels and solvers, each missing piece with its reason."""
from __future__ import annotations

import importlib.util
import json

import torch

from lwq.cli import run
from lwq.commands.doctor import PACKAGES, package_status


def test_doctor_json_lists_everything_with_reasons(capsys):
    assert run(["doctor", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["packages"]) == set(PACKAGES)
    assert doc["packages"]["torch"]["version"] == torch.__version__ and doc["packages"]["torch"]["error"] is None
    for name, mod in PACKAGES.items():
        p = doc["packages"][name]
        if importlib.util.find_spec(mod) is None:
            assert p["version"] is None and "No module named" in p["error"], name
        if p["version"] is None:
            assert p["error"], f"{name} missing without a reason"
    assert doc["cuda"]["available"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert doc["cuda"]["reason"] and doc["cuda"]["devices"] == []
    for section in ("backends", "kernels", "solvers"):
        assert doc[section], section
        for row in doc[section]:
            assert set(row) == {"name", "available", "reason"}
            assert row["available"] or row["reason"], f"{section} {row['name']} unavailable without a reason"
    assert {"rtn", "gptq"} <= {r["name"] for r in doc["backends"]}
    assert {"dp", "ilp"} <= {r["name"] for r in doc["solvers"]}
    assert doc["transformers_integration"]["from_pretrained"] is True
    targets = {t["name"]: t for t in doc["targets"]}
    assert set(targets) == {"vllm", "transformers", "gptqmodel"}
    vllm = {r["format"]: r for r in targets["vllm"]["formats"]}
    assert vllm["gptq"]["bits"] == [4, 8] and vllm["gptq"]["zero_points"] is False
    assert vllm["compressed-tensors"]["group_sizes"] == [-1, 32, 64, 128] and targets["vllm"]["fused_must_match"]
    assert [r["format"] for r in targets["gptqmodel"]["formats"]] == ["gptq"]


def test_missing_package_reports_the_import_error():
    st = package_status("lwq_no_such_module_xyz")
    assert st["version"] is None and "No module named 'lwq_no_such_module_xyz'" in st["error"]


def test_doctor_table_output(capsys):
    assert run(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "packages" in out and "transformers" in out and "backends" in out and "CUDA" in out
