"""``linearity``: the linearity-theorem estimate (HIGGS), with its per-layer coefficients measured at
a cost that grows linearly with depth.

For moderate errors the loss increase is close to ``sum_l a_l * t_l**2`` with
``t_l**2 = ||W_l - Q(W_l)||**2 / ||W_l||**2`` the relative weight error of layer ``l``. Each
coefficient is measured once: seeded gaussian noise ``d`` of relative size ``t`` (``NOISE_LEVEL``) is
put on the layer's weight and its next-token KL increase is measured to second order,
``KL ~ 1/2 E_y[(sum_s g_s . (d x_s))**2] / tokens``, with ``x_s`` the layer's inputs and ``g_s`` the
gradient of ``sum_t log p(y_t)`` with respect to the layer's outputs for labels ``y_t`` drawn from
the model's own next-token distributions on the calibration windows (the Fisher information, whose
quadratic form is the KL's second-order term). One forward and one backward pass per window gives
``g`` and ``x`` for every layer at once, so the cost is one model pass per window whatever the depth,
where the measured estimate reruns the model's tail for every trial; the pass runs one decoder
block at a time (``lwq.score.fisher``), so blocks may wait in CPU memory or on disk. ``a_l`` = the mean over
noise seeds of ``KL / t**2``; a candidate's error is ``a_l`` times its own ``t**2`` from the weight
its backend and storage format give (GPTQ on the same windows' full-precision-input Hessian).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lwq.errors import BadInput
from lwq.models.arch import linear_names
from lwq.score.fisher import LABEL_SEED, FisherResult, Trial, fisher_pass
from lwq.spec import LayerSpec
from lwq.score.base import ScoreConfig, ScoreInputs, Scores, at_granularity

NOISE_LEVEL = 0.05  # relative size of the injected noise (the estimate is quadratic: KL / t**2 does not depend on it)
NOISE_SEEDS = (0, 1, 2, 3)
ESTIMATE = "linearity"
Specs = Mapping[str, Sequence[LayerSpec]]


def coefficients(result: FisherResult, level: float = NOISE_LEVEL) -> dict[str, float]:
    """``a_l`` = mean over noise seeds of the second-order KL per token, divided by ``level**2``."""
    return {n: float(0.5 * s.mean() / max(result.tokens, 1) / level**2) for n, s in result.sums.items()}


def linearity_coefficients(model: nn.Module, samples: torch.Tensor, names: Sequence[str] | None = None,
                           device: Any = "cpu", level: float = NOISE_LEVEL, seeds: Sequence[int] = NOISE_SEEDS,
                           on_step: Callable[[int, int], None] | None = None, loader: Any = None) -> dict[str, float]:
    """``a_l`` per linear (``names``: default all block linears) from the calibration windows
    ``samples`` (n, seqlen); ``loader`` brings blocks to ``device`` one at a time (``lwq.score.fisher``)."""
    _check_samples(samples)
    names = list(names) if names is not None else linear_names(model)
    return coefficients(fisher_pass(model, samples, names, device, loader, level, seeds, on_step=on_step), level)


def _check_samples(samples: torch.Tensor | None) -> None:
    if samples is None or samples.ndim != 2 or samples.shape[1] < 2:
        raise BadInput("the linearity estimate measures on calibration text: pass --data PATH")


def relative_error(W: torch.Tensor, Wq: torch.Tensor) -> float:
    """``t**2 = ||W - Wq||**2 / ||W||**2``."""
    W, Wq = W.float(), Wq.float().to(W.device)
    return float(((W - Wq) ** 2).sum() / (W**2).sum().clamp_min(1e-30))


def make_trial(specs: Specs, trials: str) -> Trial:
    """``t**2`` of each of a linear's ``specs``: quantized by the spec's backend and stored as its
    format will hold it (``trials="backend"``; GPTQ on the calibration Hessian) or round-to-nearest."""
    from lwq.allocate.candidates import spec_key
    from lwq.backends.quant import rtn_fake_quant
    from lwq.score.trials import backend_quantizer

    def trial(name: str, W: torch.Tensor, H: torch.Tensor | None) -> dict[str, float]:
        out = {}
        for spec in specs.get(name, ()):
            if trials == "backend":
                Wq = backend_quantizer(spec)(W, H)
            else:
                Wq = rtn_fake_quant(W, spec.bits, spec.group_size, spec.sym)
            out[spec_key(spec)] = relative_error(W, Wq)
        return out

    return trial


def needs_hessians(specs: Specs, trials: str) -> bool:
    """Whether the trials of ``specs`` need calibration Hessians (GPTQ backends)."""
    from lwq.backends import get_backend

    return trials == "backend" and any(get_backend(s.backend).needs_hessian for ss in specs.values() for s in ss)


def _fisher_runner(model: nn.Module, placement: Any, samples: torch.Tensor, specs: Specs, trials: str,
                   shares: int) -> Callable[[int], Any]:
    """A worker's task ``k``: the linearity pass with the trials of blocks ``i % shares == k``."""
    from lwq.models.arch import get_blocks

    nblocks = len(get_blocks(model))

    def run(k: int) -> Any:
        mine = [i for i in range(nblocks) if i % shares == k]
        got = fisher_pass(model, samples, list(specs), placement.device, placement.loader, NOISE_LEVEL, NOISE_SEEDS,
                          make_trial(specs, trials), mine, needs_hessians(specs, trials))
        # plain floats: a tensor would travel as shared memory that dies with the worker
        return {n: s.tolist() for n, s in got.sums.items()}, got.trials, got.tokens

    return run


