"""Start-up time of the command line: how long ``lwq --version`` and ``lwq --help`` take, and
whether they import torch (they should not: commands import their stage when they run).

Each command runs ``--repeat`` times in a fresh interpreter (the first run warms the OS file
cache and is not counted); prints min and median wall seconds and writes benchmarks/out/startup.json.

    python benchmarks/startup.py [--repeat 10]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"--version": ["--version"], "--help": ["--help"], "quantize --help": ["quantize", "--help"]}
HEAVY = ("torch", "transformers", "numpy", "safetensors")


def wall(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lwq", *args], cwd=ROOT, capture_output=True, check=True)
    return time.perf_counter() - t0


def heavy_imports(args: list[str]) -> list[str]:
    """Which of ``HEAVY`` the command imports (``-X importtime`` lists every module loaded)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "lwq", *args], cwd=ROOT, capture_output=True,
                       text=True, check=True)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    return [m for m in HEAVY if m in loaded]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "startup.json"))
    a = p.parse_args()
    wall(["--version"])  # warm the file cache
    rows = []
    for name, args in COMMANDS.items():
        times = [wall(args) for _ in range(a.repeat)]
        rows.append({"command": f"lwq {name}", "min_s": round(min(times), 3),
                     "median_s": round(statistics.median(times), 3), "heavy_imports": heavy_imports(args)})
    bare = [wall_python() for _ in range(a.repeat)]
    print(f"python start-up alone: min {min(bare):.3f} s\n")
    print("| command | min s | median s | imports |\n|---|---:|---:|---|")
    for r in rows:
        print(f"| `{r['command']}` | {r['min_s']} | {r['median_s']} | "
              f"{', '.join(r['heavy_imports']) or 'none of ' + '/'.join(HEAVY)} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                       "python_alone_min_s": round(min(bare), 3), "rows": rows}, indent=2) + "\n")


def wall_python() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
