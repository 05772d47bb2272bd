"""Calibration statistics collected one decoder block at a time.

Per block: mean cosine similarity between the hidden states entering and leaving the block (and
LIM = 1 - that), mean/std of per-token input and output norms. Per linear: the Hessian proxy
``H = X^T X / n`` (mean over the ``n`` tokens the linear saw, accumulated as a float32 running mean
so large token counts neither overflow nor lose the small terms), the per-input-channel activation
absmax and ``n``. Linears of one group in the architecture table see the same input, so they share
one Hessian (the same tensor object; ``hessian_key`` names the group's first member).

Memory is about one block plus the activations: only the block being run sits on the compute
device; a ``BlockLoader`` decides where a block comes from (resident on CPU, or read lazily from
safetensors by ``lwq.models.lazy``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lwq.models.arch import ArchSpec, arch_for, get_blocks, linear_shape
from lwq.models.blocks import BlockLoader, ResidentBlocks, capture_block_inputs, move_outside_blocks, run_block


@dataclass(frozen=True)
class BlockStats:
    """How much a block changes its input: ``cos`` is the token-mean cosine similarity of input and
    output hidden states, ``lim = 1 - cos``; norms are per-token L2 norms (mean and std)."""

    cos: float
    lim: float
    in_norm_mean: float
    in_norm_std: float
    out_norm_mean: float
    out_norm_std: float
    tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class LinearStats:
    """Input statistics of one linear: ``hessian`` is ``X^T X / tokens`` (in, in) float32 or None when
    not collected; ``absmax`` the per-input-channel max |x| (in,); ``hessian_key`` the linear whose
    Hessian this one shares (its group's first member)."""

    name: str
    shape: tuple[int, int]
    hessian: torch.Tensor | None
    absmax: torch.Tensor
    tokens: int
    hessian_key: str


@dataclass(frozen=True)
class CalibStats:
    """Everything ``collect_stats`` measured, keyed by module name in model order; ``meta`` holds
    provenance (model name/path, model type, nsamples, seqlen, seed, data source)."""

    blocks: dict[str, BlockStats]
    linears: dict[str, LinearStats]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def block_names(self) -> list[str]:
        return list(self.blocks)

    @property
    def linear_names(self) -> list[str]:
        return list(self.linears)

    def block_of(self, linear: str) -> str:
        """The block module name that contains ``linear``."""
        for b in self.blocks:
            if linear.startswith(b + "."):
                return b
        raise KeyError(linear)


class InputAccumulator:
    """Running statistics of one linear's input (X rows are tokens): ``n``, the per-input-channel
    absmax and, when ``hessian``, ``H = scale * X^T X / n`` (``scale`` 2 is GPTQ's convention, the
    quantizer's; 1 is the calibration statistics' mean)."""

    def __init__(self, in_features: int, device: torch.device, hessian: bool = True, scale: float = 1.0) -> None:
        self.n = 0
        self.scale = scale
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        X = x.detach().reshape(-1, x.shape[-1]).float()
        m = X.shape[0]
        if m == 0:
            return
        self.absmax = torch.maximum(self.absmax, X.abs().amax(dim=0))
        if self.H is not None:
            # running mean: H_{n+m} = H_n * n/(n+m) + scale * X^T X/(n+m); scaling X first keeps the
            # float32 products of the order of H itself whatever the token count
            self.H.mul_(self.n / (self.n + m))
            Xs = X * (self.scale / (self.n + m)) ** 0.5
            self.H += Xs.t() @ Xs
        self.n += m


class _BlockMoments:
    """Sums for the block-level statistics (float64 scalars)."""

    def __init__(self) -> None:
        self.n = 0
        self.cos = 0.0
        self.norms = {"in": [0.0, 0.0], "out": [0.0, 0.0]}

    def add(self, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        a = h_in.reshape(-1, h_in.shape[-1]).double()
        b = h_out.reshape(-1, h_out.shape[-1]).double()
        self.cos += float(F.cosine_similarity(a, b, dim=-1, eps=1e-12).sum())
        for key, t in (("in", a), ("out", b)):
            nrm = t.norm(dim=-1)
            self.norms[key][0] += float(nrm.sum())
            self.norms[key][1] += float((nrm * nrm).sum())
        self.n += a.shape[0]

    def result(self) -> BlockStats:
        def mean_std(key: str) -> tuple[float, float]:
            s, s2 = self.norms[key]
            mean = s / self.n
            return mean, max(s2 / self.n - mean * mean, 0.0) ** 0.5

        cos = self.cos / self.n
        (im, isd), (om, osd) = mean_std("in"), mean_std("out")
        return BlockStats(cos, 1.0 - cos, im, isd, om, osd, self.n)


def _leaders(spec: ArchSpec) -> dict[str, str]:
    """Map each linear (relative name) to its group's first member, whose input it shares."""
    return {name: group[0] for group in spec.groups for name in group}


@torch.no_grad()
def collect_stats(
    model: nn.Module, batches: torch.Tensor, device: torch.device | str = "cpu",
    on_block: Callable[[int, int], None] | None = None, hessians: bool = True, batch_size: int = 8,
    loader: BlockLoader | None = None, store: torch.device | str | None = None,
    on_linears: Callable[[int, dict[str, LinearStats]], dict[str, LinearStats]] | None = None,
) -> CalibStats:
    """Run ``model`` block by block on token ids ``batches`` (nsamples, seqlen) and collect the
    statistics described in the module docstring. ``on_block(i, n)`` is called after each block.

    Only the block being run is on ``device``; ``loader`` decides where blocks come from
    (default: resident in memory). Hidden states are kept on ``store`` (default: ``device``).
    ``on_linears(i, stats)`` receives each block's linear statistics and returns what to keep (a
    writer can store the Hessians and drop them, so memory does not grow with depth).
    The model's own weights are never changed."""
    device = torch.device(device)
    spec = arch_for(model)
    blocks = get_blocks(model, spec)
    loader = loader or ResidentBlocks(str(next(blocks[0].parameters()).device))
    home = next((p.device for n, p in model.named_parameters() if not n.startswith(spec.blocks + ".")),
                torch.device("cpu"))
    chunks = [batches[i:i + batch_size] for i in range(0, batches.shape[0], batch_size)]
    inputs = capture_block_inputs(model, chunks, device, spec, store=store or device)
    hidden = inputs.hidden
    leaders = _leaders(spec)
    block_stats: dict[str, BlockStats] = {}
    linear_stats: dict[str, LinearStats] = {}
    try:
        for i in range(len(blocks)):
            block = loader.acquire(model, i, device)
            accs = {rel: InputAccumulator(linear_shape(block.get_submodule(rel))[1], device, hessians)
                    for rel in dict.fromkeys(leaders.values())}
            handles = [block.get_submodule(rel).register_forward_hook(
                lambda _m, args, _out, acc=acc: acc.add(args[0])) for rel, acc in accs.items()]
            moments = _BlockMoments()
            try:
                outs = []
                for h, kw in zip(hidden, inputs.kwargs):
                    h_dev = h.to(device)
                    out = run_block(block, h_dev, kw)
                    moments.add(h_dev, out)
                    outs.append(out.to(h.device))
            finally:
                for hd in handles:
                    hd.remove()
            prefix = f"{spec.blocks}.{i}"
            block_stats[prefix] = moments.result()
            host = {rel: (acc.H.cpu() if acc.H is not None else None, acc.absmax.cpu(), acc.n)
                    for rel, acc in accs.items()}
            del accs
            mine = {}
            for rel in spec.linears:
                H, absmax, n = host[leaders[rel]]
                mine[f"{prefix}.{rel}"] = LinearStats(
                    f"{prefix}.{rel}", linear_shape(block.get_submodule(rel)), H, absmax, n, f"{prefix}.{leaders[rel]}")
            del host
            linear_stats.update(on_linears(i, mine) if on_linears is not None else mine)
            del mine
            loader.release(model, i)
            hidden = outs
            if on_block is not None:
                on_block(i + 1, len(blocks))
    finally:
        move_outside_blocks(model, spec, home)
    cfg = model.config
    meta = {"model_type": getattr(cfg, "model_type", None), "hidden_size": getattr(cfg, "hidden_size", None),
            "num_blocks": len(blocks), "nsamples": int(batches.shape[0]), "seqlen": int(batches.shape[1])}
    return CalibStats(block_stats, linear_stats, meta)

