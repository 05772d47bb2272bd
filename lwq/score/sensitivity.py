"""``sensitivity``: measured importance. Quantize only one layer (a linear, or every linear of a
block) with round-to-nearest at a low bit width (default 2, group 128) and record how much the
model's next-token predictions on the calibration samples change: the KL divergence from the full
model's distribution (default) or the increase in mean NLL. **Higher score = more important.**

Fast path: the full-precision hidden states entering every block are computed once and cached on
the CPU, so a trial in block ``i`` runs only blocks ``i..N-1`` and the head. Weights are restored
bit for bit after each trial. Blocks can live off the device (``SensitivityProbe``'s ``loader``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lwq.backends.quant import rtn_fake_quant
from lwq.models.arch import arch_for, block_index, get_blocks, linear_weight
from lwq.calib.stats import InputAccumulator
from lwq.models.blocks import BlockLoader, ResidentBlocks, capture_block_inputs, forward_blocks, head_logits, run_block
from lwq.score.base import ScoreConfig, ScoreInputs, Scores

DEFAULT_BITS = 2
FakeQuant = Callable[[torch.Tensor, Any], torch.Tensor]  # (W (out, in), H (in, in) or None) -> dequantized W


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


def _replace_in_place(modules: list[nn.Module], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Give each module the (out, in) weight in ``weights``; returns the originals for ``_restore``."""
    saved = []
    for mod, W in zip(modules, weights):
        w = linear_weight(mod)
        saved.append(mod.weight.detach().clone())
        w.copy_(W.to(w.dtype))
    return saved


def _restore(modules: list[nn.Module], saved: list[torch.Tensor]) -> None:
    for mod, orig in zip(modules, saved):
        mod.weight.copy_(orig)