def _parallel_pass(parallel: Any, model: nn.Module, samples: torch.Tensor, specs: Specs, trials: str,
                   placement: Any, on_step: Callable[[int, int], None] | None) -> FisherResult:
    """The linearity pass on ``parallel``'s workers (``lwq.score.workers.ParallelMeasure``), the trials
    spread by block; every worker runs the same pass on the same windows, so the coefficients are the
    first worker's, as on one device."""
    n = len(parallel.devices)
    parts = parallel.map(model, _fisher_runner, (samples.cpu(), dict(specs), trials, n), list(range(n)), placement,
                         on_step)
    merged: dict[str, dict[str, float]] = {}
    for _sums, part, _tokens in parts:
        merged.update(part)
    sums, _, tokens = parts[0]
    return FisherResult({n: torch.tensor(v, dtype=torch.float64) for n, v in sums.items()}, merged, tokens)


def linearity_errors(model: nn.Module, samples: torch.Tensor | None, layers: list[Any], db: Any = None,
                     on_step: Callable[[int, int], None] | None = None, placement: Any = None,
                     trials: str = "backend", parallel: Any = None) -> tuple[list[Any], Any]:
    """Every candidate's error ``a_l * t**2`` (see the module docstring); coefficients stored in (and
    reused from) the error database ``db`` with the noise level and seeds. ``placement``
    (``lwq.models.placement``) says where the model computes and how its blocks get there;
    ``parallel`` (``lwq.score.workers.ParallelMeasure``) spreads the trials over its devices' workers.
    Returns (layers, database)."""
    from lwq.allocate.candidates import ErrorDB, db_errors, spec_key
    from lwq.models.placement import Placement

    meta = dict(db.meta) if db is not None else {}
    if db is not None and db.entries and meta.get("estimate", "sensitivity") != ESTIMATE:
        raise BadInput(f"the error database holds {meta.get('estimate', 'sensitivity')} estimates, not {ESTIMATE}: "
                       "use another --error-db file (or the scorer it was made with)")
    if meta.get("estimate") == ESTIMATE and (meta.get("trials") != trials or meta.get("levels") != [NOISE_LEVEL]
                                             or meta.get("seeds") != list(NOISE_SEEDS)):
        raise BadInput("the error database's linearity trials (quantizer, noise levels or seeds) do not match "
                       "this run: use another --error-db file")
    entries = {n: dict(e) for n, e in (db.entries if db is not None else {}).items()}
    coeffs = dict(meta.get("coefficients") or {})
    specs = {lc.name: [c.spec for c in lc.candidates
                       if c.spec.bits < 16 and spec_key(c.spec) not in entries.get(lc.name, {})]
             for lc in layers}
    specs = {n: ss for n, ss in specs.items() if ss}
    if specs:
        from lwq.score.measured import MEASURE_SAMPLES

        _check_samples(samples)
        assert samples is not None
        placement = placement or Placement(next(model.parameters()).device)
        if parallel is not None:
            result = _parallel_pass(parallel, model, samples[:MEASURE_SAMPLES], specs, trials, placement, on_step)
        else:
            result = fisher_pass(model, samples[:MEASURE_SAMPLES], list(specs), placement.device, placement.loader,
                                 NOISE_LEVEL, NOISE_SEEDS, make_trial(specs, trials),
                                 hessians=needs_hessians(specs, trials), on_step=on_step)
        got = coefficients(result)
        coeffs.update({n: v for n, v in got.items() if n not in coeffs})  # stored coefficients priced stored entries
        for name, values in result.trials.items():
            for key, t2 in values.items():
                entries.setdefault(name, {})[key] = coeffs[name] * t2
    for lc in layers:
        for c in lc.candidates:
            if c.spec.bits >= 16:
                entries.setdefault(lc.name, {})[spec_key(c.spec)] = 0.0
    meta.update({"estimate": ESTIMATE, "levels": [NOISE_LEVEL], "seeds": list(NOISE_SEEDS), "label_seed": LABEL_SEED,
                 "trials": trials, "coefficients": coeffs, "metric": "kl"})
    if samples is not None:
        meta.update({"nsamples": int(min(samples.shape[0], 16)), "seqlen": int(samples.shape[1])})
    out = ErrorDB(entries, meta)
    return db_errors(layers, out), out


def run(inputs: ScoreInputs, cfg: ScoreConfig) -> Scores:
    assert inputs.model is not None
    coeffs = linearity_coefficients(inputs.model, inputs.samples, device=inputs.device, on_step=inputs.on_step)
    return at_granularity(coeffs, inputs.model, cfg.granularity, "sum")


def estimate(_scorer: Any, inputs: Any) -> tuple[list[Any], Any]:
    """The ``linearity`` scorer's planning estimate (``lwq.score.base.Scorer.estimate``); several
    devices (``lwq.score.workers.ParallelMeasure``) share the trials."""
    from lwq.models.placement import where
    from lwq.score.trials import layer_trials
    from lwq.score.workers import ParallelMeasure

    parallel = inputs.measure if isinstance(inputs.measure, ParallelMeasure) else None
    return linearity_errors(inputs.model, inputs.samples, inputs.layers, inputs.db, inputs.on_step,
                            inputs.placement or where(inputs.model), layer_trials(inputs.recipe.measure_with), parallel)
