"""``lwq eval``: perplexity as a table or JSON, with CI gates that set the exit code."""
from __future__ import annotations

from typing import Any, Optional

import typer
from rich.table import Table

from lwq.commands.common import DEVICE_OPT, DTYPE_OPT, JSON_OPT, QUIET_OPT, TRUST_OPT, emit_json, parse_percent
from lwq.errors import BadInput, GateFailed
from lwq.pipeline import LoadOptions, evaluate_ppl
from lwq.ui import err_console, out_console, progress


def _ppl(name: str, label: str, quiet: bool, **kw: Any) -> Any:
    with progress(quiet) as prog:
        task = prog.add_task(f"perplexity {label}", total=None)
        return evaluate_ppl(name, on_step=lambda i, n: prog.update(task, completed=i, total=n), **kw)


def eval_command(
    model: str = typer.Argument(..., help="Model folder, hub id or lwq checkpoint."),
    data: str = typer.Option("wikitext2", "--data", help="Text: a .txt/.jsonl file, a folder of .txt, or wikitext2/c4/ptb."),
    seqlen: int = typer.Option(256, "--seqlen", help="Tokens per window."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Window step (default: seqlen, disjoint windows)."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Evaluate at most this many windows."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in .jsonl files."),
    max_ppl: Optional[float] = typer.Option(None, "--max-ppl", help="Fail (exit 1) if perplexity exceeds this."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Reference model for --max-ppl-increase."),
    max_ppl_increase: Optional[str] = typer.Option(None, "--max-ppl-increase", help="Fail if ppl exceeds the baseline's by more than this (5% or 0.05)."),
    dtype: str = DTYPE_OPT, device: str = DEVICE_OPT, trust_remote_code: bool = TRUST_OPT,
    json_out: bool = JSON_OPT, quiet: bool = QUIET_OPT,
) -> None:
    """Perplexity of MODEL on a text source (sliding window; see README), with CI gates."""
    increase = parse_percent(max_ppl_increase, "--max-ppl-increase") if max_ppl_increase is not None else None
    if increase is not None and baseline is None:
        raise BadInput("--max-ppl-increase needs --baseline MODEL")
    if max_ppl is not None and max_ppl <= 0:
        raise BadInput(f"--max-ppl must be positive, got {max_ppl}")
    for name, val in (("--seqlen", seqlen), ("--batch-size", batch_size)):
        if val < 1:
            raise BadInput(f"{name} must be positive, got {val}")
    kw: dict[str, Any] = dict(data=data, seqlen=seqlen, stride=stride, max_windows=max_samples, batch_size=batch_size,
                              load=LoadOptions(dtype, device, trust_remote_code), text_field=text_field)
    res = _ppl(model, model, quiet or json_out, **kw)
    doc: dict[str, Any] = {"model": model, "data": data, **res.to_dict()}
    gates = []
    if max_ppl is not None:
        gates.append({"gate": "max_ppl", "limit": max_ppl, "value": res.perplexity, "passed": res.perplexity <= max_ppl})
    if baseline is not None:
        base = _ppl(baseline, baseline, quiet or json_out, **kw)
        rel = res.perplexity / base.perplexity - 1
        doc["baseline"] = {"model": baseline, **base.to_dict()}
        doc["ppl_increase"] = rel
        if increase is not None:
            gates.append({"gate": "max_ppl_increase", "limit": increase, "value": rel, "passed": rel <= increase})
    doc["gates"] = gates
    doc["passed"] = all(g["passed"] for g in gates)
    if json_out:
        emit_json(doc)
    else:
        _render(doc)
    failed = [g for g in gates if not g["passed"]]
    if failed:
        g = failed[0]
        raise GateFailed(f"gate {g['gate']} failed: {g['value']:.4g} > {g['limit']:.4g}")


def _render(doc: dict[str, Any]) -> None:
    table = Table(title="perplexity")
    for col in ("model", "data", "ppl", "nll", "tokens", "windows", "seqlen", "stride"):
        table.add_column(col, justify="left" if col in ("model", "data") else "right")
    rows = [doc] + ([doc["baseline"]] if "baseline" in doc else [])
    for r in rows:
        table.add_row(r["model"], doc["data"], f"{r['perplexity']:.3f}", f"{r['nll']:.4f}", str(r["tokens"]),
                      str(r["windows"]), str(r["seqlen"]), str(r["stride"]))
    out_console().print(table)
    if "ppl_increase" in doc:
        out_console().print(f"ppl increase over baseline: {doc['ppl_increase'] * 100:+.2f}%")
    for g in doc["gates"]:
        status = "[green]pass[/]" if g["passed"] else "[red]FAIL[/]"
        err_console().print(f"gate {g['gate']}: {g['value']:.4g} (limit {g['limit']:.4g}) {status}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
