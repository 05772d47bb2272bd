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
where the measured estimate reruns the model's tail for every trial. ``a_l`` = the mean over
noise seeds of ``KL / t**2``; a candidate's error is ``a_l`` times its own ``t**2`` from the weight
its backend and storage format give (GPTQ on the same windows' full-precision-input Hessian).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lwq.errors import BadInput
from lwq.models.arch import linear_names, linear_weight
from lwq.score.base import Scorer, ScoreConfig, ScoreInputs, Scores, at_granularity

NOISE_LEVEL = 0.05  # relative size of the injected noise (the estimate is quadratic: KL / t**2 does not depend on it)
NOISE_SEEDS = (0, 1, 2, 3)
LABEL_SEED = 1234
ESTIMATE = "linearity"


def _noise(W: torch.Tensor, seeds: Sequence[int], level: float) -> torch.Tensor:
    """(seeds, out, in) gaussian directions, each scaled to exactly ``level * ||W||``."""
    out = []
    for s in seeds:
        d = torch.randn(W.shape, generator=torch.Generator().manual_seed(int(s)))
        out.append(d * (level * W.norm() / d.norm().clamp_min(1e-30)))
    return torch.stack(out).to(W.device)


class _Capture:
    """Forward hooks keeping each linear's input and output (the output retains its gradient)."""

    def __init__(self, modules: Mapping[str, nn.Module], hessians: dict[str, torch.Tensor] | None) -> None:
        self.x: dict[str, torch.Tensor] = {}
        self.y: dict[str, torch.Tensor] = {}
        self.hessians = hessians
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            x = args[0].detach().float()
            self.x[name] = x
            self.y[name] = out
            if self.hessians is not None:
                flat = x.reshape(-1, x.shape[-1])
                h = self.hessians.get(name)
                self.hessians[name] = flat.t() @ flat if h is None else h + flat.t() @ flat
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _quadratic(x: torch.Tensor, g: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per noise direction ``d`` (out, in: ``linear_weight``'s orientation, whatever the module stores),
    ``(sum_s g_s . (d x_s))**2`` summed over the windows of the batch."""
    xs, gs = x.reshape(x.shape[0], -1, x.shape[-1]), g.float().reshape(g.shape[0], -1, g.shape[-1])
    proj = torch.einsum("bti,kdi->bktd", xs, noise)  # (batch, seeds, tokens, out)
    return (torch.einsum("bktd,btd->bk", proj, gs) ** 2).sum(0)


def linearity_coefficients(model: nn.Module, samples: torch.Tensor, names: Sequence[str] | None = None,
                           device: Any = "cpu", level: float = NOISE_LEVEL, seeds: Sequence[int] = NOISE_SEEDS,
                           hessians: bool = False, on_step: Callable[[int, int], None] | None = None,
                           ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """``a_l`` per linear (``names``: default all block linears) from the calibration windows
    ``samples`` (n, seqlen), and the full-precision-input Hessians ``X^T X`` when ``hessians``."""
    if samples is None or samples.ndim != 2 or samples.shape[1] < 2:
        raise BadInput("the linearity estimate measures on calibration text: pass --data PATH")
    names = list(names) if names is not None else linear_names(model)
    modules = {n: model.get_submodule(n) for n in names}
    if any(p.is_meta for p in model.parameters()):
        raise BadInput("the linearity estimate needs the whole model in memory (it runs a backward pass)")
    weights = {n: linear_weight(m).detach().float() for n, m in modules.items()}
    noise = {n: _noise(w, seeds, level).to(device) for n, w in weights.items()}
    acc = {n: torch.zeros(len(seeds), dtype=torch.float64) for n in names}
    hs: dict[str, torch.Tensor] | None = {} if hessians else None
    gen = torch.Generator().manual_seed(LABEL_SEED)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    cap = _Capture(modules, hs)
    # no parameter takes a gradient: the graph starts at the embeddings' output
    grad_from = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    tokens = 0
    try:
        for i in range(samples.shape[0]):
            ids = samples[i:i + 1].to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids).logits[:, :-1].float()
                probs = torch.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1]).cpu()
                y = torch.multinomial(probs, 1, generator=gen).reshape(logits.shape[:-1]).to(logits.device)
                logp = torch.log_softmax(logits, -1).gather(-1, y[..., None]).sum()
                outs = [cap.y[n] for n in names]
                grads = torch.autograd.grad(logp, outs, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    acc[n] += _quadratic(cap.x[n], g, noise[n]).double().cpu()
            tokens += int(logits.shape[1])
            cap.x.clear()
            cap.y.clear()
            if on_step is not None:
                on_step(i + 1, samples.shape[0])
    finally:
        cap.close()
        grad_from.remove()
        for p in frozen:
            p.requires_grad_(True)
    coeffs = {n: float(0.5 * acc[n].mean() / tokens / level**2) for n in names}
    return coeffs, (hs or {})


def relative_error(W: torch.Tensor, Wq: torch.Tensor) -> float:
    """``t**2 = ||W - Wq||**2 / ||W||**2``."""
    W, Wq = W.float(), Wq.float().to(W.device)
    return float(((W - Wq) ** 2).sum() / (W**2).sum().clamp_min(1e-30))


def linearity_errors(model: nn.Module, samples: torch.Tensor | None, layers: list[Any], db: Any = None,
                     on_step: Callable[[int, int], None] | None = None, device: Any = "cpu",
                     trials: str = "backend") -> tuple[list[Any], Any]:
    """Every candidate's error ``a_l * t**2`` (see the module docstring); coefficients stored in (and
    reused from) the error database ``db`` with the noise level and seeds; returns (layers, database)."""
    from lwq.allocate.candidates import ErrorDB, db_errors, spec_key
    from lwq.backends.quant import rtn_fake_quant
    from lwq.measure import backend_quantizer

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
    todo = [lc for lc in layers if any(c.spec.bits < 16 and spec_key(c.spec) not in entries.get(lc.name, {})
                                       for c in lc.candidates)]
    if todo:
        need_h = trials == "backend" and any(c.spec.backend.startswith("gptq") for lc in todo for c in lc.candidates)
        missing = [lc.name for lc in todo if lc.name not in coeffs]
        if missing or need_h:
            if samples is None:
                raise BadInput("the linearity estimate measures on calibration text: pass --data PATH")
            from lwq.planning import MEASURE_SAMPLES

            got, hessians = linearity_coefficients(model, samples[:MEASURE_SAMPLES], [lc.name for lc in todo],
                                                   device, hessians=need_h, on_step=on_step)
            coeffs.update({n: v for n, v in got.items() if n in missing})
        else:
            hessians = {}
        for lc in todo:
            W = linear_weight(model.get_submodule(lc.name)).detach().float()
            W = W.t() if tuple(W.shape) != lc.shape else W
            for c in lc.candidates:
                key = spec_key(c.spec)
                if c.spec.bits >= 16 or key in entries.get(lc.name, {}):
                    continue
                if trials == "backend":
                    H = hessians.get(lc.name)
                    H = H.t() if H is not None and tuple(H.shape) != (lc.shape[1], lc.shape[1]) else H
                    Wq = backend_quantizer(c.spec)(W, H)
                else:
                    Wq = rtn_fake_quant(W, c.spec.bits, c.spec.group_size, c.spec.sym)
                entries.setdefault(lc.name, {})[key] = coeffs[lc.name] * relative_error(W, Wq)
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


def _run(inputs: ScoreInputs, cfg: ScoreConfig) -> Scores:
    assert inputs.model is not None
    coeffs, _ = linearity_coefficients(inputs.model, inputs.samples, device=inputs.device, on_step=inputs.on_step)
    return at_granularity(coeffs, inputs.model, cfg.granularity, "sum")


LINEARITY = Scorer("linearity", _run, frozenset({"model", "samples"}),
                   "a_l of the linearity theorem: KL per unit relative weight noise (Fisher, one pass per window)")
