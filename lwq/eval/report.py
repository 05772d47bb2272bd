"""``lwq report``: figures and a markdown summary for one or more lwq checkpoints.

Per checkpoint: bits per layer (``lwq.allocate.plot.plot_bits``; the plan comes from ``plan.json`` in
the folder when present, else from ``config.json``'s ``quantization_config`` priced by the layouts)
and, when the folder carries ``scores.json`` (``lwq score --json``), importance per layer. Across
checkpoints: quality against size, the Pareto front of (bits per weight, perplexity) rows gathered
from each folder's ``lwq_eval.json`` (``lwq eval --json`` output) and from results files.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from lwq.errors import BadInput

EVAL_FILE = "lwq_eval.json"
PLAN_FILE = "plan.json"
SCORES_FILE = "scores.json"


@dataclass(frozen=True)
class ResultRow:
    """One point of the quality/size chart."""

    label: str
    bits_per_weight: float
    perplexity: float
    source: str = ""


def pareto_front(rows: Sequence[ResultRow]) -> list[ResultRow]:
    """Rows no other row beats on both size and perplexity (ties kept once), by increasing size."""
    front: list[ResultRow] = []
    for r in sorted(rows, key=lambda r: (r.bits_per_weight, r.perplexity)):
        if not front or r.perplexity < front[-1].perplexity:
            front.append(r)
    return front


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None


def checkpoint_plan(folder: Path) -> Any:
    """The ``Plan`` of an lwq checkpoint, with exact costs and sizes (so its real bits per weight)."""
    from lwq.allocate.planfile import Plan, PlanEntry, load_plan, reprice
    from lwq.formats.checkpoint import read_plan
    from lwq.formats.folder import model_from_config
    from lwq.models.arch import linear_shape
    from lwq.models.load import read_config

    config = read_config(folder)
    specs = read_plan(config)
    model = model_from_config(config, meta=True)
    shapes = {n: linear_shape(model.get_submodule(n)) for n in specs}
    if (folder / PLAN_FILE).is_file():
        plan = load_plan(folder / PLAN_FILE)
        if set(plan.layers) == set(specs):
            return reprice(plan, shapes)
    return reprice(Plan({n: PlanEntry(s) for n, s in specs.items()}), shapes)


def read_results(path: str | Path) -> list[ResultRow]:
    """Rows of a results file: a list (or ``{"rows": [...]}``) of ``{"label", "bits_per_weight", "perplexity"}``."""
    p = Path(path).expanduser()
    doc = _read_json(p)
    items = doc.get("rows") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise BadInput(f"{p}: expected a list of {{label, bits_per_weight, perplexity}} rows")
    rows = []
    for i, it in enumerate(items):
        try:
            rows.append(ResultRow(str(it["label"]), float(it["bits_per_weight"]), float(it["perplexity"]), str(p)))
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{p}: row {i} needs label, bits_per_weight and perplexity (numbers)") from None
        if not (math.isfinite(rows[-1].perplexity) and math.isfinite(rows[-1].bits_per_weight)):
            raise BadInput(f"{p}: row {i} ({rows[-1].label}): perplexity and bits_per_weight must be finite numbers")
    return rows


def plot_pareto(rows: Sequence[ResultRow], path: str | Path, title: str = "quality against size") -> Path:
    """Perplexity against bits per weight: every row as a point, the Pareto front as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    front = pareto_front(rows)
    ax.scatter([r.bits_per_weight for r in rows], [r.perplexity for r in rows], color="#8aa1c1", s=36, label="plans",
               zorder=2)
    ax.plot([r.bits_per_weight for r in front], [r.perplexity for r in front], "-o", color="#C44E52", linewidth=1.6,
            markersize=6, label="Pareto front", zorder=3)
    for r in rows:
        ax.annotate(r.label, (r.bits_per_weight, r.perplexity), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if max(r.perplexity for r in rows) / max(min(r.perplexity for r in rows), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (real: scales, zeros, g_idx included)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _label(folder: Path, taken: set[str]) -> str:
    base = folder.resolve().name or "checkpoint"
    label, i = base, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    taken.add(label)
    return label


def _checkpoint_section(folder: Path, label: str, out: Path) -> tuple[dict[str, Any], ResultRow | None]:
    from lwq.allocate.plot import plot_bits
    from lwq.eval.plots import plot_scores

    try:
        plan = checkpoint_plan(folder)
    except BadInput as e:
        raise BadInput(f"{folder}: not an lwq checkpoint ({e})") from None
    figures = {"bits": str(plot_bits(plan, out / f"bits-{label}.png", title=f"bits per layer: {label}"))}
    if (folder / SCORES_FILE).is_file():
        doc = _read_json(folder / SCORES_FILE)
        try:
            names = [layer["name"] for layer in doc["layers"]]
            series = {m: [float(layer["scores"][m]) for layer in doc["layers"]] for m in doc["methods"]}
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{folder / SCORES_FILE}: not an `lwq score --json` document") from None
        figures["importance"] = str(plot_scores(names, series, out / f"importance-{label}.png",
                                                title=f"layer importance: {label}"))
    hist: dict[str, int] = {}
    for e in plan.layers.values():
        key = f"{e.spec.bits}-bit {e.spec.format}"
        hist[key] = hist.get(key, 0) + 1
    section = {"label": label, "folder": str(folder), "layers": len(plan.layers),
               "bits_per_weight": plan.bits_per_weight,
               "quantized_bytes": plan.total_bytes, "budget": plan.budget, "solver": plan.solver, "scorer": plan.scorer,
               "histogram": dict(sorted(hist.items())), "figures": figures}
    row = None
    if (folder / EVAL_FILE).is_file():
        ev = _read_json(folder / EVAL_FILE)
        ppl = ev.get("perplexity") if isinstance(ev, dict) else None
        if not isinstance(ppl, (int, float)) or not math.isfinite(ppl):
            raise BadInput(f"{folder / EVAL_FILE}: expected `lwq eval --json` output with a perplexity")
        row = ResultRow(label, float(plan.bits_per_weight or 0.0), float(ppl), str(folder / EVAL_FILE))
        section["perplexity"] = float(ppl)
    return section, row


def build_report(folders: Sequence[str], out_dir: str | Path, results: Sequence[str] = ()) -> dict[str, Any]:
    """Write the figures and ``report.md`` into ``out_dir``; returns what was written (JSON-able)."""
    if not folders and not results:
        raise BadInput("give at least one checkpoint folder or --results file")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    sections, rows = [], []
    for f in folders:
        folder = Path(f).expanduser()
        section, row = _checkpoint_section(folder, _label(folder, taken), out)
        sections.append(section)
        rows += [row] if row else []
    for r in results:
        rows += read_results(r)
    doc: dict[str, Any] = {"output": str(out.resolve()), "checkpoints": sections, "rows": [asdict(r) for r in rows],
                           "front": [r.label for r in pareto_front(rows)], "figures": {}}
    if rows:
        doc["figures"]["pareto"] = str(plot_pareto(rows, out / "pareto.png"))
    md = out / "report.md"
    md.write_text(render_markdown(doc))
    doc["markdown"] = str(md)
    return doc


def render_markdown(doc: dict[str, Any]) -> str:
    """The markdown summary: plan totals per checkpoint with its figures, then the quality/size table."""
    lines = ["# lwq report", ""]
    for s in doc["checkpoints"]:
        bpw = "unknown" if s["bits_per_weight"] is None else f"{s['bits_per_weight']:.3f}"
        made = ", ".join(f"{k} {s[k]}" for k in ("budget", "solver", "scorer") if s.get(k))
        lines += [f"## {s['label']}", "", f"- folder: `{s['folder']}`", f"- quantized layers: {s['layers']}",
                  f"- real bits per weight: {bpw}", f"- quantized weight bytes: {s['quantized_bytes']}"]
        lines += [f"- plan: {made}"] if made else []
        lines += [f"- perplexity: {s['perplexity']:.4f}"] if "perplexity" in s else []
        lines += ["- layers per precision: " + ", ".join(f"{k}: {v}" for k, v in s["histogram"].items()), ""]
        for kind, path in s["figures"].items():
            lines += [f"![{kind} {s['label']}]({Path(path).name})", ""]
    if doc["rows"]:
        front = set(doc["front"])
        lines += ["## Quality against size", "", "| label | bits per weight | perplexity | Pareto front |",
                  "|---|---:|---:|:-:|"]
        for r in sorted(doc["rows"], key=lambda r: r["bits_per_weight"]):
            lines.append(f"| {r['label']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.4f} | "
                         f"{'yes' if r['label'] in front else ''} |")
        lines += ["", "![quality against size](pareto.png)", ""]
    return "\n".join(lines) + "\n"


def publish_report(folders: Sequence[str], out_dir: str | Path, results: Sequence[str] = (),
                   force: bool = False) -> dict[str, Any]:
    """``build_report`` under the one output rule (``lwq.fileio``, kind ``report``): built beside
    ``out_dir`` and renamed into place; an existing folder is replaced only with ``force`` and only
    when it is an earlier report (or empty); never a checkpoint folder it reads."""
    import json

    from lwq.fileio import OutputLock, check_output, publish

    out = check_output(out_dir, "report", force, inputs=list(folders) + list(results))
    built: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        built.update(build_report(folders, tmp, results))
        md = tmp / "report.md"
        md.write_text(md.read_text().replace(str(tmp.resolve()), str(out)).replace(str(tmp), str(out)))

    with OutputLock(out):
        publish(out, build, "report", {"kind": "report"})
    tmp_names = {str(Path(built["output"])), str(Path(built["output"]).resolve())}
    text = json.dumps(built)
    for name in sorted(tmp_names, key=len, reverse=True):
        text = text.replace(name, str(out))
    return json.loads(text)

