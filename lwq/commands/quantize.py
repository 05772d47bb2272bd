"""``lwq quantize``: quantize every block linear of MODEL the same way and write an lwq checkpoint."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

import typer

from lwq.commands.common import (DEVICES_OPT, DEVICE_OPT, DTYPE_OPT, JSON_OPT, MAX_MEMORY_OPT, QUIET_OPT, TRUST_OPT,
                                 check_seed, emit, fmt_bytes, parse_size)
from lwq.commands.options import PlanFlags, with_plan_flags
from lwq.errors import BadInput, LwqError
from lwq.ui import err_console, out_console, progress

if TYPE_CHECKING:
    from lwq.spec import LayerSpec
    from lwq.pipeline.refine import RefineConfig




def uniform_spec(bits: int, group_size: int | None, sym: bool, backend: str, act_bits: int,
                 act_order: bool) -> LayerSpec:
    """The one spec of a uniform plan, with the option combinations checked."""
    from lwq.spec import make_spec

    from lwq.backends import get_backend

    fixed = get_backend(backend).fixed_grid
    if fixed is not None:
        want_bits, want_group = fixed
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


@with_plan_flags
def quantize_command(
    model: str = typer.Argument(..., help="Model folder or hub id (safetensors weights)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the checkpoint to."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Uniform: weight bits 2, 3, 4, 6, 8 for every layer."),
    plan_file: Optional[str] = typer.Option(None, "--plan", help="Apply a plan JSON (from `lwq plan`, maybe hand-edited)."),
    flags: PlanFlags = PlanFlags(),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Input columns per scale: 32, 64, 128 (default), 256 or -1 (per channel)."),
    sym: Optional[bool] = typer.Option(None, "--sym/--no-sym", help="Symmetric grids (no zero points) or asymmetric. Default: asymmetric for --bits; for budgets, each width is offered both ways and the solver picks per layer."),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: quantize columns by decreasing Hessian diagonal (desc_act)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="rtn (default with --bits), rtn-mse, gptq (default with --budget), bnb-nf4, bnb-fp4, bnb-int8."),
    act_bits: Optional[int] = typer.Option(None, "--act-bits", help="16 (weight-only) or 8 (int8 activations: W4A8/W6A8)."),
    smooth_alpha: str = typer.Option("0.5", "--smooth-alpha", help="Int8-activation layers: SmoothQuant migration strength in [0, 1] (default 0.5), or off."),
    refine: Optional[str] = typer.Option(None, "--refine", help="block: after its backend, tune each block's rounding and grids so it reproduces the full-precision block's outputs (default for --budget, --plan and recipe runs, and for --bits runs given --data); none: keep the backend's result as it is."),
    refine_steps: Optional[int] = typer.Option(None, "--refine-steps", help="Refinement: signed-gradient steps per block (default 200; 0 = none)."),
    refine_lr: Optional[float] = typer.Option(None, "--refine-lr", help="Refinement: first step size (default 1/steps, decaying linearly to 0)."),
    refine_batch: int = typer.Option(8, "--refine-batch", help="Refinement: calibration windows per step (default 8)."),
    refine_norms: Optional[bool] = typer.Option(None, "--refine-norms/--no-refine-norms", help="Refinement: tune each block's normalization weights with its rounding and grids (default on; free in bytes)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Per-group grid of the rtn and gptq backends: minmax (default) or mse (clipping search; rtn -> rtn-mse, gptq -> gptq-mse)."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling calibration windows (same seed and inputs: byte-identical output)."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in .jsonl files."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder (only once the new one is complete); discard an unfinished run's OUT.partial."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished block (same arguments; progress is kept in OUT.partial)."),
    dtype: str = DTYPE_OPT, device: str = DEVICE_OPT, devices: Optional[str] = DEVICES_OPT,
    max_memory: Optional[str] = MAX_MEMORY_OPT, trust_remote_code: bool = TRUST_OPT, json_out: bool = JSON_OPT, quiet: bool = QUIET_OPT,
) -> None:
    """Quantize MODEL's decoder-block linears: uniformly (--bits), under a budget (--budget or a
    --config recipe: calibrate, score, plan, quantize), or by a plan file (--plan); write a checkpoint."""
    from lwq.backends import with_grid
    from lwq.pipeline.refine import REFINABLE_FORMATS, parse_refine
    from lwq.pipeline import LoadOptions, quantize_to_checkpoint, quantize_with_budget
    from lwq.score.workers import parse_devices

    modes = [m for m, v in (("--bits", bits), ("--budget", flags.budget), ("--plan", plan_file)) if v is not None]
    if len(modes) > 1:
        raise BadInput(f"give only one of --bits, --budget, --plan (got {' and '.join(modes)})")
    check_seed(seed)
    flags.check(model)
    load = LoadOptions(dtype, device, trust_remote_code, parse_size(max_memory, "--max-memory"))
    workers = parse_devices(devices)
    alpha = parse_alpha(smooth_alpha)
    if workers and flags.budget is None and flags.config is None:
        raise BadInput("--devices spreads planning measurements over devices: it needs --budget or a --config recipe")
    if grid is not None:
        grid = grid.strip().lower()
        with_grid("rtn", grid)  # check the name before anything runs
    if refine is not None:
        refine = parse_refine(refine)
    if bits is None:
        recipe = flags.recipe(backend, group_size, sym, act_bits, refine=refine, refine_steps=refine_steps,
                              refine_norms=refine_norms, grid=grid)
        cfg = refine_config(recipe.refine, recipe.refine_steps, refine_lr, refine_batch, recipe.refine_norms)
        if recipe.budget is None and plan_file is None:
            raise BadInput("nothing to do: pass --bits B, --budget (e.g. 3.25bit), --plan plan.json or a --config recipe")
        with progress(quiet or json_out) as prog:
            task = prog.add_task("plan and quantize", total=None)
            step = lambda i, n: prog.update(task, completed=i, total=n)  # noqa: E731
            res = quantize_with_budget(model, output, recipe, recipe.data, recipe.nsamples, recipe.seqlen, seed, load,
                                       force, text_field, flags.calib, step, step, plan=plan_file, resume=resume,
                                       devices=workers, smooth_alpha=alpha, refine=cfg, grid=recipe.grid,
                                       on_refine=refine_bar(prog) if cfg else None)
        half_on_cpu_note(load, quiet)  # after the run: a refused input stays one line
        _finish(res.summary, recipe.budget or res.summary.get("budget"), json_out)
        return
    if flags.config is not None:
        raise BadInput("--config recipes plan under a budget; drop --bits (or --config)")
    chosen = backend or "rtn"
    spec = uniform_spec(bits, group_size, bool(sym), chosen if grid is None else with_grid(chosen, grid), act_bits or 16,
                        act_order)
    data, nsamples, seqlen = flags.data, flags.nsamples or 128, flags.seqlen or 2048
    mode = refine or ("block" if data is not None and spec.format in REFINABLE_FORMATS else "none")
    cfg = refine_config(mode, 200 if refine_steps is None else refine_steps, refine_lr, refine_batch,
                        True if refine_norms is None else refine_norms)
    if cfg is not None and spec.format not in REFINABLE_FORMATS:
        raise BadInput(f"--refine block tunes integer grids (gptq, int6, w4a8 formats), not {spec.format}; "
                       "pass --refine none")
    plan_fn = uniform_plan(spec, flags.target)
    with progress(quiet or json_out) as prog:
        task = prog.add_task(f"quantize {spec.label}", total=None)
        res = quantize_to_checkpoint(
            model, output, plan_fn, data, nsamples, seqlen, seed,
            load, force, text_field, on_block=lambda i, n: prog.update(task, completed=i, total=n),
            resume=resume, lazy=True, smooth_alpha=alpha, refine=cfg, grid=grid or "minmax",
            on_refine=refine_bar(prog) if cfg else None,
        )
    half_on_cpu_note(load, quiet)
    _finish(res.summary, None, json_out)


def uniform_plan(spec: LayerSpec, target: str | None) -> Any:
    """``model -> plan`` giving every linear ``spec``; with a serving target, the spec it serves for each
    layer (symmetric, a whole group size), or one line naming a layer it cannot serve."""
    from lwq.models.arch import linear_names

    from lwq.formats.targets import TARGETS, check, served_spec

    if target is None:
        return lambda m: {n: spec for n in linear_names(m)}
    rule = TARGETS.get(target).widest()
    why = check(rule, dataclasses.replace(spec, group_size=-1, sym=True, act_order=False), 1 << 20)
    if why:
        raise BadInput(f"--target {target} does not serve {spec.label} ({spec.format}): {why[0]}")

    def plan(m: Any) -> dict[str, LayerSpec]:
        from lwq.models.arch import linear_shape

        out = {}
        for n in linear_names(m):
            served = served_spec(rule, spec, linear_shape(m.get_submodule(n))[1])
            if served is None:
                raise BadInput(f"--target {target} cannot serve {n} at {spec.label}")
            out[n] = served
        return out
    return plan


def refine_bar(prog: Any) -> Any:
    """A progress bar of the current block's refinement steps, its description showing the loss."""
    task = prog.add_task("refine", total=None)

    def update(step: int, steps: int, loss: float) -> None:
        prog.update(task, completed=step, total=steps, description=f"refine block: mse {loss:.3g}")
    return update


