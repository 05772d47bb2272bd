"""Perplexity against real bits per weight on the docs8 fixture: uniform GPTQ 2/3/4-bit and the
budget solvers (``order`` with lim / zd, ``random`` ordering, ``dp`` on measured errors (GPTQ trials:
the default; ``dp-rtn``: round-to-nearest trials) or Hessian errors, ``search``) at several budgets, every plan
quantized with GPTQ g128 on the same calibration windows.
Also how much of the gap between uniform 3-bit and fp16 each method closes at 3.25 bpw. Prints
markdown; writes benchmarks/out/pareto.json and benchmarks/out/pareto.png.

    python benchmarks/pareto.py [--quick] [--budgets 3.0,3.25] [--methods dp,order-lim] [--threads 1]

The model is loaded once; calibration windows, statistics (with Hessians) and the measured-error
database are computed once and shared by every plan; identical plans are quantized and evaluated once.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a file: the project root heads sys.path, never benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

ROOT = Path(__file__).resolve().parent.parent

from lwq.allocate.candidates import ErrorDB, load_error_db, save_error_db  # noqa: E402
from lwq.allocate.recipes import Recipe  # noqa: E402
from lwq.calib.data import calibration_samples, load_text, tokenize  # noqa: E402
from lwq.calib.stats import collect_stats  # noqa: E402
from lwq.eval.perplexity import perplexity  # noqa: E402
from lwq.formats.qlinear import QuantizedLinear  # noqa: E402
from lwq.models.arch import linear_names  # noqa: E402
from lwq.models.load import load_tokenizer  # noqa: E402
from lwq.pipeline.load import load_model  # noqa: E402
from lwq.pipeline.plan import plan_model  # noqa: E402
from lwq.score.measured import MEASURE_SAMPLES  # noqa: E402
from lwq.pipeline.blockwise import quantize_model  # noqa: E402
from lwq.spec import LayerSpec, make_spec  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
BUDGETS = (2.5, 3.0, 3.25, 3.5, 4.0)
QUICK_BUDGETS = (3.0, 3.25)
UNIFORM_BITS = (2, 3, 4)
SEEDS = (0, 1, 2)
GROUP = 128


@dataclass(frozen=True)
class Method:
    """A planning method: the recipe fields it sets and the seeds it is averaged over."""

    name: str
    scorer: str
    solver: str
    seeds: tuple[int, ...] = (0,)
    options: tuple[tuple[str, Any], ...] = ()
    measure_with: str = "backend"


def methods(generations: int) -> dict[str, Method]:
    search_opts = (("generations", generations), ("offspring", 6), ("survivors", 2), ("fidelity", 8192),
                   ("low_fidelity", 1024))
    ms = [Method("order-lim", "lim", "order"), Method("order-zd", "zd", "order"),
          Method("random", "lim", "random", SEEDS),  # the scorer is unused by random ordering
          Method("dp", "sensitivity", "dp"), Method("dp-rtn", "sensitivity", "dp", measure_with="rtn"),
          Method("dp-hessian", "hessian", "dp"),
          Method("search", "sensitivity", "search", options=search_opts)]
    return {m.name: m for m in ms}


QUICK_METHODS = ("order-lim", "order-zd", "random", "dp", "dp-rtn", "dp-hessian")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    """The loaded model, its data and the caches every plan shares."""

    def __init__(self, model_dir: Path, calib: Path, eval_text: Path, nsamples: int, seqlen: int, windows: int):
        self.model = load_model(str(model_dir), "float32", "cpu")
        tok = load_tokenizer(str(model_dir))
        self.samples = calibration_samples(tok, str(calib), nsamples, seqlen, seed=0)
        self.eval_ids = tokenize(tok, load_text(str(eval_text), "eval"))
        self.seqlen, self.windows = seqlen, windows
        t0 = time.perf_counter()
        self.stats = collect_stats(self.model, self.samples, "cpu", hessians=True)
        log(f"calibration statistics: {time.perf_counter() - t0:.1f}s")
        self.dbs: dict[str, Any] = {}  # measured-error database per kind of trial
        self.evaluated: dict[tuple, dict[str, float]] = {}
        self.names = linear_names(self.model)
        self.numel = sum(self.model.get_submodule(n).weight.numel() for n in self.names)

    def ppl(self, model: torch.nn.Module) -> float:
        return perplexity(model, self.eval_ids, self.seqlen, None, self.windows, batch_size=8).perplexity

    def quantized(self, specs: dict[str, LayerSpec]) -> dict[str, float]:
        """GPTQ-quantize a copy of the model per ``specs``; its real bits per weight and perplexity
        (cached by the specs, so identical plans cost once)."""
        key = tuple(sorted(specs.items()))
        if key not in self.evaluated:
            t0 = time.perf_counter()
            model = copy.deepcopy(self.model)
            torch.manual_seed(0)
            quantize_model(model, specs, self.samples, "cpu")
            qbytes = sum(model.get_submodule(n).weight_bytes() for n in specs
                         if isinstance(model.get_submodule(n), QuantizedLinear))
            row = {"bits_per_weight": 8.0 * qbytes / self.numel, "perplexity": self.ppl(model),
                   "seconds": time.perf_counter() - t0}
            self.evaluated[key] = row
        return self.evaluated[key]

    def plan(self, m: Method, budget: float, seed: int) -> tuple[dict[str, LayerSpec], dict[str, Any]]:
        recipe = Recipe(budget=f"{budget}bit", scorer=m.scorer, solver=m.solver, backend="gptq", group_size=GROUP,
                        nsamples=self.samples.shape[0], seqlen=self.seqlen, options=dict(m.options),
                        measure_with=m.measure_with)
        plan, db = plan_model(self.model, self.samples, recipe, seed, self.stats, db=self.dbs.get(m.measure_with))
        if db is not None:
            self.dbs[m.measure_with] = db
        return plan.specs, {"planned_bits_per_weight": plan.bits_per_weight,
                            "bits": [s.bits for s in plan.specs.values()],
                            "solver_info": plan.meta.get("solver_info", {})}


def interp(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear interpolation of log-perplexity over bits per weight (extrapolates at the ends)."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1 or (x1, y1) == pts[-1]:
            t = (x - x0) / (x1 - x0)
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return pts[0][1]


def run_methods(bench: Bench, chosen: list[Method], budgets: list[float],
                on_row: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """For each method and budget: the plan(s), their quantized bpw and perplexity (mean over seeds)."""
    out: dict[str, dict[str, Any]] = {}
    for m in chosen:
        out[m.name] = {}
        for b in budgets:
            runs = []
            for seed in m.seeds:
                t0 = time.perf_counter()
                specs, info = bench.plan(m, b, seed)
                plan_s = time.perf_counter() - t0
                res = bench.quantized(specs)
                runs.append({**res, **info, "seed": seed, "plan_seconds": plan_s, "scorer": m.scorer,
                             "solver": m.solver, "options": dict(m.options)})
                on_row(f"{m.name} @ {b}bit seed {seed}: bpw {res['bits_per_weight']:.4f} "
                       f"ppl {res['perplexity']:.3f} (plan {plan_s:.1f}s)")
            out[m.name][str(b)] = {
                "perplexity": sum(r["perplexity"] for r in runs) / len(runs),
                "bits_per_weight": sum(r["bits_per_weight"] for r in runs) / len(runs),
                "within_budget": all(r["bits_per_weight"] <= b + 1e-9 for r in runs), "runs": runs}
    return out


def gap_closure(doc: dict[str, Any], budget: str = "3.25") -> dict[str, dict[str, float]]:
    """(ppl_u3 - ppl_m) / (ppl_u3 - ppl_fp16) per method at ``budget``, against uniform 3-bit as
    measured and against the uniform curve interpolated to the method's own real bpw."""
    u = doc["uniform"]
    fp = doc["fp16"]["perplexity"]
    u3 = u["3"]["perplexity"]
    curve = [(r["bits_per_weight"], r["perplexity"]) for r in u.values()]
    out = {}
    for name, rows in doc["methods"].items():
        if budget not in rows:
            continue
        r = rows[budget]
        ui = interp(curve, r["bits_per_weight"])
        out[name] = {"perplexity": r["perplexity"], "bits_per_weight": r["bits_per_weight"],
                     "vs_uniform3": (u3 - r["perplexity"]) / (u3 - fp),
                     "uniform_interpolated": ui, "vs_uniform_interpolated": (ui - r["perplexity"]) / (ui - fp)}
    return out


