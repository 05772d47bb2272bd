"""``lwq plan``: choose bits per layer under a budget and write the plan as editable JSON."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from lwq.commands.common import (DEVICE_OPT, DEVICES_OPT, DTYPE_OPT, JSON_OPT, MAX_MEMORY_OPT, QUIET_OPT, TRUST_OPT,
                                 check_seed, emit_json, fmt_bytes, parse_size, refuse_checkpoint)
from lwq.commands.options import PlanFlags, with_plan_flags
from lwq.errors import BadInput
from lwq.ui import err_console, out_console, progress

if TYPE_CHECKING:
    from lwq.allocate.planfile import Plan


@with_plan_flags
def plan_command(
    model: str = typer.Argument(..., help="Model folder or hub id."),
    output: str = typer.Option(..., "--output", "-o", help="Plan JSON to write."),
    flags: PlanFlags = PlanFlags(),
    backend: Optional[str] = typer.Option(None, "--backend", help="Backend the plan's specs name (default gptq)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Group size of the candidates (default 128)."),
    sym: Optional[bool] = typer.Option(None, "--sym/--no-sym", help="Symmetric or asymmetric candidates only (default: both, the solver picks per layer)."),
    act_bits: Optional[int] = typer.Option(None, "--act-bits", help="16 (weight-only) or 8 (W4A8/W6A8 candidates)."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling and for the random/search solvers."),
    error_db: Optional[str] = typer.Option(None, "--error-db", help="JSON of measured candidate errors: reused if present, written after measuring."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in .jsonl files."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG of bits per layer."),
    force: bool = typer.Option(False, "--force", help="Replace an existing plan file."),
    dtype: str = DTYPE_OPT, device: str = DEVICE_OPT, devices: Optional[str] = DEVICES_OPT,
    max_memory: Optional[str] = MAX_MEMORY_OPT, trust_remote_code: bool = TRUST_OPT, json_out: bool = JSON_OPT, quiet: bool = QUIET_OPT,
) -> None:
    """Plan bits per layer of MODEL under a budget; the plan is JSON you can edit and pass to `lwq quantize --plan`."""
    from lwq.allocate.planfile import plan_to_dict, save_plan
    from lwq.pipeline import LoadOptions, plan_for_model
    from lwq.score.workers import parse_devices

    if Path(output).is_dir():
        raise BadInput(f"plan output {output} is a folder; give a file name such as plan.json")
    if Path(output).exists() and not force:
        raise BadInput(f"output {output} already exists; pass --force to replace it")
    check_seed(seed)
    refuse_checkpoint(model, "plan")
    flags.check(model)
    recipe = flags.recipe(backend, group_size, sym, act_bits)
    workers = parse_devices(devices)
    if recipe.budget is None:
        raise BadInput("no budget: pass --budget (e.g. 3.25bit, 4GB, 0.25x) or a --config recipe with one")
    with progress(quiet or json_out) as prog:
        task = prog.add_task(f"planning ({recipe.solver}, {recipe.scorer})", total=None)
        plan, _ = plan_for_model(model, recipe, recipe.data, recipe.nsamples, recipe.seqlen, seed,
                                 LoadOptions(dtype, device, trust_remote_code, parse_size(max_memory, "--max-memory")),
                                 text_field, flags.calib,
                                 lambda i, n: prog.update(task, completed=i, total=n), error_db=error_db,
                                 devices=workers)
    save_plan(plan, output)
    if plot:
        from lwq.allocate.plot import plot_bits

        plot_bits(plan, plot, title=f"{model}: {plan.budget} ({plan.solver}, {plan.scorer})")
    doc = {**plan_to_dict(plan), "output": str(Path(output).resolve()), "plot": plot}
    if json_out:
        emit_json(doc)
    else:
        render_plan(plan)
        err_console(quiet).print(f"plan written to {output}" + (f", plot to {plot}" if plot else ""))


def render_plan(plan: Plan) -> None:
    """A rich table of the plan and its totals."""
    from rich.table import Table

    table = Table(title=f"plan: {plan.budget} with {plan.solver} ({plan.scorer}); {plan.counted}; {plan.kept_16bit}")
    for col in ("layer", "bits", "group", "format", "bytes", "bpw", "estimate"):
        table.add_column(col, justify="left" if col in ("layer", "format") else "right")
    for name, e in plan.layers.items():
        bpw = 8 * e.cost_bytes / e.numel if e.cost_bytes and e.numel else None
        table.add_row(name, str(e.spec.bits), str(e.spec.group_size), e.spec.format,
                      fmt_bytes(e.cost_bytes) if e.cost_bytes is not None else "?",
                      f"{bpw:.3f}" if bpw else "?", f"{e.estimate:.3g}" if e.estimate is not None else "")
    con = out_console()
    con.print(table)
    mix: Any = Counter(e.spec.bits for e in plan.layers.values())
    total = plan.total_bytes
    con.print(f"layers by bits: {', '.join(f'{b}-bit x{n}' for b, n in sorted(mix.items()))}; "
              f"real bits per weight {plan.bits_per_weight:.4f}; quantized layers {fmt_bytes(total or 0)}")


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
