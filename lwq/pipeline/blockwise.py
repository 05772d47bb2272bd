"""The block-sequential quantization driver.

Block 0's inputs are captured once; then each decoder block is moved to the compute device, its
linears are quantized group by group in the architecture's order (the members of a group share
their input, so one Hessian ``H = X^T X`` and one activation absmax serve them all), later groups
being calibrated on the outputs of the already-quantized earlier ones, and the quantized block
produces the next block's inputs. Layers missing from the plan are left as they are.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lwq.backends import QuantizedWeight, get_backend, needs_hessian, quantize_weight
from lwq.pipeline.refine import OnStep, RefineConfig, RefineReport, refine_block
from lwq.calib.stats import InputAccumulator
from lwq.models.blocks import (BlockInputs, BlockLoader, ResidentBlocks, block_norms, block_outputs,
                               capture_block_inputs, move_outside_blocks, run_block)
from lwq.errors import BadInput
from lwq.formats.layouts import get_layout
from lwq.formats.qlinear import QuantizedLinear, quantized_from_linear, replace_linear
from lwq.models.arch import arch_for, block_index, get_blocks, linear_weight
from lwq.spec import LayerSpec

Plan = dict[str, LayerSpec]
BATCH_SIZE = 8  # calibration windows per forward pass
OnBlock = Callable[[int, dict[str, QuantizedWeight], "BlockInputs | None"], None]
PreQuantize = Callable[[str, torch.Tensor, "torch.Tensor | None", LayerSpec],
                       "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def needs_data(spec: LayerSpec) -> bool:
    """Whether this layer needs calibration activations (a Hessian, or int8-activation smoothing)."""
    return needs_hessian(spec) or (spec.act_bits == 8 and spec.bits < 16)


def plan_needs_data(plan: Plan) -> bool:
    return any(needs_data(s) for s in plan.values())


class _Captured(Exception):
    """Raised by the statistics hook: the rest of the block is not needed for this group."""


@torch.no_grad()
def input_stats(block: nn.Module, module: nn.Module, inputs: BlockInputs, device: torch.device) -> InputAccumulator:
    """Run ``block`` on every batch, up to ``module``, accumulating the statistics of what it receives
    (the Hessian in GPTQ's scaling: ``2 X^T X / n``)."""
    stats = InputAccumulator(int(linear_weight(module).shape[1]), device, hessian=True, scale=2.0)

    def hook(_m: nn.Module, args: tuple) -> None:
        stats.add(args[0])
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            try:
                run_block(block, h.to(device), kw)
            except _Captured:
                pass
    finally:
        handle.remove()
    return stats


def validate_plan(model: nn.Module, plan: Plan) -> None:
    """Every planned name is a block linear of ``model`` and every backend exists."""
    arch = arch_for(model)
    known = {f"{arch.blocks}.{i}.{lin}" for i in range(len(get_blocks(model, arch))) for lin in arch.linears}
    unknown = sorted(set(plan) - known)
    if unknown:
        raise BadInput(f"plan names {len(unknown)} layer(s) that are not block linears of this model, "
                       f"e.g. {unknown[0]!r}")
    for spec in plan.values():
        if spec.bits < 16:
            get_backend(spec.backend)
            get_layout(spec.format)


@torch.no_grad()
def quantize_model(
    model: nn.Module, plan: Plan, batches: torch.Tensor | None, device: torch.device | str = "cpu",
    on_block: OnBlock | None = None, *, start_block: int = 0, inputs: BlockInputs | None = None,
    pre_quantize: PreQuantize | None = None, batch_size: int = BATCH_SIZE, loader: BlockLoader | None = None,
    collect: bool = True, refine: RefineConfig | None = None, seed: int = 0, on_refine: OnStep | None = None,
    reports: list[RefineReport] | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize ``model``'s planned linears in place, block by block; returns the quantized weights.

    ``batches``: calibration token ids (nsamples, seqlen), needed only when a planned layer needs
    data (GPTQ, int8 activations). ``on_block(i, layers, next_inputs)`` runs after block ``i``, while
    the block is still materialised, with its quantized layers and the inputs of block ``i + 1`` (None
    without calibration); to resume, pass ``start_block=i + 1`` and ``inputs=next_inputs``.
    ``loader`` says where blocks come from (default: resident, moved to ``device`` for their turn;
    ``lwq.models.lazy.LazyBlocks`` reads each from disk and drops it after). ``collect=False`` returns
    an empty dict instead of keeping every quantized weight (memory that would grow with depth).
    ``pre_quantize(name, W, act_absmax, spec)``
    may transform the weight of an int8-activation layer and add tensors (SmoothQuant-style); by
    default the storage layout's own ``pre_quantize`` method is used when it has one.

    ``refine``: after its backend, each block's linears are tuned against the full-precision
    block's outputs (``lwq.pipeline.refine``); this needs calibration data for every plan, and the
    inputs then also carry the full-precision stream (``BlockInputs.reference``). Block ``i`` is tuned
    with the seed ``seed + i``; ``reports`` (when given) collects one ``RefineReport`` per block.
    """
    device = torch.device(device)
    validate_plan(model, plan)
    arch = arch_for(model)
    blocks = get_blocks(model, arch)
    if not 0 <= start_block <= len(blocks):
        raise BadInput(f"start block must be in 0..{len(blocks)}, got {start_block}")
    refining = refine is not None and refine.steps > 0
    with_data = refining or plan_needs_data(
        {n: s for n, s in plan.items() if (block_index(n, arch.blocks) or 0) >= start_block})
    home = next(model.parameters()).device
    loader = loader or ResidentBlocks(str(home))
    if with_data and inputs is None:
        if start_block != 0:
            raise BadInput("resuming from a later block needs that block's saved inputs")
        if batches is None or batches.numel() == 0:
            raise BadInput("this plan needs calibration data (GPTQ, int8 activations or refinement): pass --data PATH")
        inputs = capture_block_inputs(model, batches.split(batch_size), device, arch)
    elif with_data:
        move_outside_blocks(model, arch, device)
    done: dict[str, QuantizedWeight] = {}
    try:
        for i in range(start_block, len(blocks)):
            block = loader.acquire(model, i, device)
            targets = None
            if refining and inputs is not None:
                reference = inputs.reference if inputs.reference is not None else inputs.hidden
                targets = block_outputs(block, inputs.with_hidden(reference), device)
            sources: dict[str, torch.Tensor] | None = {} if targets is not None else None
            layers = quantize_block(block, f"{arch.blocks}.{i}", arch.groups, plan, inputs if with_data else None,
                                    device, pre_quantize, sources)
            if sources is not None and refine is not None and inputs is not None:  # sources: set when refining
                layers, report = refine_quantized_block(block, f"{arch.blocks}.{i}", layers, sources, inputs, targets,
                                                        refine, device, seed + i, on_refine, arch.norm_offset)
                if reports is not None:
                    reports.append(report)
            if with_data and inputs is not None:
                inputs = inputs.with_hidden(block_outputs(block, inputs, device), targets)
            if on_block is not None:
                on_block(i, layers, inputs if with_data else None)
            loader.release(model, i)
            if collect:
                done.update(layers)
    finally:
        if with_data:
            move_outside_blocks(model, arch, home)
    return done


def quantize_block(block: nn.Module, prefix: str, groups: tuple[tuple[str, ...], ...], plan: Plan,
                   inputs: BlockInputs | None, device: torch.device, pre_quantize: PreQuantize | None,
                   sources: dict[str, torch.Tensor] | None = None) -> dict[str, QuantizedWeight]:
    """Quantize the planned linears of one block (already on ``device``), group by group; ``sources``
    (when given) receives the weight each backend was given (after smoothing), for refinement."""
    out: dict[str, QuantizedWeight] = {}
    planned = [lin for lin in dict.fromkeys(x for g in groups for x in g) if f"{prefix}.{lin}" in plan]
    check_finite(block, prefix, planned)
    for group in groups:
        members = [lin for lin in group if f"{prefix}.{lin}" in plan]
        if not members:
            continue
        stats = None
        if inputs is not None and any(needs_data(plan[f"{prefix}.{lin}"]) for lin in members):
            stats = input_stats(block, block.get_submodule(members[0]), inputs, device)
        for lin in members:
            name, module = f"{prefix}.{lin}", block.get_submodule(lin)
            spec = plan[name]
            W = linear_weight(module).detach().float()
            extra: dict[str, torch.Tensor] = {}
            hook = pre_quantize or getattr(get_layout(spec.format), "pre_quantize", None)
            if spec.act_bits == 8 and spec.bits < 16 and hook is not None:
                W, extra = hook(name, W, None if stats is None else stats.absmax, spec)
            qw = quantize_weight(W, spec, None if stats is None else stats.H)
            qw.extra.update(extra)
            if sources is not None:
                sources[name] = W
            replace_linear(block, lin, quantized_from_linear(module, qw))
            out[name] = _to_cpu(qw)
    return out


def refine_quantized_block(block: nn.Module, prefix: str, layers: dict[str, QuantizedWeight],
                           sources: dict[str, torch.Tensor], inputs: BlockInputs, targets: list[torch.Tensor],
                           cfg: RefineConfig, device: torch.device, seed: int, on_step: OnStep | None,
                           norm_offset: float = 0.0) -> tuple[dict[str, QuantizedWeight], RefineReport]:
    """Tune the block's quantized linears and its norms (``refine_block``) and put the tuned ones in place."""
    rel = {name[len(prefix) + 1:]: name for name in layers}
    given = {lin: (layers[name], block.get_submodule(lin).bias, sources.get(name)) for lin, name in rel.items()}
    tuned, report = refine_block(block, given, inputs.hidden, inputs.kwargs, targets, cfg, device, seed, on_step,
                                 block_norms(block), norm_offset)
    out: dict[str, QuantizedWeight] = {}
    for lin, name in rel.items():
        qw = tuned[lin]
        if qw is not layers[name]:
            bias = block.get_submodule(lin).bias
            replace_linear(block, lin, QuantizedLinear.from_quantized(qw, bias).to(device))
        out[name] = qw
    return out, report


def check_finite(block: nn.Module, prefix: str, linears: list[str]) -> None:
    """Refuse (one line, naming the layers) weights holding NaN or Inf: quantizing them gives garbage."""
    bad = [f"{prefix}.{lin}" for lin in linears
           if not bool(torch.isfinite(linear_weight(block.get_submodule(lin))).all())]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise BadInput(f"non-finite (NaN/Inf) weights in {', '.join(bad[:3])}{more}; refusing to quantize them")


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.cpu()

    return QuantizedWeight(qw.spec, cpu(qw.q), cpu(qw.scale), cpu(qw.zero), cpu(qw.g_idx),
                           {k: v.cpu() for k, v in qw.extra.items()}, dict(qw.meta))
