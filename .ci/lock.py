"""The install lock: write ``constraints.txt`` from this interpreter, or say how this one differs from it.

    python .ci/lock.py write constraints.txt   # make lock: pin what this venv runs (lwq[test] and its closure)
    python .ci/lock.py diff constraints.txt    # make upgrade-check: what changed against the lock

Only lwq's own requirement closure (with the ``test`` extra, markers evaluated for this interpreter) is
pinned, so tools a developer added by hand (ruff, ipython) stay out. Local version labels (``+cpu``)
are dropped: ``torch==2.13.0`` takes the CPU wheel where pip is given one and the default build elsewhere.
One lock must resolve with either build, so the CUDA libraries (``nvidia-*``, ``cuda-*``), which torch's
default build pins exactly itself and its CPU build lacks, are left out, and ``write`` refuses a triton
other than the one torch's default build pins (it asks the registry; without it, it says so).
"""
from __future__ import annotations

import platform
import re
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

HEADER = """\
# The versions lwq's test suite last passed with: `make demo`, `make test` and .ci/run install with
# `pip install -c constraints.txt`. pyproject.toml keeps ranges for library users.
# Update: `make upgrade-check` (newest versions in a scratch venv, fast tests, what changed), then
# `make lock` in a .venv that passed `make test` rewrites this file. Do not edit by hand.
"""


BUILD_PINNED = re.compile(r"^(nvidia|cuda)-")  # pinned exactly by torch's default build; absent from its CPU build


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "lwq", extras: tuple[str, ...] = ("test",)) -> dict[str, str]:
    """Installed distributions that ``root[extras]`` needs here, name -> version (``root`` excluded)."""
    seen: dict[str, str] = {}
    visited: set[tuple[str, tuple[str, ...]]] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while todo:
        name, want = todo.pop()
        if (_norm(name), want) in visited:
            continue
        visited.add((_norm(name), want))
        envs = [{"extra": e} for e in want] + [{"extra": ""}]
        for line in metadata.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            key = _norm(req.name)
            if key == _norm(root) or BUILD_PINNED.match(key):
                continue
            try:
                seen[key] = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                raise SystemExit(f"error: {req.name} (needed by {name}) is not installed; run `make install`")
            todo.append((req.name, tuple(sorted(req.extras))))
    return dict(sorted(seen.items()))


def public(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``."""
    return version.split("+", 1)[0]


def read_lock(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, comments skipped."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_norm(name)] = version.strip()
    return pins


def render(pins: dict[str, str]) -> str:
    """The lock file's text."""
    host = f"Python {platform.python_version()}, {sys.platform}-{platform.machine()}"
    where = f"# Made {date.today().isoformat()} on {host}.\n"
    return HEADER + where + "".join(f"{n}=={public(v)}\n" for n, v in pins.items())


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """One line per distribution added, removed or moved between two pin sets."""
    out = []
    for n in sorted(set(old) | set(new)):
        a, b = old.get(n), public(new[n]) if n in new else None
        if a != b:
            out.append(f"{n}: {a or '(absent)'} -> {b or '(absent)'}")
    return out


def torch_build_triton(version: str) -> str | None:
    """The triton that torch ``version``'s default Linux build pins (from the registry's metadata, without
    downloading torch); None when the registry cannot be asked."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                            "--no-deps", "--report", str(report), f"torch==={version}"], capture_output=True, text=True)
        if r.returncode != 0 or not report.is_file():
            return None
        for item in json.loads(report.read_text())["install"]:
            for dep in item["metadata"].get("requires_dist") or []:
                req = Requirement(dep)
                if _norm(req.name) == "triton" and str(req.specifier).startswith("=="):
                    return str(req.specifier)[2:]
    return None


def check_triton(pins: dict[str, str]) -> None:
    """Refuse a lock whose triton differs from the one torch's default build pins (that lock would not
    install on a machine without a CPU wheel)."""
    if "torch" not in pins or "triton" not in pins:
        return
    want = torch_build_triton(public(pins["torch"]))
    if want is None:
        print(f"note: could not ask the registry which triton torch {public(pins['torch'])} pins; not checked")
    elif want != public(pins["triton"]):
        raise SystemExit(f"error: torch {public(pins['torch'])}'s default build pins triton=={want}, this venv has "
                         f"{pins['triton']}: `pip install triton=={want}`, rerun `make test`, then `make lock`")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "diff"):
        print("usage: python .ci/lock.py write|diff constraints.txt", file=sys.stderr)
        return 2
    path = Path(argv[1])
    pins = closure()
    if argv[0] == "write":
        check_triton(pins)
        path.write_text(render(pins))
        print(f"wrote {path}: {len(pins)} pins")
        return 0
    moved = changes(read_lock(path), pins)
    print(f"against {path}: " + (f"{len(moved)} changed" if moved else "nothing changed"))
    for line in moved:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
