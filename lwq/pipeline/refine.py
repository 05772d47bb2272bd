"""Block-output refinement: tune the rounding and the grids of one quantized block (SignRound's idea).

After a decoder block's linears are quantized by their backend, each refinable layer gets a learnable
rounding offset ``v`` in [-0.5, 0.5] per weight and learnable range factors per group (the low and
high ends of an asymmetric grid, the half-range of a symmetric one). The block, fed the inputs that
the already-quantized earlier blocks produce, is tuned by signed gradient descent with a linearly
decaying step to reproduce the full-precision block's outputs on full-precision inputs, so each block
also absorbs the error it receives. The block's normalization weights (full precision in the
checkpoint, so free in bytes) are tuned with them, each step a fraction of the weight's size: a
per-channel scale of the inputs of the linears they feed that the per-group grids cannot express
(on docs8 at 3 bits, 0.23 perplexity lower on average over three seeds). Rounding starts from the
weight the backend was given on the backend's grid (see ``TunedLinear``), the whole-set loss is
measured at a few checkpoints, and the best parameters seen win; a block is never left with a larger
output error than the backend gave it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lwq.backends.base import QuantizedWeight
from lwq.backends.rtn import FP16_MIN_NORMAL
from lwq.errors import BadInput
from lwq.spec import REFINE_MODES
REFINABLE_FORMATS = frozenset({"gptq", "int6", "w4a8"})
RANGE = (0.5, 1.25)  # bounds of the learned range factors (1 = the backend's grid)
CHECKS = 2  # whole-set loss evaluations over the run (halfway and at the end), besides the start
OnStep = Callable[[int, int, float], None]


@dataclass(frozen=True)
class RefineConfig:
    """``steps`` signed-gradient steps per block (0: keep the backend's result), ``lr`` the first
    step size (default ``1 / steps``, decaying linearly to 0), ``batch`` calibration windows per step,
    ``norms`` whether the block's normalization weights are tuned too."""

    steps: int = 200
    lr: float | None = None
    batch: int = 8
    norms: bool = True  # also tune the block's normalization weights (``--refine-norms``)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise BadInput(f"--refine-steps must be a whole number >= 0, got {self.steps!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise BadInput(f"--refine-lr must be a positive number, got {self.lr!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise BadInput(f"--refine-batch must be a whole number >= 1, got {self.batch!r}")
        if not isinstance(self.norms, bool):
            raise BadInput(f"refine_norms must be true or false, got {self.norms!r}")

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.steps, 1)


def parse_refine(mode: str) -> str:
    """``--refine``: ``block`` or ``none`` (case-insensitive)."""
    m = str(mode).strip().lower()
    if m not in REFINE_MODES:
        raise BadInput(f"--refine must be one of {', '.join(REFINE_MODES)}, got {mode!r}")
    return m


def refinable(qw: QuantizedWeight) -> bool:
    """Whether ``qw`` is an integer grid (codes, scales, zeros) that refinement can tune."""
    return (qw.q is not None and qw.scale is not None and qw.zero is not None and qw.g_idx is not None
            and qw.spec.bits < 16 and qw.spec.format in REFINABLE_FORMATS)


