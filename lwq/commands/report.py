"""``lwq report``: PNG figures (bits per layer, importance, quality against size) and report.md."""
from __future__ import annotations

from typing import List, Optional

import typer

from lwq.commands.common import JSON_OPT, QUIET_OPT, emit_json
from lwq.ui import err_console, out_console


def report_command(
    checkpoints: Optional[List[str]] = typer.Argument(None, help="lwq checkpoint folder(s); each may carry plan.json, scores.json and lwq_eval.json."),
    output: str = typer.Option(..., "--output", "-o", help="Folder for the PNGs and report.md."),
    results: Optional[List[str]] = typer.Option(None, "--results", help="JSON rows [{label, bits_per_weight, perplexity}] for the quality/size chart (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report folder (only an earlier "
                               "`lwq report` output, once the new one is complete)."),
    json_out: bool = JSON_OPT, quiet: bool = QUIET_OPT,
) -> None:
    """Figures and a markdown summary for CHECKPOINTS (and results files)."""
    from lwq.eval.report import publish_report

    doc = publish_report(checkpoints or [], output, results or [], force)
    if json_out:
        emit_json(doc)
        return
    figures = [p for s in doc["checkpoints"] for p in s["figures"].values()] + list(doc["figures"].values())
    for path in figures:
        out_console().print(path, highlight=False)
    err_console(quiet).print(f"summary: {doc['markdown']}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
