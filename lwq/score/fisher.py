"""The linearity estimate's measuring pass, one decoder block at a time.

Forward: the windows run through the blocks without gradients and the hidden states entering every
block wait on the CPU. Head: labels are drawn from the model's own next-token distributions (one
seeded generator per window) and the gradient of ``sum_t log p(y_t)`` with respect to the last
hidden states is taken. Backward: block by block from the last, each block runs again on its saved
inputs with gradients, which gives at once the gradient entering the block below and, for each of
its linears, the input ``x`` and the output gradient ``g`` that the Fisher quadratic form
``(sum_s g_s . (d x_s))**2`` needs. It is the whole model's backward pass cut at block boundaries
(gradient checkpointing by block): only the modules outside the blocks and the block in turn need
to be on the device, so a ``BlockLoader`` can keep the others in CPU memory or on disk, as the
measured estimate's ``SensitivityProbe`` does.

While a block is on the device its linears' trials run too (``trial``: weight and, when asked, the
calibration Hessian ``X^T X`` of its full-precision inputs), so no Hessian outlives its block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Sequence

import torch
from torch import nn

from lwq.models.arch import arch_for, get_blocks, linear_weight
from lwq.models.blocks import capture_block_inputs, head_logits, run_block

Trial = Callable[[str, torch.Tensor, "torch.Tensor | None"], dict[str, float]]  # (name, W (out, in), H) -> key -> t**2
LABEL_SEED = 1234


@dataclass(frozen=True)
class FisherResult:
    """Per linear: the quadratic form summed over windows for each noise seed (float64), the trials'
    values, and the number of predicted positions."""

    sums: dict[str, torch.Tensor]
    trials: dict[str, dict[str, float]]
    tokens: int


def noise_like(W: torch.Tensor, seeds: Sequence[int], level: float) -> torch.Tensor:
    """(seeds, out, in) gaussian directions (drawn on the CPU), each scaled to exactly ``level * ||W||``."""
    out = []
    for s in seeds:
        d = torch.randn(W.shape, generator=torch.Generator().manual_seed(int(s)))
        out.append(d * (level * W.norm().cpu() / d.norm().clamp_min(1e-30)))
    return torch.stack(out).to(W.device)


class _Capture:
    """Forward hooks keeping each linear's input and output (the output stays in the graph)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.x: dict[str, torch.Tensor] = {}
        self.y: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            self.x[name] = args[0].detach().float()
            self.y[name] = out
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def quadratic(x: torch.Tensor, g: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per noise direction ``d`` (out, in), ``(sum_s g_s . (d x_s))**2`` summed over the batch's windows."""
    xs, gs = x.reshape(x.shape[0], -1, x.shape[-1]), g.float().reshape(g.shape[0], -1, g.shape[-1])
    proj = torch.einsum("bti,kdi->bktd", xs, noise)  # (batch, seeds, tokens, out)
    return (torch.einsum("bktd,btd->bk", proj, gs) ** 2).sum(0)


def _head_gradients(model: nn.Module, hidden: list[torch.Tensor], device: torch.device,
                    first_window: int) -> tuple[list[torch.Tensor], int]:
    """Per window: the gradient of ``sum_t log p(y_t)`` (labels drawn from the model) at the last
    hidden states; and the number of predicted positions."""
    grads, tokens = [], 0
    for w, h in enumerate(hidden):
        h = h.to(device).requires_grad_(True)
        with torch.enable_grad():
            logits = head_logits(model, h)[:, :-1].float()
            probs = torch.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1]).cpu()
            gen = torch.Generator().manual_seed(LABEL_SEED + first_window + w)
            y = torch.multinomial(probs, 1, generator=gen).reshape(logits.shape[:-1]).to(logits.device)
            logp = torch.log_softmax(logits, -1).gather(-1, y[..., None]).sum()
            (g,) = torch.autograd.grad(logp, h)
        grads.append(g.detach().cpu())
        tokens += int(logits.shape[0] * logits.shape[1])
    return grads, tokens


