"""``lwq export``: write an lwq checkpoint in another ecosystem's format (GPTQ for vLLM / GPTQModel)."""
from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from lwq.commands.common import JSON_OPT, QUIET_OPT, emit_json, fmt_bytes
from lwq.errors import BadInput
from lwq.ui import err_console, out_console

EXPORT_FORMATS = ("gptq",)


def export_command(
    checkpoint: str = typer.Argument(..., help="An lwq checkpoint folder (made by lwq quantize)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the export to."),
    fmt: str = typer.Option("gptq", "--format", help="Output format: gptq (GPTQ v1 with GPTQModel's dynamic overrides)."),
    target: str = typer.Option("gptqmodel", "--target", help="What must load it: gptqmodel (also transformers) or vllm "
                               "(checks 2/3/4/8 bits, whole groups, fused q/k/v and gate/up sharing a precision)."),
    fix: bool = typer.Option(False, "--fix", help="Re-quantize (RTN) what the target cannot take instead of refusing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder (only once the new one is complete)."),
    json_out: bool = JSON_OPT, quiet: bool = QUIET_OPT,
) -> None:
    """Export CHECKPOINT to a GPTQ checkpoint (config.json + quantize_config.json with per-module dynamic overrides)."""
    from lwq import __version__
    from lwq.formats.export import TARGETS, export_gptq

    if fmt not in EXPORT_FORMATS:
        raise BadInput(f"unknown export format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")
    TARGETS.get(target)
    summary = export_gptq(checkpoint, output, target, fix, force, __version__)
    if json_out:
        emit_json(summary)
        return
    _render(summary)
    log = err_console(quiet)
    for note in summary["notes"]:
        log.print(f"[yellow]note[/]: {note}", highlight=False)


def _render(s: dict[str, Any]) -> None:
    d = s["default"]
    table = Table(title=f"exported {s['source']} -> {s['output']} (gptq for {s['target']})")
    table.add_column("", justify="left")
    table.add_column("value", justify="right")
    rows = [("default", f"w{d['bits']} g{d['group_size']}{' sym' if d['sym'] else ''}{' desc_act' if d['desc_act'] else ''}"),
            ("dynamic overrides", str(sum(k.startswith("+:") for k in s["dynamic"]))),
            ("skipped (16-bit)", str(sum(k.startswith("-:") for k in s["dynamic"]))),
            ("layers re-quantized", str(len(s["requantized"]))), ("size", fmt_bytes(s["bytes"]))]
    for k, v in rows:
        table.add_row(k, v)
    out_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
