"""Planning cost against depth for each error estimate: wall time and peak RSS of ``lwq plan`` with
``--scorer sensitivity`` (every candidate measured: the model's tail rerun per trial) and
``--scorer linearity`` (one Fisher pass per window for all layers, then a_l * t**2), on random
llama models of one width (default hidden 256, intermediate 704) at 4, 8, 16 and 32 blocks, 3/4-bit
RTN candidates, 16 windows of 64 tokens, dp at 3.5 bits. Prints a table and the growth ratio of
time from the second-smallest to the largest depth (linear in depth: 4x from 8 to 32 blocks), and
writes benchmarks/out/planning_depth.json.

    python benchmarks/planning_depth.py [--depths 4,8,16,32] [--scorers sensitivity,linearity]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.depth import VOCAB, measure
from benchmarks.versus import bench_parser


def main() -> None:
    a = bench_parser(__doc__, "planning_depth", depths="4,8,16,32", scorers="sensitivity,linearity", hidden=256,
                     intermediate=704, nsamples=16, seqlen=64, threads=2).parse_args()
    depths, scorers = [int(d) for d in a.depths.split(",")], a.scorers.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "calib.txt").write_text(
            " ".join(f"w{(i * 7919) % (VOCAB - 3)}" for i in range(a.nsamples * a.seqlen * 2)))
        for depth in depths:
            model = root / f"llama-{depth}"
            subprocess.run([sys.executable, str(Path(__file__).with_name("depth.py")), "--make", str(model), str(depth),
                            str(a.hidden), str(a.intermediate)], check=True, stderr=subprocess.DEVNULL)
            for scorer in scorers:
                argv = ["-m", "lwq", "plan", str(model), "-o", str(root / f"plan-{depth}-{scorer}.json"), "--budget",
                        "3.5bit", "--candidate-bits", "3,4", "--backend", "rtn", "--scorer", scorer, "--device", "cpu",
                        "--quiet", "--data", str(root / "calib.txt"), "--nsamples", str(a.nsamples),
                        "--seqlen", str(a.seqlen)]
                rss, seconds = measure(argv, a.threads)
                rows.append({"blocks": depth, "scorer": scorer, "seconds": round(seconds, 2),
                             "peak_rss_mib": round(rss, 1)})
                print(f"{depth:>4} blocks  {scorer:>12}  {seconds:8.1f} s  peak RSS {rss:8.1f} MiB", flush=True)
    lo, hi = (sorted(depths)[1] if len(depths) > 1 else depths[0]), max(depths)
    growth = {}
    for scorer in scorers:
        t = {r["blocks"]: r["seconds"] for r in rows if r["scorer"] == scorer}
        growth[scorer] = round(t[hi] / t[lo], 2)
    print("\n| blocks | scorer | seconds | peak RSS MiB |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['blocks']} | {r['scorer']} | {r['seconds']} | {r['peak_rss_mib']} |")
    print(f"\ntime growth from {lo} to {hi} blocks ({hi // lo}x the depth): "
          + ", ".join(f"{s} {g}x" for s, g in growth.items()))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows, "growth": growth, "from": lo, "to": hi},
                                      indent=2) + "\n")


if __name__ == "__main__":
    main()
