"""``lwq quantize``: quantize every block linear of MODEL the same way and write an lwq checkpoint."""
from __future__ import annotations

from typing import Any, Optional

import typer
from rich.table import Table

from lwq.commands.common import DEVICE_OPT, DTYPE_OPT, JSON_OPT, QUIET_OPT, TRUST_OPT, emit_json, fmt_bytes
from lwq.errors import BadInput
from lwq.models.arch import linear_names
from lwq.pipeline import LoadOptions, quantize_to_checkpoint
from lwq.spec import LayerSpec, make_spec
from lwq.ui import out_console, progress

# backends that fix the storage grid themselves: (bits, group size)
FIXED_GRID = {"bnb-nf4": (4, 64), "bnb-fp4": (4, 64), "bnb-int8": (8, -1)}


def uniform_spec(bits: int, group_size: int | None, sym: bool, backend: str, act_bits: int,
                 act_order: bool) -> LayerSpec:
    """The one spec of a uniform plan, with the option combinations checked."""
    from lwq.backends import get_backend

    get_backend(backend)
    if backend in FIXED_GRID:
        want_bits, want_group = FIXED_GRID[backend]
        if bits != want_bits:
            raise BadInput(f"--backend {backend} stores {want_bits}-bit weights; pass --bits {want_bits}")
        if group_size not in (None, want_group):
            raise BadInput(f"--backend {backend} uses a fixed group size of {want_group}")
        if act_bits != 16:
            raise BadInput(f"--backend {backend} is weight-only (--act-bits 16)")
        group_size = want_group
    if act_order and backend != "gptq":
        raise BadInput("--act-order applies to the gptq backend only")
    return make_spec(bits, 128 if group_size is None else group_size, sym, backend, act_bits, act_order)


def quantize_command(
    model: str = typer.Argument(..., help="Model folder or hub id (safetensors weights)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the checkpoint to."),
    bits: int = typer.Option(..., "--bits", help="Weight bits: 2, 3, 4, 6, 8 (16 keeps fp16)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Input columns per scale: 32, 64, 128 (default), 256 or -1 (per channel)."),
    sym: bool = typer.Option(False, "--sym/--no-sym", help="Symmetric grid (default: asymmetric with zero points)."),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: quantize columns by decreasing Hessian diagonal (desc_act)."),
    backend: str = typer.Option("rtn", "--backend", help="rtn, rtn-mse, gptq, bnb-nf4, bnb-fp4, bnb-int8."),
    act_bits: int = typer.Option(16, "--act-bits", help="16 (weight-only) or 8 (int8 activations: W4A8/W6A8)."),
    data: Optional[str] = typer.Option(None, "--data", help="Calibration text (.txt/.jsonl/folder or wikitext2/c4): needed by gptq and --act-bits 8."),
    nsamples: int = typer.Option(128, "--nsamples", help="Calibration windows."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per calibration window (capped at the model's context)."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling calibration windows."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in .jsonl files."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder (only once the new one is complete)."),
    dtype: str = DTYPE_OPT, device: str = DEVICE_OPT, trust_remote_code: bool = TRUST_OPT,
    json_out: bool = JSON_OPT, quiet: bool = QUIET_OPT,
) -> None:
    """Quantize every decoder-block linear of MODEL with one spec and write an lwq checkpoint."""
    spec = uniform_spec(bits, group_size, sym, backend, act_bits, act_order)
    for name, val in (("--nsamples", nsamples), ("--seqlen", seqlen)):
        if val < 1:
            raise BadInput(f"{name} must be positive, got {val}")
    with progress(quiet or json_out) as prog:
        task = prog.add_task(f"quantize {spec.label}", total=None)
        res = quantize_to_checkpoint(
            model, output, lambda m: {n: spec for n in linear_names(m)}, data, nsamples, seqlen, seed,
            LoadOptions(dtype, device, trust_remote_code), force, text_field,
            on_block=lambda i, n: prog.update(task, completed=i, total=n),
        )
    if json_out:
        emit_json(res.summary)
    else:
        _render(res.summary)


def _render(s: dict[str, Any]) -> None:
    table = Table(title=f"quantized {s['source']} -> {s['output']}")
    table.add_column("", justify="left")
    table.add_column("value", justify="right")
    rows = [
        ("backend", str(s["backend"])), ("bits", str(s["bits"])), ("group size", str(s["group_size"])),
        ("symmetric", str(s["sym"])), ("format", str(s["format"])), ("layers", str(s["num_layers"])),
        ("bits per weight (real)", f"{s['bits_per_weight']:.3f}"),
        ("quantized weights", fmt_bytes(s["quantized_bytes"])), ("checkpoint", fmt_bytes(s["checkpoint_bytes"])),
        ("seconds", f"{s['seconds']:.1f}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    out_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
