"""All storage layouts, imported explicitly so the ``LAYOUTS`` registry is complete."""
from __future__ import annotations

from lwq.formats import layout
from lwq.formats.layout import LAYOUTS, Layout

# Each module below registers its layout(s) in LAYOUTS when imported (explicit, no plugin magic).
LAYOUT_MODULES: tuple[str, ...] = ("lwq.formats.bnb_layout", "lwq.formats.w4a8", "lwq.formats.int6")


def _load_all() -> None:
    import importlib

    for mod in LAYOUT_MODULES:
        importlib.import_module(mod)


def get_layout(name: str) -> Layout:
    """The layout registered as ``name`` (gptq, fp16, bnb, w4a8, int6); unknown names are refused."""
    _load_all()
    return LAYOUTS.get(name)


__all__ = ["LAYOUTS", "Layout", "get_layout", "layout"]
