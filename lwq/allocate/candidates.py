"""Candidates per layer: specs with exact byte costs, and the error tables the solvers read.

(a) ``with_importance``: a scorer's per-layer importance (what ``order`` ranks by), turned into
    per-candidate errors ``importance * 4**-bits`` (uniform quantization noise power falls 4x per bit);
(b) per-candidate errors computed from weights (``lwq.score.hessian.hessian_errors``) or measured;
(c) ``ErrorDB``: measured errors per (layer, spec key), filled once by a ``measure`` callable, saved
    as JSON and reused across budgets (EvoPress's database).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


from lwq.allocate.types import Candidate, LayerCandidates
from lwq.errors import BadInput
from lwq.fileio import read_text, write_json_atomic
from lwq.formats.bytes import layer_bytes
from lwq.spec import LayerSpec, make_spec

DEFAULT_BITS = (2, 3, 4, 6, 8)
DB_VERSION = 1


def make_candidates(shapes: Mapping[str, tuple[int, int]], bits: Sequence[int] = DEFAULT_BITS,
                    backend: str = "rtn", group_size: int = 128, sym: bool | Sequence[bool] = False, act_bits: int = 16,
                    extra_specs: Sequence[LayerSpec] = (),
                    serve: Callable[[LayerSpec, int], LayerSpec | None] | None = None) -> list[LayerCandidates]:
    """One ``LayerCandidates`` per linear (in ``shapes`` order, name -> (out, in)): a spec per width in
    ``bits`` and grid in ``sym`` (one bool, or several: ``(False, True)`` offers each width with and
    without zero points) built by ``make_spec`` (6-bit gets the ``int6`` format) plus ``extra_specs`` (bnb nf4,
    int8, ...), each with its exact byte cost. ``serve(spec, in_features)``: the spec a serving target
    takes instead (symmetric, a whole group size, ...) or None to drop it (a target's rule,
    ``lwq.formats.targets.served_spec``). Errors start as ``nan``; fill them with the functions below."""
    if not bits and not extra_specs:
        raise BadInput("no candidate bit widths given")
    grids = (sym,) if isinstance(sym, bool) else tuple(dict.fromkeys(sym))
    if not grids:
        raise BadInput("no candidate grid (symmetric or not) given")
    specs = list(dict.fromkeys(make_spec(b, group_size, s, backend, act_bits)
                               for b in sorted(set(bits)) for s in grids))
    specs += [s for s in extra_specs if s not in specs]
    out = []
    for name, (o, i) in shapes.items():
        mine = specs if serve is None else list(dict.fromkeys(x for x in (serve(s, int(i)) for s in specs) if x))
        if not mine:
            raise BadInput(f"no candidate spec of {name} is served by the target (widths "
                           f"{', '.join(str(s.bits) for s in specs)})")
        cands = tuple(Candidate(s, layer_bytes(int(o), int(i), s)) for s in mine)
        out.append(LayerCandidates(name, int(o) * int(i), (int(o), int(i)), cands))
    return out


def with_importance(layers: Sequence[LayerCandidates], scores: Mapping[str, float]) -> list[LayerCandidates]:
    """Attach a scorer's per-layer importance and set each candidate's error to
    ``importance * 4**-bits`` (0 for 16-bit). Every layer needs a finite score."""
    out = []
    for lc in layers:
        if lc.name not in scores:
            raise BadInput(f"no importance score for layer {lc.name}")
        s = float(scores[lc.name])
        if not math.isfinite(s):
            raise BadInput(f"importance score of layer {lc.name} is not finite: {s}")
        errs = [0.0 if c.spec.bits >= 16 else s * 4.0 ** (-c.spec.bits) for c in lc.candidates]
        out.append(lc.with_importance(s).replace_errors(errs))
    return out


def spec_key(spec: LayerSpec) -> str:
    """The database key of a spec: its label plus format and act-order (``gptq w4 g128|gptq``)."""
    return f"{spec.label}|{spec.format}{'|act_order' if spec.act_order else ''}"


@dataclass(frozen=True)
class ErrorDB:
    """Measured error per (layer name, ``spec_key``), with ``meta`` describing how it was measured
    (model, data, samples) so a reuse can check it matches."""

    entries: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def get(self, name: str, spec: LayerSpec) -> float | None:
        return self.entries.get(name, {}).get(spec_key(spec))

    def to_dict(self) -> dict[str, Any]:
        return {"version": DB_VERSION, "meta": dict(self.meta),
                "entries": {n: dict(e) for n, e in self.entries.items()}}


def fill_error_db(db: ErrorDB, layers: Sequence[LayerCandidates], measure: Callable[[str, LayerSpec], float],
                  on_step: Callable[[int, int], None] | None = None) -> ErrorDB:
    """A new database with every missing (layer, candidate) measured by ``measure(name, spec)``;
    existing entries are reused. ``on_step(done, total)`` reports progress over the missing ones."""
    todo = [(lc.name, c.spec) for lc in layers for c in lc.candidates if db.get(lc.name, c.spec) is None]
    entries = {n: dict(e) for n, e in db.entries.items()}
    for k, (name, spec) in enumerate(todo):
        err = float(measure(name, spec))
        if not math.isfinite(err):
            raise BadInput(f"measured error of {name} at {spec.label} is not finite: {err}")
        entries.setdefault(name, {})[spec_key(spec)] = err
        if on_step is not None:
            on_step(k + 1, len(todo))
    return ErrorDB(entries, dict(db.meta))


def db_errors(layers: Sequence[LayerCandidates], db: ErrorDB) -> list[LayerCandidates]:
    """Set every candidate's error from the database; a missing entry is an error naming it."""
    out = []
    for lc in layers:
        errs = []
        for c in lc.candidates:
            e = db.get(lc.name, c.spec)
            if e is None:
                raise BadInput(f"error database has no entry for {lc.name} at {spec_key(c.spec)}; fill it first")
            errs.append(e)
        out.append(lc.replace_errors(errs))
    return out


def save_error_db(db: ErrorDB, path: str | Path) -> None:
    """Write the database as JSON (atomically: temp file then rename)."""
    write_json_atomic(path, db.to_dict(), indent=1)


def load_error_db(path: str | Path) -> ErrorDB:
    """Read a database written by ``save_error_db``; malformed files are one-line ``BadInput``s."""
    path = Path(path)
    try:
        d = json.loads(read_text(path, "error database"))
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(d, dict) or d.get("version") != DB_VERSION or not isinstance(d.get("entries"), dict):
        raise BadInput(f"{path}: not an lwq error database (expected version {DB_VERSION} with 'entries')")
    entries: dict[str, dict[str, float]] = {}
    for name, row in d["entries"].items():
        if not isinstance(row, dict):
            raise BadInput(f"{path}: entries[{name!r}] must be an object of spec key -> error")
        for key, val in row.items():
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                raise BadInput(f"{path}: entries[{name!r}][{key!r}] must be a finite number, got {val!r}")
        entries[name] = {k: float(v) for k, v in row.items()}
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise BadInput(f"{path}: meta must be an object")
    return ErrorDB(entries, meta)
