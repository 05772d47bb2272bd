"""``lwq score``: rank layers by importance with one or more scorers (see ``lwq.score``)."""
from __future__ import annotations

from typing import Any, Optional

import typer

from lwq.commands.common import (DEVICE_OPT, DTYPE_OPT, JSON_OPT, QUIET_OPT, check_seed, emit_json,
                                 refuse_checkpoint, resolve_seqlen)
from lwq.score import SCORERS, ScoreConfig, parse_methods
from lwq.ui import err_console, out_console, progress


def score_command(
    source: str = typer.Argument(..., help="A calibration folder (from lwq calibrate) or a model."),
    method: str = typer.Option("lim,zd,hessian", "--method", help=f"Comma-separated scorers: {', '.join(SCORERS.names())}."),
    data: Optional[str] = typer.Option(None, "--data", help="Calibration text (needed for a model source; default: the calibration folder's)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model to load when SOURCE is a calibration folder (default: the path it records)."),
    granularity: str = typer.Option("block", "--granularity", help="block or linear."),
    bits: Optional[int] = typer.Option(None, "--bits", help="RTN bits for hessian (default 3) and sensitivity (default 2)."),
    group_size: int = typer.Option(128, "--group-size", help="RTN group size (-1 = per channel)."),
    zd_order: str = typer.Option("descending", "--zd-order", help="descending (default, agrees better with sensitivity): a high share of |z|>1 is important; ascending: a low share is."),
    metric: str = typer.Option("kl", "--metric", help="sensitivity measure: kl (to the full model) or nll (increase)."),
    nsamples: int = typer.Option(32, "--nsamples", help="Calibration windows for statistics and sensitivity."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Tokens per window (default 256, capped at the model's context)."),
    seed: int = typer.Option(0, "--seed", help="Seed for picking the windows."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in .jsonl files."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG bar chart of the scores here."),
    dtype: str = DTYPE_OPT, device: str = DEVICE_OPT, json_out: bool = JSON_OPT, quiet: bool = QUIET_OPT,
) -> None:
    """Score and rank layers (higher score / rank 1 = more important) with lim, zd, hessian, sensitivity."""
    from lwq.pipeline import LoadOptions, score_layers

    methods = parse_methods(method)
    check_seed(seed)
    refuse_checkpoint(source, "score")
    seqlen = resolve_seqlen(model or source, seqlen, 256)
    config = ScoreConfig(granularity=granularity, bits=bits, group_size=group_size, zd_order=zd_order, metric=metric)
    if plot is not None and not plot.lower().endswith(".png"):
        from lwq.errors import BadInput

        raise BadInput(f"--plot must name a .png file, got {plot}")
    with progress(quiet or json_out) as prog:
        blocks = prog.add_task("statistics", total=None, visible=False)
        trials = prog.add_task("sensitivity trials", total=None, visible=False)
        doc = score_layers(
            source, methods, config, data, model, nsamples, seqlen, seed, LoadOptions(dtype, device), text_field,
            on_step=lambda i, n: prog.update(trials, completed=i, total=n, visible=True),
            on_block=lambda i, n: prog.update(blocks, completed=i, total=n, visible=True))
    if plot is not None:
        from lwq.eval.plots import plot_scores

        names = [layer["name"] for layer in doc["layers"]]
        path = plot_scores(names, {m: [layer["scores"][m] for layer in doc["layers"]] for m in doc["methods"]}, plot,
                           title=f"layer importance ({doc['granularity']})")
        doc["plot"] = str(path)
    if json_out:
        emit_json(doc)
    else:
        _render(doc)
        if plot is not None:
            err_console(quiet).print(f"plot written to {doc['plot']}")


def _render(doc: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"layer importance ({doc['granularity']}; higher score, rank 1 = more important)")
    table.add_column("layer", no_wrap=True)
    for m in doc["methods"]:
        table.add_column(m, justify="right", no_wrap=True)
        table.add_column("rank", justify="right")
    for layer in doc["layers"]:
        cells = [layer["name"]]
        for m in doc["methods"]:
            cells += [f"{layer['scores'][m]:.4g}", str(layer["ranks"][m])]
        table.add_row(*cells)
    out_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("score")(score_command)
