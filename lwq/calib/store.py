"""Calibration folders: ``calib.json`` (provenance, per-block statistics, linear names and shapes)
plus one ``block-NNNNN.safetensors`` per decoder block (Hessians and activation absmax).

A folder is written block by block into a temporary sibling and renamed into place, so a crash
never leaves a half-written calibration behind and Hessians can leave memory as soon as their
block is done. Hessians shared by a group of linears are stored once, under the group's first member.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lwq.calib.stats import BlockStats, CalibStats, LinearStats
from lwq.errors import BadInput

CALIB_VERSION = 1
CALIB_JSON = "calib.json"


def block_file(index: int) -> str:
    """File holding block ``index``'s tensors (Hessians and absmax of its group leaders)."""
    return f"block-{index:05d}.safetensors"


def is_calib_dir(path: str | Path) -> bool:
    """True for a folder holding a ``calib.json``."""
    return (Path(path).expanduser() / CALIB_JSON).is_file()


def calib_doc(stats: CalibStats, model_name: str, meta: dict[str, Any] | None = None,
              stored_hessians: set[str] | None = None) -> dict[str, Any]:
    """The JSON side of a calibration folder (everything but the tensors)."""
    def has_h(s: LinearStats) -> bool:
        return s.hessian is not None or (stored_hessians is not None and s.hessian_key in stored_hessians)

    block_index = {name: i for i, name in enumerate(stats.blocks)}
    return {
        "version": CALIB_VERSION,
        "model": model_name,
        **{k: v for k, v in stats.meta.items() if k != "model"},
        **(meta or {}),
        "blocks": {name: b.to_dict() for name, b in stats.blocks.items()},
        "linears": {name: {"shape": list(s.shape), "tokens": s.tokens, "hessian_key": s.hessian_key,
                           "hessian": has_h(s), "file": block_file(block_index[stats.block_of(name)])}
                    for name, s in stats.linears.items()},
    }


class CalibWriter:
    """Writes a calibration folder block by block (so Hessians need not all sit in memory) into a
    temporary sibling of ``out`` that ``finish`` renames into place."""

    def __init__(self, out: str | Path, force: bool = False, inputs: tuple[str | Path, ...] = ()) -> None:
        from lwq.fileio import check_output

        self.out = check_output(out, "calibration", force, inputs)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.stored: set[str] = set()

    def add_block(self, index: int, linears: dict[str, LinearStats]) -> dict[str, LinearStats]:
        """Write block ``index``'s tensors; returns its stats with the Hessians dropped from memory."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for name, s in linears.items():
            if name == s.hessian_key:
                tensors[f"absmax.{name}"] = s.absmax.contiguous()
                if s.hessian is not None:
                    tensors[f"hessian.{name}"] = s.hessian.contiguous()
                    self.stored.add(name)
        save_file(tensors, str(self.tmp / block_file(index)))
        return {n: LinearStats(s.name, s.shape, None, s.absmax, s.tokens, s.hessian_key) for n, s in linears.items()}

    def abort(self) -> None:
        """Remove the temporary folder (after a failure)."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp)

    def finish(self, stats: CalibStats, model_name: str, meta: dict[str, Any] | None = None) -> Path:
        """Write ``calib.json`` and move the folder into place."""
        from lwq.fileio import swap_in

        doc = calib_doc(stats, model_name, meta, self.stored)
        doc["files"] = sorted(p.name for p in self.tmp.iterdir())  # the output rule: what this folder holds
        (self.tmp / CALIB_JSON).write_text(json.dumps(doc, indent=1))
        swap_in(self.tmp, self.out)
        return self.out


def save_calib(stats: CalibStats, out_dir: str | Path, model_name: str, meta: dict[str, Any] | None = None,
               force: bool = False) -> Path:
    """Write in-memory ``stats`` to ``out_dir``; an existing ``out_dir`` is refused unless ``force``."""
    writer = CalibWriter(out_dir, force)
    for i, block in enumerate(stats.blocks):
        writer.add_block(i, {n: s for n, s in stats.linears.items() if n.startswith(block + ".")})
    return writer.finish(stats, model_name, meta)


def load_calib(path: str | Path, model: nn.Module | None = None) -> CalibStats:
    """Read a calibration folder; with ``model``, check that it was made for that model's linears."""
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    if not is_calib_dir(p):
        raise BadInput(f"{path} is not a calibration folder (no {CALIB_JSON})")
    try:
        doc = json.loads((p / CALIB_JSON).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"cannot read {p / CALIB_JSON}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != CALIB_VERSION:
        raise BadInput(f"{p / CALIB_JSON}: unsupported calibration version "
                       f"{doc.get('version') if isinstance(doc, dict) else '?'}")
    tensors: dict[str, torch.Tensor] = {}
    try:
        files = sorted({d["file"] for d in doc["linears"].values()})
        for fname in files:
            with safe_open(str(p / fname), framework="pt", device="cpu") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise BadInput(f"cannot read the tensors of {path}: {' '.join(str(exc).split())[:200]}") from None
    try:
        blocks = {name: BlockStats(**b) for name, b in doc["blocks"].items()}
        linears: dict[str, LinearStats] = {}
        for name, d in doc["linears"].items():
            key = d["hessian_key"]
            H = tensors[f"hessian.{key}"] if d["hessian"] else None
            linears[name] = LinearStats(name, (int(d["shape"][0]), int(d["shape"][1])), H, tensors[f"absmax.{key}"],
                                        int(d["tokens"]), key)
    except (KeyError, TypeError, IndexError) as exc:
        raise BadInput(f"{path}: calibration folder is incomplete or corrupt (missing {exc})") from None
    meta = {k: v for k, v in doc.items() if k not in ("blocks", "linears")}
    stats = CalibStats(blocks, linears, meta)
    if model is not None:
        check_matches(stats, model, str(path))
    return stats


def check_matches(stats: CalibStats, model: nn.Module, where: str = "calibration") -> None:
    """``BadInput`` unless ``stats`` covers exactly ``model``'s linears with the same shapes."""
    from lwq.models.arch import linear_names, linear_shape

    names = linear_names(model)
    if names != stats.linear_names:
        missing = sorted(set(names) ^ set(stats.linear_names))
        hint = f" (e.g. {missing[0]})" if missing else " (different order)"
        raise BadInput(f"{where} was made for another model: its linears differ from the model's{hint}")
    for n in names:
        shape = linear_shape(model.get_submodule(n))
        if tuple(shape) != tuple(stats.linears[n].shape):
            raise BadInput(f"{where} was made for another model: {n} is {tuple(stats.linears[n].shape)} there, "
                           f"{tuple(shape)} in the model")
