"""``lwq export``: write an lwq checkpoint in the formats serving engines read (GPTQ, compressed-tensors)."""
from __future__ import annotations

from typing import Any

import typer

from lwq.commands.common import emit, JSON_OPT, QUIET_OPT, fmt_bytes
from lwq.errors import BadInput
from lwq.ui import err_console, out_console

FORMAT_HELP = ("gptq (GPTQ with GPTQModel's per-module dynamic overrides) or compressed-tensors (pack-quantized, "
               "one config group per scheme; needs pip install 'lwq[serve]'). Default: what --target reads best "
               "(vllm: gptq when every layer is 4/8-bit symmetric, else compressed-tensors; transformers: "
               "compressed-tensors; gptqmodel: gptq); gptq without --target.")
TARGET_HELP = ("What must load it: gptqmodel (GPTQ 2/3/4/8-bit, mixed, zero points, ragged groups), transformers "
               "(compressed-tensors any 2-8 bit mix, whole groups; or GPTQ with one width and group size), vllm "
               "(GPTQ 4/8-bit symmetric; compressed-tensors 2/3/4/6/8-bit symmetric, groups -1/32/64/128 dividing "
               "in_features, fused q/k/v and gate/up sharing a scheme). `lwq doctor` lists them.")


def resolve(fmt: str | None, target: str | None, src: Any) -> tuple[str, str]:
    """(format, target) from what was given (see FORMAT_HELP); unknown names list the valid ones."""
    from lwq.formats.targets import FORMAT_NAMES, TARGETS

    if fmt is not None and fmt not in FORMAT_NAMES:
        raise BadInput(f"unknown export format {fmt!r}; valid: {', '.join(FORMAT_NAMES)}")
    tgt = TARGETS.get(target) if target is not None else None
    if tgt is None:
        fmt = fmt or "gptq"
        return fmt, "gptqmodel" if fmt == "gptq" else "transformers"
    if fmt is None:
        fmt = tgt.formats[0]
        gptq = tgt.rule("gptq")
        if len(tgt.formats) > 1 and gptq is not None and fmt == "gptq":  # gptq only when every layer is its kind
            quant = [s for s in src.plan.values() if s.bits < 16 and s.format != "fp16"]
            if not all(s.format == "gptq" and s.bits in gptq.bits and (s.sym or gptq.asym) for s in quant):
                fmt = next(f for f in tgt.formats if f != "gptq")
    if tgt.rule(fmt) is None:
        raise BadInput(f"{tgt.name} does not read {fmt}; it reads {', '.join(tgt.formats)}")
    return fmt, tgt.name


def export_command(
    checkpoint: str = typer.Argument(..., help="An lwq checkpoint folder (made by lwq quantize)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the export to (built beside it, "
                               "renamed into place when complete)."),
    fmt: str = typer.Option(None, "--format", help=FORMAT_HELP),
    target: str = typer.Option(None, "--target", help=TARGET_HELP),
    fix: bool = typer.Option(False, "--fix", help="Re-quantize (RTN) what the target cannot take, to the nearest "
                             "servable spec, listing each change, instead of refusing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output, only if it is an lwq export "
                               "(or empty), once the new one is complete."),
    json_out: bool = JSON_OPT, quiet: bool = QUIET_OPT,
) -> None:
    """Export CHECKPOINT for a serving engine: GPTQ (config.json + quantize_config.json with dynamic overrides) or
    compressed-tensors pack-quantized."""
    from lwq.spec import __version__
    from lwq.formats.ct_export import export_compressed_tensors, require_library
    from lwq.formats.export import export_gptq
    from lwq.formats.export_io import open_source
    from lwq.fileio import check_output

    from lwq.formats.targets import FORMAT_NAMES, TARGETS

    if fmt is not None and fmt not in FORMAT_NAMES:  # cheap name checks before reading anything
        raise BadInput(f"unknown export format {fmt!r}; valid: {', '.join(FORMAT_NAMES)}")
    if target is not None:
        TARGETS.get(target)
    src = open_source(checkpoint)
    out = check_output(output, "export", force, inputs=[src.path])
    fmt, target = resolve(fmt, target, src)
    if fmt == "compressed-tensors":
        require_library()
        summary = export_compressed_tensors(src, out, target, fix, __version__)
    else:
        summary = export_gptq(src, out, target, fix, __version__)
    emit(summary, json_out, _render)
    log = err_console(quiet)
    for note in summary["notes"]:
        log.print(f"[yellow]note[/]: {note}", highlight=False)


def _render(s: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"exported {s['source']} -> {s['output']} ({s['format']} for {s['target']})")
    table.add_column("", justify="left")
    table.add_column("value", justify="right")
    if s["format"] == "gptq":
        d = s["default"]
        rows = [("default", f"w{d['bits']} g{d['group_size']}{' sym' if d['sym'] else ''}"
                            f"{' desc_act' if d['desc_act'] else ''}"),
                ("checkpoint_format", s["checkpoint_format"]),
                ("dynamic overrides", str(sum(k.startswith("+:") for k in s["dynamic"]))),
                ("skipped (16-bit)", str(sum(k.startswith("-:") for k in s["dynamic"])))]
    else:
        rows = [(f"scheme {i}", f"w{g['num_bits']} {'g' + str(g['group_size']) if g['group_size'] else 'channel'}"
                                f"{' sym' if g['symmetric'] else ''}: {g['targets']} layers")
                for i, g in enumerate(s["schemes"])]
        rows.append(("ignored (16-bit)", str(len(s["ignore"]))))
    rows += [("layers re-quantized", str(len(s["requantized"]))), ("size", fmt_bytes(s["bytes"]))]
    for k, v in rows:
        table.add_row(k, v)
    out_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