def fisher_pass(model: nn.Module, samples: torch.Tensor, names: Collection[str], device: Any = "cpu",
                loader: Any = None, level: float = 0.05, seeds: Sequence[int] = (0,),
                trial: Trial | None = None, trial_blocks: Collection[int] | None = None, hessians: bool = False,
                first_window: int = 0, on_step: Callable[[int, int], None] | None = None) -> FisherResult:
    """The Fisher sums of ``names`` (see module docstring) over the windows ``samples`` (n, seqlen),
    and ``trial``'s values for the linears of ``trial_blocks`` (default: every block), given the
    calibration Hessian when ``hessians``. ``loader``: a ``lwq.models.blocks.BlockLoader`` (default:
    blocks stay where they are); ``first_window``: the index of ``samples[0]`` among all windows (it
    seeds the labels, so a share of the windows gives the same labels wherever it runs)."""
    from lwq.models.blocks import ResidentBlocks

    device = torch.device(device)
    spec = arch_for(model)
    blocks = get_blocks(model, spec)
    loader = loader or ResidentBlocks(str(next(blocks[0].parameters()).device))
    names = set(names)
    inputs = capture_block_inputs(model, [samples[i:i + 1] for i in range(samples.shape[0])], device, spec, "cpu")
    states = [inputs.hidden]
    steps, total = 0, 2 * len(blocks)
    with torch.no_grad():
        for i in range(len(blocks)):
            block = loader.acquire(model, i, device)
            states.append([run_block(block, h.to(device), kw).cpu() for h, kw in zip(states[-1], inputs.kwargs)])
            loader.release(model, i)
            steps += 1
            if on_step is not None:
                on_step(steps, total)
    grads, tokens = _head_gradients(model, states.pop(), device, first_window)
    sums: dict[str, torch.Tensor] = {}
    trials: dict[str, dict[str, float]] = {}
    for i in reversed(range(len(blocks))):
        block = loader.acquire(model, i, device)
        prefix = f"{spec.blocks}.{i}."
        mods = {n: model.get_submodule(n) for n in sorted(names) if n.startswith(prefix)}
        grads = _block_backward(block, device, mods, states.pop(), inputs.kwargs, grads, level, seeds, sums,
                                trial if trial is not None and (trial_blocks is None or i in trial_blocks) else None,
                                hessians, trials)
        loader.release(model, i)
        steps += 1
        if on_step is not None:
            on_step(steps, total)
    return FisherResult(sums, trials, tokens)


def _block_backward(block: nn.Module, device: torch.device, mods: Mapping[str, nn.Module], hidden: list[torch.Tensor],
                    kwargs: list[dict[str, Any]], grads: list[torch.Tensor], level: float, seeds: Sequence[int],
                    sums: dict[str, torch.Tensor], trial: Trial | None, hessians: bool,
                    trials: dict[str, dict[str, float]]) -> list[torch.Tensor]:
    """One block of the backward sweep: adds its linears' Fisher sums (and runs their trials);
    returns the gradients at the block's inputs."""
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    weights = {n: linear_weight(m).detach().float() for n, m in mods.items()}
    noise = {n: noise_like(w, seeds, level) for n, w in weights.items()}
    acc = {n: torch.zeros(len(seeds), dtype=torch.float64) for n in mods}
    hs: dict[str, torch.Tensor] = {}
    cap = _Capture(mods)
    out_grads = []
    try:
        for h, kw, g_out in zip(hidden, kwargs, grads):
            x = h.to(device).requires_grad_(True)
            with torch.enable_grad():
                y = run_block(block, x, kw)
                got = torch.autograd.grad(y, [x] + [cap.y[n] for n in mods], grad_outputs=g_out.to(y.device),
                                          allow_unused=True)
            out_grads.append(got[0].detach().cpu())
            for n, g in zip(mods, got[1:]):
                if g is not None:
                    acc[n] += quadratic(cap.x[n], g, noise[n]).double().cpu()
                if trial is not None and hessians:
                    flat = cap.x[n].reshape(-1, cap.x[n].shape[-1])
                    hs[n] = flat.t() @ flat if n not in hs else hs[n] + flat.t() @ flat
            cap.x.clear()
            cap.y.clear()
    finally:
        cap.close()
        for p in frozen:
            p.requires_grad_(True)
    for n in mods:
        sums[n] = acc[n]
        if trial is not None:
            trials[n] = trial(n, weights[n], hs.pop(n, None))
    return out_grads