class SensitivityProbe:
    """The cached full-precision state of one model on one set of samples: block inputs (CPU) and
    reference logits (CPU), computed once, so any number of trials can follow. ``units(granularity)``
    names what can be quantized alone; ``measure(names, ...)`` scores them; ``plan_divergence``
    scores several layers replaced at once (the ``search`` solver's objective).

    Blocks come from ``loader`` (``lwq.models.blocks.BlockLoader``) one at a time: by default they stay
    where they are; ``ResidentBlocks("cpu")`` keeps them in CPU memory and moves each to ``device``
    for its turn (a model larger than the GPU), ``lwq.models.lazy.LazyBlocks`` reads them from disk.
    Trials of the same block run side by side, so each later block is fetched once per group."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, samples: torch.Tensor, metric: str = "kl", batch_size: int = 8,
                 device: torch.device | str | None = None, loader: BlockLoader | None = None) -> None:
        self.model, self.metric = model, metric
        self.spec = arch_for(model)
        self.blocks = get_blocks(model, self.spec)
        self.device = torch.device(device) if device is not None else next(self.blocks[0].parameters()).device
        self.loader = loader or ResidentBlocks(str(next(self.blocks[0].parameters()).device))
        self.chunks = [samples[i:i + batch_size] for i in range(0, samples.shape[0], batch_size)]
        self.first = capture_block_inputs(model, self.chunks, self.device, self.spec, store="cpu")
        outputs: list[list[torch.Tensor]] = []
        hidden = forward_blocks(model, self.first, self.device, self.loader, lambda _i, h: outputs.append(h))
        self.inputs = [self.first.hidden, *outputs[:-1]]  # what enters each block
        self.ref_logits = [torch.cat([head_logits(model, h[r:r + 1].to(self.device), self.spec).cpu()
                                      for r in range(h.shape[0])]) for h in hidden]
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
                sym: bool = False, on_step: Callable[[int, int], None] | None = None,
                quantizer: FakeQuant | None = None) -> Scores:
        """Per-token divergence of each unit in ``names`` quantized alone (weights restored after each):
        round-to-nearest at ``bits``/``group_size``/``sym``, or ``quantizer(W, H)`` (W float (out, in),
        H the linear's ``XᵀX/n`` on the full-precision inputs of its block, e.g. GPTQ) when given."""
        units = self.units(granularity)
        unknown = [n for n in names if n not in units]
        if unknown:
            raise KeyError(f"not a {granularity} of this model: {unknown[0]}")
        by_block: dict[int, list[str]] = {}
        for n in names:
            by_block.setdefault(units[n][0], []).append(n)
        scores: Scores = {}
        for i, group in sorted(by_block.items()):
            block = self.loader.acquire(self.model, i, self.device)
            rels = list(dict.fromkeys(r for name in group for r in units[name][1]))
            hessians = self._hessians(block, i, rels) if quantizer is not None else dict.fromkeys(rels)
            fake = quantizer or (lambda W, _H: rtn_fake_quant(W, bits, group_size, sym))
            hidden = {}
            for name in group:
                mods = [block.get_submodule(r) for r in units[name][1]]
                saved = _replace_in_place(mods, [fake(linear_weight(m).detach().float(), hessians[r])
                                                 for m, r in zip(mods, units[name][1])])
                try:
                    hidden[name] = [run_block(block, h.to(self.device), kw)
                                    for h, kw in zip(self.inputs[i], self.first.kwargs)]
                finally:
                    _restore(mods, saved)
            self.loader.release(self.model, i)
            totals = self._finish(i + 1, hidden, len(self.chunks))
            for name in group:
                scores[name] = float(totals[name]) / self.n_pos
                if on_step is not None:
                    on_step(len(scores), len(names))
        return {n: scores[n] for n in names}

    def _hessians(self, block: nn.Module, i: int, rels: list[str]) -> dict[str, torch.Tensor]:
        """``XᵀX / n`` of each linear ``rels`` of block ``i`` on the cached full-precision inputs
        (accumulated as calibration does: ``lwq.calib.stats.InputAccumulator``)."""
        accs = {r: InputAccumulator(linear_weight(block.get_submodule(r)).shape[1], self.device, True) for r in rels}
        handles = [block.get_submodule(r).register_forward_hook(lambda _m, args, _out, acc=acc: acc.add(args[0]))
                   for r, acc in accs.items()]
        try:
            for h, kw in zip(self.inputs[i], self.first.kwargs):
                run_block(block, h.to(self.device), kw)
        finally:
            for hd in handles:
                hd.remove()
        return {r: acc.H for r, acc in accs.items()}

    @torch.no_grad()
    def plan_divergence(self, weights: Mapping[str, torch.Tensor], nchunks: int | None = None) -> float:
        """Per-token divergence with every linear named in ``weights`` (full module names) holding
        that weight instead of its own (restored after), on the first ``nchunks`` batches."""
        n = len(self.chunks) if nchunks is None else max(1, min(nchunks, len(self.chunks)))
        touched = sorted({block_index(k, self.spec.blocks) for k in weights})
        if not touched:
            return 0.0
        start = touched[0]
        hidden = {"plan": self.inputs[start][:n]}
        for i in range(start, len(self.blocks)):
            block = self.loader.acquire(self.model, i, self.device)
            prefix = f"{self.spec.blocks}.{i}."
            mods = {k: block.get_submodule(k[len(prefix):]) for k in weights if k.startswith(prefix)}
            saved = {k: m.weight.data for k, m in mods.items()}
            try:
                for k, m in mods.items():
                    m.weight.data = weights[k].to(self.device)
                hidden["plan"] = [run_block(block, h.to(self.device), kw)
                                  for h, kw in zip(hidden["plan"], self.first.kwargs)]
            finally:
                for k, m in mods.items():
                    m.weight.data = saved[k]
            self.loader.release(self.model, i)
        total = self._finish(len(self.blocks), hidden, n)["plan"]
        return float(total) / sum(_positions(c, self.metric) for c in self.chunks[:n])

    def _finish(self, start: int, hidden: dict[str, list[torch.Tensor]], n: int) -> dict[str, torch.Tensor]:
        """Run each entry's hidden states (first ``n`` batches) through blocks ``start..N-1`` (each
        block fetched once for all entries) and the head; summed divergence per entry."""
        for k in range(start, len(self.blocks)):
            block = self.loader.acquire(self.model, k, self.device)
            hidden = {name: [run_block(block, h, kw) for h, kw in zip(hs, self.first.kwargs)]
                      for name, hs in hidden.items()}
            self.loader.release(self.model, k)
        totals = {}
        for name, hs in hidden.items():
            total = torch.zeros((), dtype=torch.float64)
            for j, h in enumerate(hs[:n]):
                for r in range(h.shape[0]):  # one sequence at a time: logits of a large vocabulary are big
                    logits = head_logits(self.model, h[r:r + 1], self.spec)
                    total += divergence(self.ref_logits[j][r:r + 1].to(self.device), logits,
                                        self.chunks[j][r:r + 1].to(self.device), self.metric).double().cpu()
            totals[name] = total
        return totals


def sensitivity_scores(
    model: nn.Module, samples: torch.Tensor, granularity: str = "block", bits: int = DEFAULT_BITS,
    group_size: int = 128, sym: bool = False, metric: str = "kl", batch_size: int = 8,
    on_step: Callable[[int, int], None] | None = None,
) -> Scores:
    """Per-token divergence (see module docstring) caused by quantizing each block or linear alone.
    Runs on the device of ``model``'s parameters; ``samples`` are token ids (nsamples, seqlen)."""
    probe = SensitivityProbe(model, samples, metric, batch_size)
    return probe.measure(list(probe.units(granularity)), granularity, bits, group_size, sym, on_step)


def run(inputs: ScoreInputs, cfg: ScoreConfig) -> Scores:
    assert inputs.model is not None and inputs.samples is not None
    return sensitivity_scores(inputs.model, inputs.samples, cfg.granularity, cfg.bits or DEFAULT_BITS,
                              cfg.group_size, cfg.sym, cfg.metric, on_step=inputs.on_step)
