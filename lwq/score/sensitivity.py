"""``sensitivity``: measured importance. Quantize only one layer (a linear, or every linear of a
block) with round-to-nearest at a low bit width (default 2, group 128) and record how much the
model's next-token predictions on the calibration samples change: the KL divergence from the full
model's distribution (default) or the increase in mean NLL. **Higher score = more important.**

Fast path: the full-precision hidden states entering every block are computed once and cached on
the CPU, so a trial in block ``i`` runs only blocks ``i..N-1`` and the head. Weights are restored
bit for bit after each trial.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lwq.backends.quant import rtn_fake_quant
from lwq.models.arch import arch_for, get_blocks, linear_weight
from lwq.models.blocks import BlockInputs, capture_block_inputs, head_logits, run_block
from lwq.score.base import Scorer, ScoreConfig, ScoreInputs, Scores

DEFAULT_BITS = 2


def divergence(ref_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, metric: str) -> torch.Tensor:
    """Summed over positions: ``KL(p_ref || p)`` per position (``kl``), or ``NLL(p) - NLL(p_ref)`` of
    the next tokens (``nll``, positions 0..T-2)."""
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    cur = F.log_softmax(logits.float(), dim=-1)
    if metric == "kl":
        return (ref.exp() * (ref - cur)).sum()
    tgt = ids[:, 1:].unsqueeze(-1)
    return (ref[:, :-1].gather(-1, tgt) - cur[:, :-1].gather(-1, tgt)).sum()


def _positions(ids: torch.Tensor, metric: str) -> int:
    return ids.shape[0] * (ids.shape[1] - (1 if metric == "nll" else 0))


@torch.no_grad()
def _cache_inputs(model: nn.Module, first: BlockInputs, device: torch.device) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Full-precision inputs of every block (CPU) and the final hidden states (CPU)."""
    blocks = get_blocks(model)
    per_block = [first.hidden]
    hidden = first.hidden
    for block in blocks:
        hidden = [run_block(block, h.to(device), kw).cpu() for h, kw in zip(hidden, first.kwargs)]
        per_block.append(hidden)
    return per_block[:-1], per_block[-1]


def _quantize_in_place(modules: list[nn.Module], bits: int, group_size: int, sym: bool) -> list[torch.Tensor]:
    """RTN-quantize each module's weight in place; returns the originals for ``_restore``."""
    saved = []
    for mod in modules:
        w = linear_weight(mod)
        saved.append(mod.weight.detach().clone())
        w.copy_(rtn_fake_quant(w.detach().float(), bits, group_size, sym).to(w.dtype))
    return saved


def _restore(modules: list[nn.Module], saved: list[torch.Tensor]) -> None:
    for mod, orig in zip(modules, saved):
        mod.weight.copy_(orig)


class SensitivityProbe:
    """The cached full-precision state of one model on one set of samples: block inputs, final
    hidden states and reference logits (computed once), so any number of trials can follow.
    ``units(granularity)`` names what can be quantized alone; ``measure(names, ...)`` scores them."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, samples: torch.Tensor, metric: str = "kl", batch_size: int = 8) -> None:
        self.model, self.metric = model, metric
        self.spec = arch_for(model)
        self.blocks = get_blocks(model, self.spec)
        self.device = next(model.parameters()).device
        self.chunks = [samples[i:i + batch_size] for i in range(0, samples.shape[0], batch_size)]
        self.first = capture_block_inputs(model, self.chunks, self.device, self.spec, store="cpu")
        self.inputs, final = _cache_inputs(model, self.first, self.device)
        self.ref_logits = [head_logits(model, h.to(self.device), self.spec).cpu() for h in final]
        self.n_pos = sum(_positions(c, metric) for c in self.chunks)

    def units(self, granularity: str = "block") -> dict[str, tuple[int, list[str]]]:
        """Unit name -> (block index, linears relative to the block), in model order."""
        out: dict[str, tuple[int, list[str]]] = {}
        for i in range(len(self.blocks)):
            prefix = f"{self.spec.blocks}.{i}"
            if granularity == "block":
                out[prefix] = (i, list(self.spec.linears))
            else:
                out.update({f"{prefix}.{rel}": (i, [rel]) for rel in self.spec.linears})
        return out

    @torch.no_grad()
    def measure(self, names: list[str], granularity: str = "block", bits: int = DEFAULT_BITS, group_size: int = 128,
                sym: bool = False, on_step: Callable[[int, int], None] | None = None) -> Scores:
        """Per-token divergence of each unit in ``names`` quantized alone (weights restored after each)."""
        units = self.units(granularity)
        unknown = [n for n in names if n not in units]
        if unknown:
            raise KeyError(f"not a {granularity} of this model: {unknown[0]}")
        scores: Scores = {}
        for step, name in enumerate(names):
            i, rels = units[name]
            mods = [self.blocks[i].get_submodule(r) for r in rels]
            saved = _quantize_in_place(mods, bits, group_size, sym)
            try:
                total = torch.zeros((), dtype=torch.float64)
                for j, ids in enumerate(self.chunks):
                    h = self.inputs[i][j].to(self.device)
                    for k in range(i, len(self.blocks)):
                        h = run_block(self.blocks[k], h, self.first.kwargs[j])
                    logits = head_logits(self.model, h, self.spec)
                    total += divergence(self.ref_logits[j].to(self.device), logits, ids.to(self.device),
                                        self.metric).double().cpu()
            finally:
                _restore(mods, saved)
            scores[name] = float(total) / self.n_pos
            if on_step is not None:
                on_step(step + 1, len(names))
        return scores


def sensitivity_scores(
    model: nn.Module, samples: torch.Tensor, granularity: str = "block", bits: int = DEFAULT_BITS,
    group_size: int = 128, sym: bool = False, metric: str = "kl", batch_size: int = 8,
    on_step: Callable[[int, int], None] | None = None,
) -> Scores:
    """Per-token divergence (see module docstring) caused by quantizing each block or linear alone.
    Runs on the device of ``model``'s parameters; ``samples`` are token ids (nsamples, seqlen)."""
    probe = SensitivityProbe(model, samples, metric, batch_size)
    return probe.measure(list(probe.units(granularity)), granularity, bits, group_size, sym, on_step)


def _run(inputs: ScoreInputs, cfg: ScoreConfig) -> Scores:
    assert inputs.model is not None and inputs.samples is not None
    return sensitivity_scores(inputs.model, inputs.samples, cfg.granularity, cfg.bits or DEFAULT_BITS,
                              cfg.group_size, cfg.sym, cfg.metric, on_step=inputs.on_step)


SENSITIVITY = Scorer("sensitivity", _run, frozenset({"model", "samples"}),
                     "measured KL (or NLL) increase when only that layer is RTN-quantized at --bits (default 2)")
