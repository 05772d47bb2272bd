"""Refined trials for planning (``--measure-with refined``).

The measured error database holds each candidate's KL when its layer alone is quantized by its
backend (GPTQ trials). Refinement then removes part of that loss, and not the same part at every
width. Here each block is quantized whole at each candidate width (its backend, on full-precision
inputs), refined for a short run (``TRIAL_FRACTION`` of the run's steps), and the ratio of its
block-output error after and before is recorded; every candidate's error is scaled by the ratio of
its block at its width, so the solver weighs widths by what they lose once refined. Memory: one block,
its trial copy and the calibration activations of ``TRIAL_SAMPLES`` windows at a time.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lwq.errors import BadInput
from lwq.models.arch import ArchSpec, arch_for, block_index, get_blocks
from lwq.models.blocks import ResidentBlocks, block_outputs, capture_block_inputs, move_outside_blocks
from lwq.models.placement import Placement, where
from lwq.pipeline.blockwise import BATCH_SIZE, quantize_block, refine_quantized_block
from lwq.pipeline.refine import REFINABLE_FORMATS, RefineConfig
from lwq.spec import LayerSpec

TRIAL_FRACTION = 8  # a trial refines for 1/8 of the run's steps
TRIAL_SAMPLES = 16  # calibration windows of a trial (as for the measured database)
Ratios = dict[tuple[int, int], float]  # (block index, bits) -> refined / unrefined block-output error


def trial_config(cfg: RefineConfig) -> RefineConfig:
    """The short refinement of a trial: the run's settings with ``1 / TRIAL_FRACTION`` of its steps and
    the default step size for that many (``1 / steps``: the run's schedule, compressed)."""
    return dataclasses.replace(cfg, steps=max(1, cfg.steps // TRIAL_FRACTION), lr=None)


def width_plans(layers: Sequence[Any], prefix: str) -> dict[int, dict[int, dict[str, LayerSpec]]]:
    """Per block, per width: the spec of each refinable linear at that width (its first candidate)."""
    out: dict[int, dict[int, dict[str, LayerSpec]]] = {}
    for lc in layers:
        i = block_index(lc.name, prefix)
        for c in lc.candidates:
            if i is not None and c.spec.bits < 16 and c.spec.format in REFINABLE_FORMATS:
                out.setdefault(i, {}).setdefault(c.spec.bits, {}).setdefault(lc.name, c.spec)
    return out


@torch.no_grad()
def refinement_ratios(model: nn.Module, samples: torch.Tensor, layers: Sequence[Any], cfg: RefineConfig,
                      seed: int = 0, placement: Placement | None = None,
                      on_step: Callable[[int, int], None] | None = None) -> Ratios:
    """The refined-to-unrefined block-output error of every block at every candidate width (see module
    docstring); 1.0 where refinement did not help. The model is not changed."""
    arch = arch_for(model)
    plans = width_plans(layers, arch.blocks)
    at = placement or where(model)
    home = model.get_input_embeddings().weight.device  # blocks may be on the meta device (read lazily)
    loader = at.loader or ResidentBlocks(str(home))
    try:
        return _ratios(model, arch, samples, plans, cfg, seed, at, loader, on_step)
    finally:
        move_outside_blocks(model, arch, home)  # capturing moved the embeddings and head to the device


def _ratios(model: nn.Module, arch: ArchSpec, samples: torch.Tensor,
            plans: dict[int, dict[int, dict[str, LayerSpec]]], cfg: RefineConfig, seed: int, at: Placement,
            loader: Any, on_step: Callable[[int, int], None] | None) -> Ratios:
    inputs = capture_block_inputs(model, samples[:TRIAL_SAMPLES].split(BATCH_SIZE), at.device, arch)
    trial_cfg, ratios = trial_config(cfg), {}
    blocks = len(get_blocks(model))
    for i in range(blocks):
        block = loader.acquire(model, i, at.device)
        targets = block_outputs(block, inputs, at.device)
        for bits, plan in sorted(plans.get(i, {}).items()):
            trial, sources = copy.deepcopy(block), {}
            prefix = f"{arch.blocks}.{i}"
            quantized = quantize_block(trial, prefix, arch.groups, plan, inputs, at.device, None, sources)
            _, report = refine_quantized_block(trial, prefix, quantized, sources, inputs, targets, trial_cfg,
                                               at.device, seed + i, None, arch.norm_offset)
            ok = report.kept and math.isfinite(report.start_loss) and report.start_loss > 0
            ratios[(i, bits)] = report.final_loss / report.start_loss if ok else 1.0
            del trial
        inputs = inputs.with_hidden(targets)
        loader.release(model, i)
        if on_step is not None:
            on_step(i + 1, blocks)
    return ratios


def scale_errors(layers: Sequence[Any], ratios: Ratios, prefix: str) -> list[Any]:
    """``layers`` with each candidate's error times its block's ratio at its width (1 when unmeasured)."""
    out = []
    for lc in layers:
        i = block_index(lc.name, prefix)
        out.append(lc.replace_errors([c.error * ratios.get((i, c.spec.bits), 1.0) if i is not None else c.error
                                      for c in lc.candidates]))
    return out


def refined_errors(model: nn.Module, samples: torch.Tensor | None, layers: Sequence[Any], recipe: Any,
                   seed: int = 0, placement: Placement | None = None,
                   on_step: Callable[[int, int], None] | None = None,
                   cached: Mapping[str, Any] | None = None) -> tuple[list[Any], dict[str, Any]]:
    """``--measure-with refined``: the layers' backend-trial errors scaled by ``refinement_ratios``.
    Returns the layers and the record of the ratios (``steps``, ``norms``, ``ratios`` as ``"block:bits"``),
    which an error database keeps; ``cached`` (such a record) is reused when it was made with the same
    trial settings and holds every block and width needed."""
    cfg = RefineConfig(recipe.refine_steps, norms=recipe.refine_norms)
    trial, prefix = trial_config(cfg), arch_for(model).blocks
    need = {f"{i}:{bits}" for i, widths in width_plans(layers, prefix).items() for bits in widths}
    if (cached and cached.get("steps") == trial.steps and cached.get("norms") == trial.norms
            and need <= set(cached.get("ratios", {}))):
        ratios = {(int(k.split(":")[0]), int(k.split(":")[1])): float(v) for k, v in cached["ratios"].items()}
    else:
        if samples is None:
            raise BadInput("--measure-with refined measures refinement: pass --data PATH")
        ratios = refinement_ratios(model, samples, layers, cfg, seed, placement, on_step)
    record = {"steps": trial.steps, "norms": trial.norms,
              "ratios": {f"{i}:{bits}": r for (i, bits), r in sorted(ratios.items())}}
    return scale_errors(layers, ratios, prefix), record