def full_range_scales(W: torch.Tensor, g: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """Symmetric scales that use every code (llama.cpp's and AutoRound's ``int_sym``): the group's
    larger side maps to code 0 exactly (``scale = -max / 2**(bits-1)`` when the positive side is
    larger, so the scale is negative), the other side gets ``2**(bits-1) - 1`` steps; fp16-exact."""
    mid = 2 ** (bits - 1)
    neg = torch.zeros(W.shape[0], groups, device=W.device).scatter_reduce(1, g.expand_as(W), (-W).clamp_min(0), "amax")
    pos = torch.zeros(W.shape[0], groups, device=W.device).scatter_reduce(1, g.expand_as(W), W.clamp_min(0), "amax")
    s = torch.where(neg >= pos, neg, -pos) / mid
    s = torch.where(s.abs() < FP16_MIN_NORMAL, torch.full_like(s, FP16_MIN_NORMAL), s)
    return s.to(torch.float16).float()


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _int8_activations(x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """The smoothed activations as the int8-activation kernels see them (``quantize_activations``:
    the same per-token rounding), with an identity gradient through the rounding."""
    from lwq.kernels.w4a8.reference import inverse_smooth, quantize_activations

    inv = inverse_smooth(smooth)
    v = x.float() if inv is None else x.float() * inv
    q, scale = quantize_activations(x.detach().reshape(-1, x.shape[-1]), smooth)
    return v + (q.float().reshape(v.shape) * scale.reshape(*v.shape[:-1], 1) - v).detach()


class TunedLinear(nn.Module):
    """A quantized linear with learnable rounding and grid; ``result()`` gives its ``QuantizedWeight``.

    Codes are ``round(source / s + v) + z`` on the learned grid ``(s, z)``, which starts at the
    backend's. ``source`` is the weight the backend was given (then the start is round-to-nearest
    on the backend's grid); without it, the backend's dequantized weight (the start is its codes).
    Rounding from the weight itself refines better: on docs8 at 3 bits the tuned block-output error
    ends 20-35% lower than when starting from GPTQ's codes, whose offsets sit at the [-0.5, 0.5] edge."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device,
                 source: torch.Tensor | None = None) -> None:
        super().__init__()
        assert refinable(qw)
        self.qw = qw
        self.maxq = 2**qw.spec.bits - 1
        self.sym = bool(qw.spec.sym or qw.spec.act_bits == 8)
        self.register_buffer("g", qw.g_idx.long().to(device))
        s0, z0 = qw.scale.float().to(device), qw.zero.float().to(device)
        if self.sym and source is not None:  # symmetric layers start from the full-range grid
            s0 = full_range_scales(source.detach().float().to(device), self.g, s0.shape[1], qw.spec.bits)
        self.register_buffer("s0", s0)
        self.register_buffer("z0", z0)
        self.register_buffer("base", (s0[:, self.g] * (qw.q.float().to(device) - z0[:, self.g])) if source is None
                             else source.detach().float().to(device))
        smooth = qw.extra.get("smooth")
        # as stored (fp16, ``smooth_tensor``), so the emulated activations are the checkpoint's
        self.register_buffer("smooth", None if smooth is None else smooth.to(torch.float16).float().to(device))
        self.register_buffer("bias", None if bias is None else bias.detach().float().to(device))
        in_f, gs = self.base.shape[1], qw.spec.group_size
        self.size = in_f if gs == -1 else gs  # columns per group when groups are contiguous (no act-order)
        self.contiguous = bool(torch.equal(self.g.cpu(), torch.arange(in_f) // self.size))
        self.v = nn.Parameter(torch.zeros_like(self.base))
        self.hi = nn.Parameter(torch.ones_like(s0))
        self.lo = None if self.sym else nn.Parameter(torch.ones_like(s0))

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales (fp16-exact, as stored, at least its smallest normal in size; a full-range symmetric
        scale keeps its sign) and zero points (integers) of the current parameters."""
        if self.sym:
            s, z = self.s0 * self.hi, self.z0
        else:
            wmin, wmax = -self.z0 * self.s0 * self.lo, (self.maxq - self.z0) * self.s0 * self.hi
            s = ((wmax - wmin) / self.maxq).clamp_min(FP16_MIN_NORMAL)
            z = torch.clamp(_round_ste(-wmin / s), 0, self.maxq)
        sign = torch.where(s < 0, -1.0, 1.0).detach()
        s = sign * (sign * s).clamp_min(FP16_MIN_NORMAL)
        return s + (s.detach().to(torch.float16).float() - s.detach()), z

    def columns(self, t: torch.Tensor) -> torch.Tensor:
        """A per-group tensor (out, groups) spread over the columns (out, in)."""
        if not self.contiguous:
            return t[:, self.g]
        out_f, groups = t.shape
        return t[:, :, None].expand(out_f, groups, self.size).reshape(out_f, groups * self.size)[:, :self.base.shape[1]]

    def weight(self) -> torch.Tensor:
        s, z = self.grid()
        sg, zg = self.columns(s), self.columns(z)
        codes = torch.clamp(_round_ste(self.base / sg + self.v) + zg, 0, self.maxq)
        return sg * (codes - zg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        if self.qw.spec.act_bits == 8:
            x = _int8_activations(x, self.smooth).to(x.dtype)
        elif self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        return nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def clamp_(self) -> None:
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)
            self.hi.clamp_(*RANGE)
            if self.lo is not None:
                self.lo.clamp_(*RANGE)

    def result(self) -> QuantizedWeight:
        """The tuned weight as the checkpoint will store it (codes, fp16 scales, integer zeros)."""
        with torch.no_grad():
            s, z = self.grid()
            sg, zg = self.columns(s), self.columns(z)
            q = torch.clamp(torch.round(self.base / sg + self.v) + zg, 0, self.maxq)
            qw = self.qw
            return QuantizedWeight(qw.spec, q.to(torch.int32).cpu(), s.cpu(), z.to(torch.int32).cpu(), qw.g_idx.cpu(),
                                   dict(qw.extra), {**qw.meta, "refined": True})


@dataclass(frozen=True)
class RefineReport:
    """Whole-set block-output MSE before and after, and whether the tuned result was kept."""

    start_loss: float
    final_loss: float
    kept: bool
    layers: int
    norms: int = 0  # normalization weights tuned


def _slice_kwargs(kw: dict[str, Any], idx: torch.Tensor, batch: int) -> dict[str, Any]:
    """Keyword arguments of a batch restricted to windows ``idx`` (tensors whose first dim is the batch)."""
    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1:
            return v[idx.to(v.device)]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        if isinstance(v, list):
            return [cut(x) for x in v]
        return v
    return {k: cut(v) for k, v in kw.items()}


Layer = tuple[QuantizedWeight, "torch.Tensor | None", "torch.Tensor | None"]  # weight, bias, source


class NormSteps:
    """Signed steps on normalization weights, each ``lr * |multiplier|`` per channel (the multiplier is
    ``weight + offset``: Gemma's norms scale by ``1 + weight``), kept in float32 masters and written
    back after each step, so bf16/fp16 weights do not lose the small steps."""

    def __init__(self, weights: list[nn.Parameter], offset: float) -> None:
        self.weights = weights
        self.masters = [w.detach().float().clone() for w in weights]
        self.start = [m.clone() for m in self.masters]
        self.size = [(m + offset).abs() for m in self.masters]

    def step(self, grads: tuple[torch.Tensor, ...], lr: float) -> None:
        with torch.no_grad():
            for w, m, size, g in zip(self.weights, self.masters, self.size, grads):
                m.sub_(lr * torch.sign(g.float()) * size)
                w.copy_(m.to(w.dtype))

    def load(self, masters: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for w, m, v in zip(self.weights, self.masters, masters):
                m.copy_(v)
                w.copy_(m.to(w.dtype))


def refine_block(block: nn.Module, layers: dict[str, Layer],
                 hidden: list[torch.Tensor], kwargs: list[dict[str, Any]], targets: list[torch.Tensor],
                 cfg: RefineConfig, device: torch.device, seed: int = 0,
                 on_step: OnStep | None = None, norms: list[nn.Parameter] | None = None,
                 norm_offset: float = 0.0) -> tuple[dict[str, QuantizedWeight], RefineReport]:
    """Tune the quantized linears ``layers`` (block-relative name -> (weight, bias, source weight or
    None)) of ``block``, whose modules hold the backend's result, so that ``block(hidden)`` matches
    ``targets``; returns the tuned weights (the given ones when tuning did not lower the whole-set
    loss below the backend's) and a report. ``norms``: normalization weights of the block tuned with
    them (when ``cfg.norms``; ``norm_offset`` as in ``NormSteps``), left in place tuned when the tuned
    result is kept, restored otherwise. The block's modules are left as they were."""
    from lwq.formats.qlinear import replace_linear
    from lwq.models.blocks import run_block

    given = {lin: layer[0] for lin, layer in layers.items()}
    todo = {lin: layer for lin, layer in layers.items() if refinable(layer[0])}
    if not todo or cfg.steps == 0 or not hidden:
        return given, RefineReport(math.nan, math.nan, False, 0)
    gen = torch.Generator().manual_seed(seed)

    def whole_loss() -> float:
        with torch.no_grad():
            tot = sum(float(nn.functional.mse_loss(run_block(block, h.to(device), kw).float(), t.to(device).float(),
                                                    reduction="sum")) for h, kw, t in zip(hidden, kwargs, targets))
        return tot / sum(t.numel() for t in targets)

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params + norm.masters]

    start = whole_loss()  # the backend's result, still in place
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    tuned = {lin: TunedLinear(qw, bias, device, source) for lin, (qw, bias, source) in todo.items()}
    old = {lin: replace_linear(block, lin, t) for lin, t in tuned.items()}
    params = [p for t in tuned.values() for p in t.parameters()]
    norm = NormSteps(list(norms or []) if cfg.norms else [], norm_offset)
    for w in norm.weights:
        w.requires_grad_(True)
    try:
        best, best_params = start, snapshot()  # a tuned result must beat the backend's to be kept
        every = max(1, math.ceil(cfg.steps / CHECKS))
        with torch.enable_grad():
            for step in range(cfg.steps):
                b = int(torch.randint(len(hidden), (1,), generator=gen))
                h, kw, t = hidden[b], kwargs[b], targets[b]
                n = h.shape[0]
                if cfg.batch < n:
                    idx = torch.randperm(n, generator=gen)[:cfg.batch]
                    h, t, kw = h[idx.to(h.device)], t[idx.to(t.device)], _slice_kwargs(kw, idx, n)
                out = run_block(block, h.to(device), kw).float()
                loss = nn.functional.mse_loss(out, t.to(device).float())
                grads = torch.autograd.grad(loss, params + norm.weights)
                lr = cfg.step_size * (1.0 - step / cfg.steps)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(lr * torch.sign(g))
                norm.step(grads[len(params):], lr)
                for tl in tuned.values():
                    tl.clamp_()
                if on_step is not None:
                    on_step(step + 1, cfg.steps, float(loss.detach()))
                if (step + 1) % every == 0 or step + 1 == cfg.steps:
                    cur = whole_loss()
                    if cur < best:
                        best, best_params = cur, snapshot()
        with torch.no_grad():
            for p, v in zip(params, best_params):
                p.copy_(v)
        norm.load(best_params[len(params):])  # the start's weights unless a tuned result won
        kept = best < start
        result = {lin: (tuned[lin].result() if kept and lin in tuned else qw) for lin, qw in given.items()}
        return result, RefineReport(start, best, kept, len(tuned), len(norm.weights))
    except BaseException:
        norm.load(norm.start)  # interrupted: the block's norms as they came
        raise
    finally:
        for lin, module in old.items():
            replace_linear(block, lin, module)
        for w in norm.weights:
            w.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
