"""``lwq demo``: the whole job, offline, on a model the project builds itself."""
from __future__ import annotations

import typer

from lwq.commands.common import JSON_OPT, QUIET_OPT, emit_json
from lwq.ui import err_console, out_console, progress


def demo_command(
    rebuild: bool = typer.Option(False, "--rebuild", help="Retrain the cached demo model."),
    out: str = typer.Option("lwq-demo", "-o", "--output", help="Folder for the demo's checkpoints and report."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder not written by the demo."),
    json_out: bool = JSON_OPT, quiet: bool = QUIET_OPT,
) -> None:
    """Build (once, ~2 min) a small Llama trained on the stdlib's docstrings, then run the pipeline."""
    from rich.table import Table

    from pathlib import Path

    from lwq.pipeline.demo import check_output, run_demo
    from lwq.models.toy import demo_model

    check_output(Path(out).expanduser(), force)  # before minutes of training

    log = err_console(quiet or json_out)
    with progress(quiet or json_out) as prog:
        task = prog.add_task("training the demo model (cached after the first run)", total=None)
        folder = demo_model(rebuild, lambda s, n, loss: prog.update(task, completed=s, total=n,
                                                                   description=f"training the demo model, loss {loss:.2f}"))
    log.print(f"demo model: {folder / 'model'}")
    result = run_demo(folder, out, force=force, log=lambda m: log.print(f"[bold]demo:[/] {m}"))
    if json_out:
        emit_json(result)
    else:
        table = Table(title="lwq demo: perplexity on held-out stdlib docstrings")
        for col in ("variant", "bits/weight", "perplexity"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for r in result["rows"]:
            table.add_row(r["variant"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.3f}")
        out_console().print(table)
        log.print(f"checkpoints and report in {result['output']} (report: {result['report']})")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
