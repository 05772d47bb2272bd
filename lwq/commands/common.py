"""Options and helpers shared by the commands."""
from __future__ import annotations

import json
import sys
from typing import Any, Callable

import typer

from lwq.errors import BadInput

JSON_OPT = typer.Option(False, "--json", help="Print one JSON document on stdout (logs go to stderr).")
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="No progress bars or logs.")
DTYPE_OPT = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, the model's half type on GPU), float32, float16, bfloat16.")
DEVICE_OPT = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N.")
DEVICES_OPT = typer.Option(None, "--devices", help="Measure the planning error database on several devices at once, one worker process each: cuda:0,cuda:1 or all (every visible GPU).")
MAX_MEMORY_OPT = typer.Option(None, "--max-memory", help="Planning: bytes a whole model may take on its device (e.g. 20GiB); a larger one keeps its blocks in CPU memory or on disk and moves one at a time. Default: 80% of what is free.")
TRUST_OPT = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code (off by default).")


def emit_json(obj: Any) -> None:
    """Write one JSON document to stdout; NaN and infinities become ``null`` (JSON has no such
    numbers: a bare ``NaN`` breaks every strict parser)."""
    sys.stdout.write(json.dumps(finite(json.loads(json.dumps(obj, default=_default))), indent=2,
                                allow_nan=False) + "\n")
    sys.stdout.flush()


def emit(doc: Any, json_out: bool, render: Callable[[Any], None]) -> None:
    """``doc`` as one JSON document on stdout (``--json``), else drawn by ``render`` (tables)."""
    if json_out:
        emit_json(doc)
    else:
        render(doc)


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (recursively through lists and dicts)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def _default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def parse_percent(text: str, option: str) -> float:
    """``5%`` -> 0.05, ``0.05`` -> 0.05; anything else is a one-line error."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise BadInput(f"{option}: expected a percentage such as 5% or 0.05, got {text!r}") from None
    if value < 0:
        raise BadInput(f"{option}: must not be negative, got {text!r}")
    return value


def parse_size(text: str | None, option: str) -> int | None:
    """``20GiB`` / ``500MB`` / ``1e9B`` -> bytes (None stays None); anything else is a one-line error."""
    from lwq.allocate.budget import parse_budget

    if text is None:
        return None
    try:
        size = parse_budget(text)
    except BadInput:
        size = None
    if size is None or size.kind != "bytes":
        raise BadInput(f"{option}: expected a size such as 20GiB or 500MB, got {text!r}")
    return int(size.value)


def fmt_bytes(n: float) -> str:
    """Human size: 1.23 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# options shared by `lwq plan` and `lwq quantize` (one definition, one help text)
BUDGET_OPT = typer.Option(None, "--budget", help="3.25bit (real bits per weight), 4GB / 3.5GiB (checkpoint bytes) or 0.25x (of fp16).")
CONFIG_OPT = typer.Option(None, "--config", help="A YAML recipe (configs/*.yaml); flags override it.")
SOLVER_OPT = typer.Option(None, "--solver", help="order (the paper), random, dp (default), ilp, search.")
SCORER_OPT = typer.Option(None, "--scorer", help="Error estimate: sensitivity (measured, default), linearity (a_l * t^2, linear in depth), hessian, lim, zd.")
CANDIDATE_BITS_OPT = typer.Option(None, "--candidate-bits", help="Bit widths the solver may choose from (default 2,3,4,6,8).")
MEASURE_WITH_OPT = typer.Option(None, "--measure-with", help="Measured estimate: quantize each trial as the checkpoint will hold it (backend: the candidate's backend and format, GPTQ included; the default) or with round-to-nearest (rtn: faster, rougher); refined: backend trials scaled per block and width by how much a short refinement of the whole block lowers its output error (plans for refined checkpoints; slower).")
TIE_OPT = typer.Option(None, "--tie", help="dp or ilp: none, fused (q/k/v and gate/up share one spec, as vLLM needs) or block.")
TARGET_OPT = typer.Option(None, "--target", help="Plan for a serving engine: vllm, transformers or gptqmodel (`lwq doctor` lists what each serves). Only candidates it serves are offered (vllm, transformers: symmetric; whole groups; its widths; vllm also ties fused q/k/v and gate/up), so `lwq export --target NAME` needs no --fix.")
CALIB_OPT = typer.Option(None, "--calib", help="Reuse an `lwq calibrate` folder's statistics for planning.")
DATA_OPT = typer.Option(None, "--data", help="Calibration text (.txt/.jsonl/folder or wikitext2/c4); without it, text sampled from the model itself.")


SEED_MAX = 2**63 - 1


def check_seed(seed: int) -> int:
    """``--seed``: a whole number torch and numpy take (0 .. 2**63-1)."""
    if not 0 <= seed <= SEED_MAX:
        raise BadInput(f"--seed must be a whole number from 0 to 2**63-1, got {seed}")
    return seed


def model_context(model: str) -> int | None:
    """The context length of a local model or checkpoint folder (None when unknown, e.g. a hub id)."""
    from pathlib import Path

    from lwq.models.load import read_config

    if not (Path(model).expanduser() / "config.json").is_file():
        return None
    cfg = read_config(model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool) and cfg[key] > 0:
            return int(cfg[key])
    return None


def resolve_seqlen(model: str, seqlen: int | None, default: int) -> int:
    """``--seqlen``: the given value, which must fit the model's context (refused with the limit), or
    ``default`` capped at the context when not given."""
    ctx = model_context(model)
    if seqlen is None:
        return min(default, ctx) if ctx else default
    if ctx is not None and seqlen > ctx:
        raise BadInput(f"--seqlen {seqlen} exceeds the context of {model} ({ctx} tokens)")
    return seqlen


def refuse_checkpoint(model: str, command: str) -> None:
    """``command`` reads an original model: an lwq checkpoint given instead is one line."""
    from lwq.models.load import is_lwq_checkpoint, looks_local

    if looks_local(model) and is_lwq_checkpoint(model):
        raise BadInput(f"{model} is an lwq checkpoint; lwq {command} reads the original (unquantized) model")

