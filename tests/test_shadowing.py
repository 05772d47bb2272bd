"""No file of ours can shadow a real module.

``python benchmarks/x.py`` puts ``benchmarks/`` first on ``sys.path``, pytest puts ``tests/`` there,
and ``python -m benchmarks.x`` puts the project root there. A module in one of those folders whose
name is also the name of an installed distribution's top-level module, of a standard-library module,
or of a module that lwq's dependencies import (``transformers`` imports ``kernels``, say) would be
found first and break that import. This happened: ``benchmarks/kernels.py`` broke every benchmark
once transformers began to import the ``kernels`` distribution.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys
from functools import lru_cache
from pathlib import Path

from packaging.requirements import Requirement

from helpers import PROJECT

# Folders whose contents are importable by their bare names when their scripts or tests run.
SEARCHED = ("benchmarks", "tests", "configs")
# Names that are ours by convention and that no library imports as its own.
OURS = {"lwq", "conftest"}
IMPORT = re.compile(rb"^[ \t]*(?:from|import)[ \t]+([A-Za-z_]\w*)", re.M)
# transformers-style availability probes look a module up by name before importing it.
PROBE = re.compile(rb"""is_package_available\(\s*["']([A-Za-z_]\w*)["']""")


def our_top_level_names(root: Path) -> dict[str, Path]:
    """Each bare module name a search-path folder of ours exposes, with the file that exposes it."""
    out: dict[str, Path] = {}
    for entry in root.iterdir():  # what ``python -m`` from the root can import
        if not entry.stem.isidentifier():
            continue
        if entry.is_dir() and (entry / "__init__.py").exists():  # a folder without one is a namespace
            out[entry.name] = entry                                # portion: any real module of that name wins
        elif entry.suffix == ".py":
            out[entry.stem] = entry
    for folder in SEARCHED:
        for entry in (root / folder).iterdir() if (root / folder).is_dir() else ():
            if entry.suffix == ".py" and entry.stem != "__init__":
                out[entry.stem] = entry
            elif entry.is_dir() and (entry / "__init__.py").exists():
                out[entry.name] = entry
    return {k: v for k, v in out.items() if k not in OURS}


def _requirement_closure(name: str) -> list[md.Distribution]:
    """lwq's installed distribution and every installed distribution it requires, extras included."""
    seen: dict[str, md.Distribution] = {}
    todo = [name]
    while todo:
        n = todo.pop().lower().replace("_", "-")
        if n in seen:
            continue
        try:
            dist = md.distribution(n)
        except md.PackageNotFoundError:
            continue
        seen[n] = dist
        for spec in dist.requires or ():
            todo.append(Requirement(spec).name)
    return list(seen.values())


@lru_cache(maxsize=1)
def foreign_names() -> dict[str, str]:
    """Top-level names that something other than our own files provides or imports, with who does."""
    out: dict[str, str] = {n: "the standard library" for n in sys.stdlib_module_names}
    for top, dists in md.packages_distributions().items():
        if not any(d.lower() == "lwq" for d in dists):
            out.setdefault(top, f"the installed distribution {dists[0]}")
    for dist in _requirement_closure("lwq"):
        who = dist.metadata["Name"]
        if who.lower() == "lwq":
            continue
        for f in dist.files or ():
            if f.suffix != ".py":
                continue
            try:
                text = Path(dist.locate_file(f)).read_bytes()
            except OSError:
                continue
            for name in IMPORT.findall(text) + PROBE.findall(text):
                out.setdefault(name.decode(), f"an import in {who} ({f})")
    return out


def clashes(root: Path) -> list[str]:
    names = foreign_names()
    return [f"{path.relative_to(root)} shadows {name!r}, which is {names[name]}"
            for name, path in sorted(our_top_level_names(root).items()) if name in names]


def test_no_file_of_ours_shadows_a_real_module():
    assert clashes(PROJECT) == []


def test_a_benchmark_named_like_a_distribution_is_caught(tmp_path):
    for folder in SEARCHED:
        (tmp_path / folder).mkdir()
    (tmp_path / "benchmarks" / "torch.py").write_text("")
    (tmp_path / "benchmarks" / "versus_tools.py").write_text("")
    (tmp_path / "tests" / "kernels.py").write_text("")  # what broke the benchmarks: transformers imports it
    (tmp_path / "configs" / "json.py").write_text("")
    found = clashes(tmp_path)
    assert any(c.startswith("benchmarks/torch.py shadows 'torch'") for c in found), found
    assert any(c.startswith("tests/kernels.py shadows 'kernels'") for c in found), found
    assert any(c.startswith("configs/json.py shadows 'json'") for c in found), found
    assert not any("versus_tools" in c for c in found)


def test_the_import_scan_finds_modules_that_are_not_installed():
    # transformers probes and imports accelerate and flash_attn; neither is a dependency of lwq
    names = foreign_names()
    installed = md.packages_distributions()
    missing = [n for n in ("accelerate", "flash_attn") if n not in installed]
    assert missing, "both optional packages are installed here: nothing to check"
    assert all(n in names for n in missing), missing
