"""The install lock (constraints.txt): it pins every distribution lwq[test] needs, inside pyproject's
ranges, and the Makefile installs through it."""
from __future__ import annotations

import importlib.util
import re

import pytest
from packaging.requirements import Requirement

from helpers import PROJECT

LOCK = PROJECT / "constraints.txt"


def _lock_tool():
    spec = importlib.util.spec_from_file_location("lwq_ci_lock", PROJECT / ".ci" / "lock.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lock_pins_each_installed_requirement_of_lwq_test():
    tool = _lock_tool()
    pins = tool.read_lock(LOCK)
    missing = sorted(set(tool.closure()) - set(pins))
    assert not missing, f"needed but not pinned (run `make lock`): {missing}"
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.]*", v) for v in pins.values()), pins  # exact, no local label


def test_pins_fall_inside_pyproject_ranges():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    pins = _lock_tool().read_lock(LOCK)
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for req in reqs:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is a requirement but not in the lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} outside {req}"
    assert any(r.name == "transformers" and not r.specifier.contains("6.0") for r in reqs)  # the known break


def test_makefile_installs_through_the_lock():
    make = (PROJECT / "Makefile").read_text()
    assert re.search(r"^LOCK \?= constraints\.txt$", make, re.M)
    recipe = make[make.index("$(BIN)/.installed:"):make.index("touch $@")]
    installs = [line for line in recipe.splitlines() if "pip install" in line]
    assert installs and all("-c $(LOCK)" in line for line in installs), installs
    assert (PROJECT / ".ci" / "run").read_text().strip().endswith("make test")


def test_lock_round_trip_and_changes(tmp_path):
    tool = _lock_tool()
    path = tmp_path / "c.txt"
    path.write_text(tool.render({"torch": "2.13.0+cpu", "numpy": "2.4.6"}))
    assert tool.read_lock(path) == {"torch": "2.13.0", "numpy": "2.4.6"}
    moved = tool.changes({"torch": "2.13.0", "numpy": "2.4.6", "gone": "1"},
                         {"torch": "2.14.1+cu130", "numpy": "2.4.6", "new-pkg": "0.1"})
    assert moved == ["gone: 1 -> (absent)", "new-pkg: (absent) -> 0.1", "torch: 2.13.0 -> 2.14.1"]


def test_lock_leaves_out_build_pinned_cuda_libraries_and_refuses_a_triton_torch_does_not_pin(monkeypatch):
    tool = _lock_tool()
    assert not any(tool.BUILD_PINNED.match(n) for n in tool.read_lock(LOCK))
    assert tool.BUILD_PINNED.match("nvidia-cublas") and not tool.BUILD_PINNED.match("numpy")
    monkeypatch.setattr(tool, "torch_build_triton", lambda version: "3.7.1" if version == "2.13.0" else None)
    tool.check_triton({"torch": "2.13.0+cpu", "triton": "3.7.1"})
    with pytest.raises(SystemExit, match=r"pins triton==3\.7\.1, this venv has 3\.9\.0"):
        tool.check_triton({"torch": "2.13.0", "triton": "3.9.0"})
    tool.check_triton({"torch": "9.9.9", "triton": "3.9.0"})  # registry not asked: a note, not a refusal
