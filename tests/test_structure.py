"""The package's structure: one folder per stage, imports that only run down the layers, no circles.

Every import of every module counts, the ones inside functions too (only ``if TYPE_CHECKING:``
blocks, which never run, are left out).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "lwq"

# Bottom to top: a module may import its own package and the packages of lower layers only.
LAYERS = {
    "errors": 0, "registry": 0, "spec": 0, "ui": 0, "fileio": 0,   # shared by every stage
    "kernels": 1, "models": 1,
    "backends": 2, "calib": 2,
    "formats": 3,
    "allocate": 4,
    "score": 5, "eval": 5,
    "pipeline": 6,   # the only place the stages meet
    "commands": 7,
    "cli": 8,
    "__main__": 9, "lwq": 9,  # the package face (``lwq.load``, the transformers registration)
}
SHARED_TOP_LEVEL = {"__init__", "__main__", "cli", "spec", "registry", "errors", "ui", "fileio"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The lwq modules ``path`` imports (``from a import b`` counts ``a.b`` when it is a module)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for t in ast.walk(tree) if _type_checking(t) for b in t.body for n in ast.walk(b)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    package = parts[1] if len(parts) > 1 else "lwq"
    assert package in LAYERS, f"{module}: package {package} has no layer; add it to LAYERS"
    return package, LAYERS[package]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lwq.pipeline import plan\n"
                 "def g():\n    from lwq.models.arch import arch_for\n    import lwq.errors\n")
    known = {"lwq.pipeline": f, "lwq.pipeline.plan": f, "lwq.models.arch": f, "lwq.errors": f}
    assert imports(f, known) == {"lwq.models.arch", "lwq.errors"}
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert circles(graph()) == []


def test_imports_only_run_down_the_layers():
    up = []
    for m, targets in graph().items():
        pm, lm = layer_of(m)
        for t in sorted(targets):
            pt, lt = layer_of(t)
            if pt != pm and lt > lm:
                up.append(f"{m} ({pm}, layer {lm}) imports {t} ({pt}, layer {lt})")
    assert up == []


def test_each_stage_is_one_folder_and_top_level_modules_are_shared_ones():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top <= SHARED_TOP_LEVEL, f"stage code at the top level: {sorted(top - SHARED_TOP_LEVEL)}"
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == {k for k, v in LAYERS.items() if (ROOT / k).is_dir()}


def test_files_stay_under_400_lines():
    long = {module_name(p): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_help_and_version_load_no_torch():
    """``lwq --version`` and ``lwq --help`` need none of the stages: commands import them when they run."""
    import subprocess
    import sys

    code = ("import sys\nfrom lwq.cli import run\nfor argv in (['--version'], ['--help'], ['quantize', '--help']):\n"
            "    assert run(argv) == 0\nprint(sorted(m for m in ('torch', 'transformers', 'numpy', 'safetensors') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
