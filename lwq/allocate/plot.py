"""Bits per layer of a plan as a PNG bar chart (matplotlib, Agg canvas: no display, no pyplot state)."""
from __future__ import annotations

from pathlib import Path

from lwq.allocate.planfile import Plan

FORMAT_COLORS = {"gptq": "#4C72B0", "int6": "#DD8452", "w4a8": "#55A868", "bnb": "#C44E52", "fp16": "#8172B3"}


def plot_bits(plan: Plan, path: str | Path, title: str | None = None) -> Path:
    """Bars of weight bits per layer (model order) coloured by storage format, with the plan's real
    bits per weight (scales, zeros and g_idx included) as a dashed line when known and a bits-per-weight
    budget as a dotted line. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(plan.layers)
    specs = [plan.layers[n].spec for n in names]
    fig = Figure(figsize=(max(6.0, 0.14 * len(names) + 2), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = [FORMAT_COLORS.get(s.format, "#777777") for s in specs]
    ax.bar(range(len(names)), [s.bits for s in specs], color=colors, width=0.85)
    bpw = plan.bits_per_weight
    handles = [Patch(color=FORMAT_COLORS.get(f, "#777777"), label=f) for f in dict.fromkeys(s.format for s in specs)]
    if bpw is not None:
        line = ax.axhline(bpw, color="black", linestyle="--", linewidth=1, label=f"real bpw {bpw:.3f}")
        handles.append(line)
    if plan.budget:
        from lwq.allocate.budget import parse_budget

        budget = parse_budget(plan.budget)
        if budget.kind == "bpw":
            handles.append(ax.axhline(budget.value, color="#C44E52", linestyle=":", linewidth=1.2,
                                      label=f"budget {plan.budget}"))
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.set_ylabel("weight bits")
    ax.set_xlabel("layer (model order)")
    ax.set_ylim(0, max(s.bits for s in specs) + 1.5)
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), [n.split(".", 2)[-1] if n.count(".") > 2 else n for n in names],
                      rotation=90, fontsize=6)
    parts = [p for p in (f"budget {plan.budget}" if plan.budget else "", plan.solver or "", plan.scorer or "") if p]
    ax.set_title(title or ("bits per layer: " + ", ".join(parts) if parts else "bits per layer"), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
