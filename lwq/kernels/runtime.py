"""Triton availability, device checks and launch configurations shared by the kernel entry points.

Triton is optional: ``triton_error()`` gives the import error as a reason instead of failing. On
CPU, kernels run only through Triton's interpreter (``TRITON_INTERPRET=1``), which ``triton.jit``
reads when a kernel module is first imported, so the ``kernel.py`` modules are imported lazily by
the ops, after the environment is set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lwq.errors import LwqError


def triton_error() -> str | None:
    """Why Triton cannot be used here (the import error), or None when it imports."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton not importable ({type(exc).__name__}: {exc})"
    return None


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to interpret kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def device_reason(device: torch.device | str, min_cc: tuple[int, int], interpreter_ok: bool) -> str | None:
    """Why a Triton kernel cannot run on ``device`` (None when it can)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        cc = torch.cuda.get_device_capability(device)
        if tuple(cc) < tuple(min_cc):
            return f"compute capability {cc[0]}.{cc[1]} < {min_cc[0]}.{min_cc[1]}"
        return None
    if device.type == "cpu":
        if not interpreter_ok:
            return "no CPU path"
        if not interpreting():
            return "CPU needs TRITON_INTERPRET=1 (Triton's interpreter)"
        return None
    return f"device {device.type} not supported"


def require_triton() -> None:
    """Raise a one-line LwqError when Triton is missing."""
    err = triton_error()
    if err:
        raise LwqError(f"Triton kernels unavailable: {err}")


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes, split-K factor and compiler hints of one launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def launch_config(M: int, N: int, K: int, device: torch.device, max_block_k: int = 128,
                  split_k: int | None = None) -> LaunchConfig:
    """Heuristic tiles by M: decode (M <= 16) uses 16-row tiles and split-K to fill the GPU;
    prefill uses 64/128-row tiles. ``max_block_k`` caps BLOCK_K (int8 kernels need it to divide the group)."""
    if M <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif M <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    bk = min(bk, max_block_k)
    tiles_k = -(-K // bk)
    if split_k is None:
        split_k = 1
        if M <= 16 and device.type == "cuda":
            programs = -(-N // bn) * -(-M // bm)
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            split_k = max(1, min(16, tiles_k, (2 * sms) // max(programs, 1)))
    return LaunchConfig(bm, bn, bk, max(1, min(int(split_k), tiles_k)), warps, stages)
