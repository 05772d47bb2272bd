"""PNG charts with matplotlib's Agg backend (no display needed). Each helper takes plain lists and
writes one file; ``bar_chart`` is the shared building block (per-layer bits or sizes can use it too)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lwq.errors import BadInput


def short_label(name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``3.mlp.down_proj``; ``model.layers.3`` -> ``3``."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i:])
    return name


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` (parent folders created) and close it."""
    out = Path(path).expanduser()
    if out.suffix.lower() != ".png":
        raise BadInput(f"plot path must end in .png, got {path}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return out


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float]], path: str | Path, ylabel: str = "",
              title: str = "") -> Path:
    """Grouped bars: one group per label, one bar per series (legend = series names)."""
    plt = _pyplot()
    n, k = len(labels), max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n * k + 2), 4.0))
    width = 0.8 / k
    for j, (name, values) in enumerate(series.items()):
        if len(values) != n:
            raise ValueError(f"series {name!r} has {len(values)} values for {n} labels")
        ax.bar([i + (j - (k - 1) / 2) * width for i in range(n)], list(values), width, label=name)
    ax.set_xticks(range(n))
    ax.set_xticklabels(list(labels), rotation=90 if n > 12 else 0, fontsize=7 if n > 24 else 9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def normalise(values: Sequence[float]) -> list[float]:
    """Min-max scale to [0, 1] so methods on different scales (and with small spreads) share one axis;
    a constant series maps to all ones."""
    lo, hi = min(values, default=0.0), max(values, default=0.0)
    return [(v - lo) / (hi - lo) if hi > lo else 1.0 for v in values]


def plot_scores(layers: Sequence[str], scores: dict[str, Sequence[float]], path: str | Path,
                title: str = "layer importance") -> Path:
    """Bar chart of each method's scores per layer, min-max scaled per method (1 = its most important layer,
    0 = its least important)."""
    return bar_chart([short_label(n) for n in layers], {m: normalise(v) for m, v in scores.items()}, path,
                     ylabel="score, min-max scaled per method", title=title)
