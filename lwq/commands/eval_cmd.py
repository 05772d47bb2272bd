"""``lwq eval``: perplexity as a table or JSON, with CI gates that set the exit code."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Tuple

import typer

from lwq.commands.common import (DEVICE_OPT, DTYPE_OPT, JSON_OPT, QUIET_OPT, TRUST_OPT, emit, emit_json,
                                 parse_percent, parse_size, resolve_seqlen)
from lwq.errors import BadInput, GateFailed
from lwq.ui import err_console, out_console, progress

if TYPE_CHECKING:
    from lwq.pipeline import LoadOptions


def _ppl(name: str, label: str, quiet: bool, **kw: Any) -> Any:
    from lwq.pipeline import evaluate_ppl

    with progress(quiet) as prog:
        task = prog.add_task(f"perplexity {label}", total=None)
        return evaluate_ppl(name, on_step=lambda i, n: prog.update(task, completed=i, total=n), **kw)


DEFAULT_DATA = "wikitext2"


def _evaluate(name: str, data: str | None, tasks: list[str] | None, limit: int | None, quiet: bool,
              kw: dict[str, Any]) -> dict[str, Any]:
    """One model loaded once: perplexity on ``data`` (when given) and lm-eval ``tasks`` (when given)."""
    from lwq.eval.harness import run_tasks

    from lwq.models.load import load_tokenizer
    from lwq.pipeline.load import load_model

    load = kw["load"]
    model = load_model(name, load.dtype, load.device, load.trust_remote_code)
    doc: dict[str, Any] = {"model": name}
    if data is not None:
        doc.update(_ppl(name, name, quiet, model=model, **{**kw, "data": data}).to_dict())
    if tasks:
        doc["tasks"] = run_tasks(model, load_tokenizer(name, load.trust_remote_code), tasks, limit, kw["batch_size"])
    return doc


def eval_command(
    model: Optional[str] = typer.Argument(None, help="Model folder, hub id or lwq checkpoint (or use --compare A B)."),
    data: Optional[str] = typer.Option(None, "--data", help="Text: a .txt/.jsonl file, a folder of .txt, or wikitext2/c4/ptb (default wikitext2; with --tasks, perplexity only when given)."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Tokens per window (default 256, capped at the model's context; more than the context is refused)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Window step (default: seqlen, disjoint windows)."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Evaluate at most this many windows."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in .jsonl files."),
    max_ppl: Optional[float] = typer.Option(None, "--max-ppl", help="Fail (exit 1) if perplexity exceeds this."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Reference model for --max-ppl-increase."),
    max_ppl_increase: Optional[str] = typer.Option(None, "--max-ppl-increase", help="Fail if ppl exceeds the baseline's by more than this (5% or 0.05)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval-harness tasks, zero-shot, e.g. hellaswag,arc_easy (needs lwq[lm-eval])."),
    limit: Optional[int] = typer.Option(None, "--limit", help="With --tasks: at most this many examples per task."),
    compare: Optional[Tuple[str, str]] = typer.Option(None, "--compare", metavar="A B", help="Evaluate two models on the same data and show them side by side with deltas."),
    dtype: str = DTYPE_OPT, device: str = DEVICE_OPT, trust_remote_code: bool = TRUST_OPT,
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Bytes a whole model may take on its device (e.g. 20GiB); a larger plain safetensors model is evaluated one block at a time from its files. Default: 80% of what is free."),
    json_out: bool = JSON_OPT, quiet: bool = QUIET_OPT,
) -> None:
    """Perplexity of MODEL on a text source (sliding window; see README), with CI gates; zero-shot tasks
    with --tasks; two models side by side with --compare A B."""
    from lwq.eval.harness import lm_eval_module, parse_tasks
    from lwq.pipeline import LoadOptions

    load = LoadOptions(dtype, device, trust_remote_code, parse_size(max_memory, "--max-memory"))
    task_list = parse_tasks(tasks) if tasks is not None else None
    if limit is not None and task_list is None:
        raise BadInput("--limit applies to --tasks")
    if task_list is not None:
        lm_eval_module()  # fail before loading anything when the extra is missing
    gated = max_ppl is not None or baseline is not None or max_ppl_increase is not None
    if compare is not None:
        if model is not None:
            raise BadInput("give either MODEL or --compare A B, not both")
        if gated:
            raise BadInput("--compare does not take gates (--max-ppl, --baseline, --max-ppl-increase)")
        seqlen = min(resolve_seqlen(m, seqlen, 256) for m in compare)
        return _compare(list(compare), data, task_list, limit, seqlen, stride, max_samples, batch_size, text_field,
                        load, json_out, quiet)
    if model is None:
        raise BadInput("give a MODEL to evaluate (or --compare A B)")
    seqlen = resolve_seqlen(model, seqlen, 256)
    if task_list is not None and data is None and not gated:
        return _tasks_only(model, task_list, limit, batch_size, load,
                           json_out, quiet)
    data = data if data is not None else DEFAULT_DATA
    increase = parse_percent(max_ppl_increase, "--max-ppl-increase") if max_ppl_increase is not None else None
    if increase is not None and baseline is None:
        raise BadInput("--max-ppl-increase needs --baseline MODEL")
    if max_ppl is not None and not max_ppl > 0:  # NaN too
        raise BadInput(f"--max-ppl must be positive, got {max_ppl}")
    for name, val in (("--seqlen", seqlen), ("--batch-size", batch_size)):
        if val < 1:
            raise BadInput(f"{name} must be positive, got {val}")
    kw: dict[str, Any] = dict(data=data, seqlen=seqlen, stride=stride, max_windows=max_samples, batch_size=batch_size,
                              load=load, text_field=text_field)
    if task_list is None:
        doc: dict[str, Any] = {"model": model, "data": data, **_ppl(model, model, quiet or json_out, **kw).to_dict()}
    else:
        one = _evaluate(model, data, task_list, limit, quiet or json_out, kw)
        doc = {"model": model, "data": data, **{k: v for k, v in one.items() if k != "model"}}
    ppl = doc["perplexity"]
    gates = []
    if max_ppl is not None:
        gates.append({"gate": "max_ppl", "limit": max_ppl, "value": ppl, "passed": ppl <= max_ppl})
    if baseline is not None:
        base = _ppl(baseline, baseline, quiet or json_out, **kw)
        rel = ppl / base.perplexity - 1
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
        if "tasks" in doc:
            _render_tasks(doc)
    failed = [g for g in gates if not g["passed"]]
    if failed:
        g = failed[0]
        raise GateFailed(f"gate {g['gate']} failed: {g['value']:.4g} > {g['limit']:.4g}")


def _render(doc: dict[str, Any]) -> None:
    from rich.table import Table

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


def _tasks_only(model: str, tasks: list[str], limit: int | None, batch_size: int, load: LoadOptions, json_out: bool,
                quiet: bool) -> None:
    doc = _evaluate(model, None, tasks, limit, quiet or json_out, {"load": load, "batch_size": batch_size})
    emit(doc, json_out, _render_tasks)


def _render_tasks(doc: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"lm-eval tasks: {doc['model']}")
    for col in ("task", "metric", "value"):
        table.add_column(col, justify="left" if col != "value" else "right")
    for task, metrics in doc["tasks"].items():
        for metric, value in metrics.items():
            table.add_row(task, metric, f"{value:.4f}")
    out_console().print(table)


def _compare(names: list[str], data: str | None, tasks: list[str] | None, limit: int | None, seqlen: int,
             stride: Optional[int], max_samples: Optional[int], batch_size: int, text_field: str, load: LoadOptions,
             json_out: bool, quiet: bool) -> None:
    """``--compare A B``: both models on the same data (and tasks), side by side with deltas (B - A)."""
    from rich.table import Table
    from lwq.eval.harness import compare_docs

    if data is None and tasks is None:
        data = DEFAULT_DATA
    kw: dict[str, Any] = dict(seqlen=seqlen, stride=stride, max_windows=max_samples, batch_size=batch_size, load=load,
                              text_field=text_field)
    a, b = (_evaluate(n, data, tasks, limit, quiet or json_out, kw) for n in names)
    doc = {"compare": names, "data": data, **compare_docs(a, b)}
    if json_out:
        emit_json(doc)
        return
    table = Table(title=f"{names[0]} (A) vs {names[1]} (B)" + (f" on {data}" if data else ""))
    for col in ("metric", "A", "B", "B - A"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    d = doc["delta"]
    for key in ("perplexity", "nll"):
        if key in d:
            rel = f" ({d['perplexity_relative'] * 100:+.2f}%)" if key == "perplexity" else ""
            table.add_row(key, f"{a[key]:.4f}", f"{b[key]:.4f}", f"{d[key]:+.4f}{rel}")
    for task, metrics in d.get("tasks", {}).items():
        for metric, diff in metrics.items():
            table.add_row(f"{task} {metric}", f"{a['tasks'][task][metric]:.4f}", f"{b['tasks'][task][metric]:.4f}",
                          f"{diff:+.4f}")
    out_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