def criteria(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's checks at 3.0 and 3.25 bpw: dp no worse than order; the better-scored order
    better than random ordering averaged over seeds."""
    ms = doc["methods"]
    rows = []
    for b in ("3.0", "3.25"):
        ppl = {n: ms[n][b]["perplexity"] for n in ms if b in ms[n]}
        orders = {n: v for n, v in ppl.items() if n.startswith("order-")}
        if "dp" in ppl and orders:
            worst = max(orders.values())
            rows.append({"budget": b, "check": "dp <= every order", "pass": ppl["dp"] <= min(orders.values()),
                         "dp": ppl["dp"], **orders, "dp_le_worst_order": ppl["dp"] <= worst})
        if "random" in ppl and orders:
            best = min(orders, key=orders.get)
            rows.append({"budget": b, "check": f"{best} (better scorer) < random mean",
                         "pass": orders[best] < ppl["random"], best: orders[best], "random": ppl["random"]})
    return rows


def markdown(doc: dict[str, Any]) -> str:
    budgets = doc["budgets"]
    lines = [f"docs8, eval {doc['eval_windows']} windows x {doc['seqlen']} tokens of docs-eval; GPTQ g{GROUP} "
             f"asym, calibration {doc['nsamples']} x {doc['seqlen']} of docs-calib. Cells: perplexity (real bpw).",
             "", "| method | " + " | ".join(f"{b} bit" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for name, rows in doc["methods"].items():
        cells = [f"{rows[str(b)]['perplexity']:.3f} ({rows[str(b)]['bits_per_weight']:.3f})"
                 if str(b) in rows else "" for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| reference | bpw | perplexity |", "|---|---|---|",
              f"| fp32 | 32 | {doc['fp32']['perplexity']:.3f} |",
              f"| fp16 weights | 16 | {doc['fp16']['perplexity']:.3f} |"]
    for b, r in doc["uniform"].items():
        lines.append(f"| uniform GPTQ {b}-bit g{GROUP} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} |")
    if doc["gap_closure"]:
        lines += ["", "Gap closed at 3.25 bpw: (ppl_u3 - ppl_m) / (ppl_u3 - ppl_fp16); the last column uses the "
                  "uniform curve interpolated (log-ppl, linear in bpw) at the method's own real bpw.", "",
                  "| method | bpw | ppl | vs uniform 3-bit | uniform at same bpw | vs interpolated |",
                  "|---|---|---|---|---|---|"]
        for name, g in doc["gap_closure"].items():
            lines.append(f"| {name} | {g['bits_per_weight']:.3f} | {g['perplexity']:.3f} | "
                         f"{100 * g['vs_uniform3']:.1f}% | {g['uniform_interpolated']:.3f} | "
                         f"{100 * g['vs_uniform_interpolated']:.1f}% |")
    if doc["criteria"]:
        lines += ["", "| budget | check | pass | values |", "|---|---|---|---|"]
        for c in doc["criteria"]:
            vals = ", ".join(f"{k} {v:.3f}" for k, v in c.items() if isinstance(v, float))
            lines.append(f"| {c['budget']} | {c['check']} | {'yes' if c['pass'] else 'NO'} | {vals} |")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Perplexity against real bpw: one line per method, uniform points, the fp16 level."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = ["-o", "-v", "-^", "-s", "-D", "--x", "-P"]
    for k, (name, rows) in enumerate(doc["methods"].items()):
        pts = sorted((r["bits_per_weight"], r["perplexity"]) for r in rows.values())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[k % len(styles)], markersize=5, linewidth=1.3,
                label=name, alpha=0.85)
    u = sorted((r["bits_per_weight"], r["perplexity"], b) for b, r in doc["uniform"].items())
    ax.plot([p[0] for p in u], [p[1] for p in u], "s--", color="black", markersize=6, label="uniform GPTQ")
    for x, y, b in u:
        ax.annotate(f"{b}-bit", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(doc["fp16"]["perplexity"], color="grey", linestyle=":", label="fp16")
    ax.set_xlabel("real bits per weight (scales, zeros, g_idx included)")
    ax.set_ylabel("perplexity (docs-eval)")
    ax.set_title(f"docs8: mixed precision under a budget, GPTQ g{GROUP}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures", default=str(ROOT.parent / "shared"))
    ap.add_argument("--quick", action="store_true", help="budgets 3.0 and 3.25, no search")
    ap.add_argument("--budgets", help="comma list of bits per weight, e.g. 3.0,3.25")
    ap.add_argument("--methods", help=f"comma list of {', '.join(methods(1))}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a busy 2-core machine)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=80, help="evaluation windows")
    ap.add_argument("--generations", type=int, default=4, help="search generations")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--render", metavar="JSON",
                    help="only print the markdown (and redraw OUT/pareto.png) of an earlier pareto.json")
    ap.add_argument("--error-db", help="JSON of measured errors: reused when present, written after measuring")
    ap.add_argument("--merge", action="store_true", help="keep the other methods of an existing OUT/pareto.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shared = Path(args.fixtures)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        plot(doc, Path(args.out) / "pareto.png")
        print(markdown(doc))
        return 0
    budgets = ([float(b) for b in args.budgets.split(",")] if args.budgets
               else list(QUICK_BUDGETS if args.quick else BUDGETS))
    table = methods(args.generations)
    names = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else table)
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(table)}")
    t_start = time.perf_counter()
    bench = Bench(shared / "fixtures" / "docs8", shared / "data" / "docs-calib.txt", shared / "data" / "docs-eval.txt",
                  args.nsamples, args.seqlen, args.windows)
    fp32 = bench.ppl(bench.model)
    half = copy.deepcopy(bench.model)
    for p in half.parameters():
        p.data = p.data.half().float()
    fp16 = bench.ppl(half)
    del half
    log(f"fp32 ppl {fp32:.3f}, fp16 weights ppl {fp16:.3f}")
    uniform = {}
    for b in UNIFORM_BITS:
        spec = make_spec(b, GROUP, False, "gptq")
        uniform[str(b)] = bench.quantized({n: spec for n in bench.names})
        log(f"uniform {b}-bit: bpw {uniform[str(b)]['bits_per_weight']:.4f} ppl {uniform[str(b)]['perplexity']:.3f}")
    db_files = {} if not args.error_db else {
        "backend": Path(args.error_db), "rtn": Path(args.error_db).with_name(Path(args.error_db).stem + "-rtn.json")}
    for trials, path in db_files.items():
        if path.is_file():
            db = load_error_db(path)
            want = {"nsamples": min(MEASURE_SAMPLES, args.nsamples), "seqlen": args.seqlen, "model": "docs8",
                    "trials": trials}
            if any(db.meta.get(k, "rtn" if k == "trials" else None) != v for k, v in want.items()):
                ap.error(f"{path} was measured with {dict(db.meta)}, not {want}")
            bench.dbs[trials] = db
    results = run_methods(bench, [table[n] for n in names], budgets, log)
    for trials, db in bench.dbs.items():
        if trials in db_files:
            save_error_db(ErrorDB(db.entries, {**db.meta, "model": "docs8"}), db_files[trials])
    out = Path(args.out)
    if args.merge and (out / "pareto.json").is_file():
        earlier = json.loads((out / "pareto.json").read_text())
        results = {**{k: v for k, v in earlier["methods"].items() if k not in results}, **results}
        budgets = sorted(set(budgets) | set(earlier["budgets"]))
    doc: dict[str, Any] = {
        "model": "docs8", "calib": "docs-calib.txt", "eval": "docs-eval.txt", "seqlen": args.seqlen,
        "nsamples": args.nsamples, "eval_windows": args.windows, "group_size": GROUP, "backend": "gptq",
        "budgets": budgets, "threads": args.threads, "search_generations": args.generations,
        "fp32": {"perplexity": fp32, "bits_per_weight": 32.0}, "fp16": {"perplexity": fp16, "bits_per_weight": 16.0},
        "uniform": uniform, "methods": results,
        "error_db_measured": {t: {"nsamples": db.meta.get("nsamples"), "seqlen": db.meta.get("seqlen")}
                              for t, db in bench.dbs.items()},
    }
    doc["gap_closure"] = gap_closure(doc) if 3.25 in budgets else {}
    doc["criteria"] = criteria(doc)
    doc["seconds"] = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out / "pareto.png")
    print(markdown(doc))
    print(f"\n{doc['seconds']:.0f}s; wrote {out / 'pareto.json'} and {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
