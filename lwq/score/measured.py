"""The measured estimate (``sensitivity``, planning's default): every candidate's error is the
next-token KL divergence to the full model on the calibration samples when only that layer is
quantized at that spec (by its backend, or round-to-nearest), a database in EvoPress's manner that is
saved and reused across budgets (measured on the first ``MEASURE_SAMPLES`` calibration windows;
``lwq.score.workers`` runs the trials, on one device or several). ``KlEvaluator`` is the ``search``
solver's objective: the real KL of a whole plan, each layer round-to-nearest quantized per its spec.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lwq.backends.quant import rtn_fake_quant
from lwq.errors import BadInput
from lwq.models.arch import arch_for, block_index, get_blocks, linear_names, linear_weight
from lwq.models.placement import Placement, where
from lwq.spec import LayerSpec

Progress = Callable[[int, int], None]
MEASURE_SAMPLES = 16  # calibration windows used to measure candidate errors (KL is stable well before 128)


def measured_errors(model: nn.Module, samples: torch.Tensor | None, layers: list[Any], db: Any = None,
                    on_step: Progress | None = None, measure: Any = None,
                    placement: Placement | None = None, trials: str = "backend") -> tuple[list[Any], Any]:
    """Fill every candidate's error with its measured KL (see module docstring); entries already in
    ``db`` (an ``ErrorDB`` for this model and data) are reused. ``measure(model, samples, tasks,
    on_step, placement, follow_backend)`` runs the missing ``lwq.score.workers.MeasureTask``s (default
    ``measure_local``; see ``parallel_measure`` for several devices); ``trials``: ``backend`` (each
    trial quantized by the candidate's backend, GPTQ included) or ``rtn``; a database measured the
    other way is refused. Returns the layers and the database."""
    from lwq.allocate.candidates import ErrorDB, db_errors, spec_key
    from lwq.score.workers import make_tasks, measure_local

    entries = {n: dict(e) for n, e in (db.entries if db is not None else {}).items()}
    if db is not None and db.entries and db.meta.get("estimate", "sensitivity") != "sensitivity":
        raise BadInput(f"the error database holds {db.meta['estimate']} estimates, not measured sensitivity: "
                       "use another --error-db file (or the scorer it was made with)")
    made = db.meta.get("trials", "rtn") if db is not None else trials  # older databases did not record it: rtn
    if entries and made != trials:
        raise BadInput(f"the error database was measured with {made} trials, not {trials}: "
                       f"pass --measure-with {made} or use another --error-db file")
    todo: dict[LayerSpec, list[str]] = {}
    for lc in layers:
        for c in lc.candidates:
            if c.spec.bits < 16 and spec_key(c.spec) not in entries.get(lc.name, {}):
                todo.setdefault(c.spec, []).append(lc.name)
    if todo and samples is None:
        raise BadInput("the sensitivity estimate measures real loss: pass --data PATH")
    samples = samples[:MEASURE_SAMPLES] if samples is not None else None
    blocks = arch_for(model).blocks
    tasks = make_tasks(todo, lambda n: block_index(n, blocks), len(get_blocks(model)))
    measured = (measure or measure_local)(model, samples, tasks, on_step, placement or where(model),
                                          trials == "backend")
    for name, values in measured.items():
        entries.setdefault(name, {}).update(values)
    for lc in layers:
        for c in lc.candidates:
            if c.spec.bits >= 16:
                entries.setdefault(lc.name, {})[spec_key(c.spec)] = 0.0
    meta = dict(db.meta) if db is not None else {}
    if samples is not None:
        meta.update({"metric": "kl", "nsamples": int(samples.shape[0]), "seqlen": int(samples.shape[1])})
    meta["trials"] = trials
    out = ErrorDB(entries, meta)
    return db_errors(layers, out), out


class KlEvaluator:
    """``evaluate(plan, fidelity) -> loss`` for the ``search`` solver: mean next-token KL divergence
    (nats per token) of the model with every planned layer RTN-quantized per its spec, against the full
    model, on the first ``ceil(fidelity / seqlen)`` calibration samples (rounded up to whole batches).
    Runs block by block through a ``SensitivityProbe`` (so blocks may live off the device: ``loader``);
    quantized weights are cached per (layer, spec); the model's weights are never changed."""

    def __init__(self, model: nn.Module, samples: torch.Tensor, batch_size: int = 8, device: Any = None,
                 loader: Any = None) -> None:
        from lwq.score.sensitivity import SensitivityProbe

        self.samples, self.batch_size = samples, batch_size
        self.modules = {n: model.get_submodule(n) for n in linear_names(model)}
        self.probe = SensitivityProbe(model, samples, "kl", batch_size, device, loader)
        self.cache: dict[tuple[str, LayerSpec], torch.Tensor] = {}

    def _quantized(self, name: str, spec: LayerSpec) -> torch.Tensor:
        key = (name, spec)
        if key not in self.cache:
            mod = self.modules[name]
            W = linear_weight(mod).detach().float()
            Wq = rtn_fake_quant(W, spec.bits, spec.group_size, spec.sym)
            self.cache[key] = (Wq.t() if mod.weight.shape != W.shape else Wq).to(mod.weight.dtype)
        return self.cache[key]

    @torch.no_grad()
    def __call__(self, plan: Mapping[str, LayerSpec], fidelity: int) -> float:
        n = max(1, min(len(self.samples), math.ceil(fidelity / self.samples.shape[1])))
        weights = {name: self._quantized(name, spec) for name, spec in plan.items() if spec.bits < 16}
        return self.probe.plan_divergence(weights, math.ceil(n / self.batch_size))


def estimate(_scorer: Any, inputs: Any) -> tuple[list[Any], Any]:
    """The ``sensitivity`` scorer's planning estimate (``lwq.score.base.Scorer.estimate``)."""
    from lwq.score.trials import layer_trials

    return measured_errors(inputs.model, inputs.samples, inputs.layers, inputs.db, inputs.on_step, inputs.measure,
                           inputs.placement, layer_trials(inputs.recipe.measure_with))
