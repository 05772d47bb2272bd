"""``lwq calibrate``: block-by-block calibration statistics saved to a folder (see ``lwq.calib``)."""
from __future__ import annotations

from typing import Any, Optional

import typer

from lwq.commands.common import (DEVICE_OPT, DTYPE_OPT, JSON_OPT, QUIET_OPT, check_seed, emit, refuse_checkpoint,
                                 resolve_seqlen)
from lwq.ui import out_console, progress


def calibrate_command(
    model: str = typer.Argument(..., help="Model folder or hub id."),
    data: str = typer.Option(..., "--data", help="Calibration text: a .txt/.jsonl file, a folder of .txt, or wikitext2/c4/ptb."),
    output: str = typer.Option(..., "-o", "--output", help="Folder to write (calib.json + stats.safetensors)."),
    nsamples: int = typer.Option(128, "--nsamples", help="Number of calibration windows."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Tokens per window (default 2048, capped at the model's context)."),
    seed: int = typer.Option(0, "--seed", help="Seed for picking the windows."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in .jsonl files."),
    no_lazy: bool = typer.Option(False, "--no-lazy", help="Load the whole model into memory instead of one block at a time."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
    dtype: str = DTYPE_OPT, device: str = DEVICE_OPT, json_out: bool = JSON_OPT, quiet: bool = QUIET_OPT,
) -> None:
    """Run MODEL one decoder block at a time on calibration text and save per-block statistics
    (cosine in/out, norms) and per-linear Hessians X^T X and activation absmax."""
    from lwq.pipeline import LoadOptions, calibrate_to_dir

    check_seed(seed)
    refuse_checkpoint(model, "calibrate")
    seqlen = resolve_seqlen(model, seqlen, 2048)
    with progress(quiet or json_out) as prog:
        task = prog.add_task("calibrating blocks", total=None)
        _, summary = calibrate_to_dir(
            model, data, output, nsamples, seqlen, seed, LoadOptions(dtype, device), force, text_field,
            batch_size, not no_lazy,
            on_block=lambda i, n: prog.update(task, completed=i, total=n))
    emit(summary, json_out, _render)


def _render(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"calibration of {summary['model']} ({summary['nsamples']} x {summary['seqlen']} tokens)")
    table.add_column("block", no_wrap=True)
    for col in ("cos(in,out)", "LIM", "|in| mean±std", "|out| mean±std"):
        table.add_column(col, justify="right")
    for name, b in summary["blocks"].items():
        table.add_row(name, f"{b['cos']:.4f}", f"{b['lim']:.4f}", f"{b['in_norm_mean']:.3g}±{b['in_norm_std']:.2g}",
                      f"{b['out_norm_mean']:.3g}±{b['out_norm_std']:.2g}")
    con = out_console()
    con.print(table)
    con.print(f"saved to {summary['output']} (loader: {summary['loader']})")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_command)
