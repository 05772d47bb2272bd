"""Budgets: ``3.25bit`` / ``3.25bpw`` (average real bits per quantized weight, scales, zeros and
g_idx included), ``4GB`` / ``3.5GiB`` / ``500MB`` / ``1.2e9B`` (total checkpoint bytes: the quantized
layers plus the rest, stored unquantized in the checkpoint's dtype: embeddings, lm_head, norms,
biases) and ``0.25x`` (fraction of the checkpoint with every counted layer in 16 bits). ``budget_bytes``
turns any of them into a byte cap for the quantized layers.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from lwq.errors import BadInput

ACCEPTED = ("accepted forms: 3.25bit or 3.25bpw (bits per weight), 4GB, 3.5GiB, 500MB, 1.2e9B (checkpoint bytes), "
            "0.25x (fraction of fp16 size)")

_UNITS: dict[str, tuple[str, float]] = {
    "bit": ("bpw", 1.0), "bits": ("bpw", 1.0), "bpw": ("bpw", 1.0),
    "b": ("bytes", 1.0),
    "kb": ("bytes", 1e3), "mb": ("bytes", 1e6), "gb": ("bytes", 1e9), "tb": ("bytes", 1e12),
    "kib": ("bytes", 2.0**10), "mib": ("bytes", 2.0**20), "gib": ("bytes", 2.0**30), "tib": ("bytes", 2.0**40),
    "x": ("fraction", 1.0),
}
_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([a-z]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A parsed budget. ``kind``: ``bpw`` (value in bits per weight), ``bytes`` (total checkpoint
    bytes) or ``fraction`` (of the all-fp16 checkpoint); ``text``: what the user wrote; ``unit``: its unit."""

    kind: str
    value: float
    text: str
    unit: str = ""

    def __str__(self) -> str:
        return self.text


class HasNumel(Protocol):
    numel: int


def parse_budget(text: str) -> Budget:
    """Parse a budget string; anything else is a one-line ``BadInput`` listing the accepted forms."""
    m = _RE.match(text) if isinstance(text, str) and text.isascii() else None  # no "３bit": ASCII digits only
    if m is None or m.group(3).lower() not in _UNITS:
        raise BadInput(f"budget {text!r} not understood; {ACCEPTED}")
    mantissa, exp, unit = m.groups()
    value = float(f"{mantissa}e{exp}" if exp else mantissa)
    kind, scale = _UNITS[unit.lower()]
    value *= scale
    if not math.isfinite(value) or value <= 0:
        raise BadInput(f"budget {text!r} must be positive and finite; {ACCEPTED}")
    if kind == "bpw" and value > 32:
        raise BadInput(f"budget {text!r}: more than 32 bits per weight is not a budget; {ACCEPTED}")
    return Budget(kind=kind, value=value, text=text.strip(), unit=unit)


def fp16_bytes(layers: Sequence[HasNumel], rest_bytes: int) -> int:
    """Bytes of the whole checkpoint with every counted layer in 16-bit."""
    return 2 * sum(int(lc.numel) for lc in layers) + int(rest_bytes)


def budget_bytes(budget: Budget, layers: Sequence[HasNumel], rest_bytes: int) -> int:
    """The byte cap for the quantized (counted) layers under ``budget``.

    ``layers``: the counted linears (anything with ``numel``); ``rest_bytes``: the checkpoint bytes
    stored unquantized outside them (embeddings, lm_head, norms, biases, in the checkpoint's dtype). A
    byte or fraction budget that the rest alone already fills is refused with the size of the rest.
    """
    numel = sum(int(lc.numel) for lc in layers)
    if numel <= 0:
        raise BadInput("no quantized layers to budget for")
    if budget.kind == "bpw":
        return int(math.floor(budget.value * numel / 8.0))
    total = budget.value if budget.kind == "bytes" else budget.value * fp16_bytes(layers, rest_bytes)
    cap = int(math.floor(total)) - int(rest_bytes)
    if cap <= 0:
        raise BadInput(f"budget {budget.text} leaves nothing for the quantized layers: what stays unquantized "
                       f"(embeddings, lm_head, norms, biases) alone takes {int(rest_bytes)} bytes")
    return cap


def in_budget_units(budget: Budget | None, layer_bytes: int, layers: Sequence[HasNumel], rest_bytes: int) -> str:
    """``layer_bytes`` of quantized layers expressed in the budget's own units (for messages):
    ``3.2100bit``, ``1.234GB`` (checkpoint total, decimal or binary like the budget) or ``0.2712x``."""
    numel = sum(int(lc.numel) for lc in layers)
    if budget is None or budget.kind == "bpw":
        return f"{8.0 * layer_bytes / numel:.4f}bit"
    total = layer_bytes + int(rest_bytes)
    if budget.kind == "fraction":
        return f"{total / fp16_bytes(layers, rest_bytes):.4f}x"
    unit = budget.unit or "B"
    scale = _UNITS[unit.lower()][1]
    return f"{total / scale:.4g}{unit}" if scale > 1 else f"{total}B"