def refine_config(mode: str, steps: int, lr: float | None, batch: int, norms: bool = True) -> RefineConfig | None:
    """The refinement settings of a run (None for ``--refine none`` or 0 steps); bad values are BadInput."""
    from lwq.pipeline.refine import RefineConfig

    cfg = RefineConfig(steps, lr, batch, norms)
    return cfg if mode == "block" and steps > 0 else None


def parse_alpha(text: str) -> float | None:
    """``--smooth-alpha``: a number in [0, 1], or ``off``/``none`` (no smoothing)."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise BadInput(f"--smooth-alpha: expected a number in [0, 1] or off, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise BadInput(f"--smooth-alpha: must be in [0, 1], got {text!r}")
    return value


def half_on_cpu_note(load: Any, quiet: bool) -> None:
    """Say what ``--dtype float16/bfloat16`` costs on CPU, where float32 is the default."""
    import torch

    from lwq.models.load import resolve_device, resolve_dtype

    dev = resolve_device(load.device)
    dt = resolve_dtype(load.dtype, dev)
    if dev.type == "cpu" and dt.itemsize == 2:
        name = str(dt).replace("torch.", "")
        speed = ("and, on CPUs with bfloat16 matmuls, less time" if dt == torch.bfloat16 else
                 "but float16 matmuls are slow on most CPUs")
        err_console(quiet).print(f"note: computing in {name} on CPU (float32 is the default there): less memory, "
                                 f"{speed}; activations carry {name} rounding (GPTQ's Hessians and solves stay "
                                 "float32)", highlight=False, soft_wrap=True)


def _finish(summary: dict[str, Any], budget: str | None, json_out: bool) -> None:
    """Print the summary; a result above its budget (the run's, or the one a --plan file states:
    a hand-edited plan can exceed it) is a failure, exit 1, after the checkpoint is written."""
    emit(summary, json_out, _render)
    if budget is not None and summary.get("budget_exceeded"):
        raise LwqError(f"the checkpoint exceeds the budget {budget}: {summary['bits_per_weight']:.4f} bits per weight")


def _render(s: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"quantized {s['source']} -> {s['output']}")
    table.add_column("", justify="left")
    table.add_column("value", justify="right")
    rows = [
        ("backend", str(s["backend"])), ("bits", str(s["bits"])), ("group size", str(s["group_size"])),
        ("symmetric", str(s["sym"])), ("format", str(s["format"])), ("layers", str(s["num_layers"])),
        ("bits per weight (real)", f"{s['bits_per_weight']:.3f}"),
        *([("budget", str(s["budget"])), ("solver", str(s["solver"])), ("scorer", str(s["scorer"]))]
          if s.get("budget") else []),
        ("quantized weights", fmt_bytes(s["quantized_bytes"])), ("checkpoint", fmt_bytes(s["checkpoint_bytes"])),
        *([("computed in", f"{s['dtype']} on {s['device']}")] if s.get("dtype") else []),
        ("seconds", f"{s['seconds']:.1f}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    out_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
