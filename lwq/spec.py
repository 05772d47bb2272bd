"""``LayerSpec``: how one linear layer is quantized (plans map module names to specs), and the
vocabulary every stage shares: supported widths, group sizes, formats, grids, lwq's version."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lwq.errors import BadInput

__version__ = "0.1.0"

SUPPORTED_BITS = (2, 3, 4, 6, 8, 16)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128, 256)
FORMATS = ("gptq", "w4a8", "int6", "bnb", "fp16")
GRIDS = ("minmax", "mse")  # per-group grid search of the rtn and gptq backends (--grid)
REFINE_MODES = ("block", "none")  # block-output refinement after the backend (--refine)
SPEC_FIELDS = ("bits", "group_size", "sym", "backend", "format", "act_bits", "act_order")


@dataclass(frozen=True)
class LayerSpec:
    """Quantization of one linear: weight bits, group size (-1 = per channel), symmetry,
    backend name (rtn, gptq, bnb-nf4, ...), storage format (see ``lwq.formats.layout``),
    activation bits (16 = weight-only, 8 = int8 activations) and GPTQ act-order."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    backend: str = "rtn"
    format: str = "gptq"
    act_bits: int = 16
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise BadInput(f"bits must be one of {SUPPORTED_BITS[:-1]}, got {self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise BadInput(f"group size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size}")
        if self.act_bits not in (8, 16):
            raise BadInput(f"act_bits must be 8 or 16, got {self.act_bits}")
        if self.format not in FORMATS:
            raise BadInput(f"format must be one of {FORMATS}, got {self.format!r}")
        why = layout_mismatch(self)
        if why:
            raise BadInput(f"{self.format} cannot store {self.bits}-bit weights "
                           f"with {self.act_bits}-bit activations: {why}")

    @property
    def label(self) -> str:
        """Short human label such as ``gptq w4 g128`` or ``w4a8 g-1``."""
        act = f"a{self.act_bits}" if self.act_bits != 16 else ""
        return f"{self.backend} w{self.bits}{act} g{self.group_size}{' sym' if self.sym else ''}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "LayerSpec":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "spec") -> "LayerSpec":
        """Strictly parse a spec dict: unknown keys and wrong types are refused."""
        if not isinstance(d, dict):
            raise BadInput(f"{where}: expected an object with {', '.join(SPEC_FIELDS)}, got {type(d).__name__}")
        unknown = set(d) - set(SPEC_FIELDS) - {"cost_bytes", "estimate", "bpw", "numel"}
        if unknown:
            raise BadInput(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(SPEC_FIELDS)}")
        kwargs: dict[str, Any] = {}
        for key in SPEC_FIELDS:
            if key not in d:
                continue
            val = d[key]
            want = bool if key in ("sym", "act_order") else (str if key in ("backend", "format") else int)
            if want is int and (isinstance(val, bool) or not isinstance(val, int)):
                raise BadInput(f"{where}: {key} must be an integer, got {val!r}")
            if want is not int and not isinstance(val, want):
                raise BadInput(f"{where}: {key} must be {want.__name__}, got {val!r}")
            kwargs[key] = val
        return cls(**kwargs)


def layout_mismatch(spec: "LayerSpec") -> str | None:
    """Why no storage layout holds this (format, bits, act_bits) combination (None when one does)."""
    if spec.format == "w4a8" and (spec.bits != 4 or spec.act_bits != 8):
        return "w4a8 holds 4-bit weights for 8-bit activations"
    if spec.format == "int6" and spec.bits != 6:
        return "int6 holds 6-bit weights"
    if spec.format in ("gptq", "fp16", "bnb") and spec.act_bits == 8:
        return "int8 activations need the w4a8 (4-bit) or int6 (6-bit) format"
    return None


def default_format(bits: int, act_bits: int = 16, backend: str = "rtn") -> str:
    """The storage format for a weight/activation width: bnb backends keep their own format;
    W4A8 -> ``w4a8``; 6-bit weights (W6A16, W6A8) -> ``int6``; 16 -> ``fp16``; else GPTQ's layout."""
    if backend.startswith("bnb"):
        return "bnb"
    if bits == 16:
        return "fp16"
    if act_bits == 8:
        if bits == 4:
            return "w4a8"
        if bits == 6:
            return "int6"
        raise BadInput(f"int8 activations are supported with 4- or 6-bit weights, not {bits}-bit")
    return "int6" if bits == 6 else "gptq"


def make_spec(bits: int, group_size: int = 128, sym: bool = False, backend: str = "rtn", act_bits: int = 16,
              act_order: bool = False) -> LayerSpec:
    """A spec with its format derived by ``default_format`` (W4A8/W6A8 force symmetric weights)."""
    fmt = default_format(bits, act_bits, backend)
    return LayerSpec(bits=bits, group_size=group_size, sym=sym or act_bits == 8, backend=backend, format=fmt,
                     act_bits=act_bits, act_order=act_order)
