"""Where a whole-model computation (planning's measurements) runs: on one device when the model fits
there, else block by block with the blocks kept off it.

``Placement.device`` computes; ``Placement.loader`` (a ``lwq.models.blocks.BlockLoader``) is ``None``
when every block already sits on the device, ``ResidentBlocks("cpu")`` when blocks wait in CPU memory
and are copied to the device for their turn, or ``LazyBlocks`` when they are read from the
safetensors files for their turn (blocks on ``meta``: memory about one block, whatever the depth;
several processes reading the same files share the OS page cache). The modules outside the block
list (embeddings, final norm, head) always go to the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lwq.models.arch import arch_for, get_blocks
from lwq.models.blocks import move_outside_blocks

FIT_FRACTION = 0.8  # of the device's free memory a whole model may take (the rest: activations, trials)


@dataclass(frozen=True)
class Placement:
    """``device`` computes; ``loader`` brings blocks to it (None: they are already there)."""

    device: torch.device
    loader: Any = None

    @property
    def offloaded(self) -> bool:
        return self.loader is not None


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (meta tensors count by shape and dtype)."""
    seen: dict[int, torch.Tensor] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, or the host's available memory for the CPU (Linux
    ``MemAvailable``); None where it cannot be known (then everything is taken to fit)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def fits(nbytes: int, free: int | None, fraction: float = FIT_FRACTION) -> bool:
    """Whether a model of ``nbytes`` goes whole onto a device with ``free`` bytes (None: host memory)."""
    return free is None or nbytes <= fraction * free


def fits_whole(model: nn.Module, device: torch.device, max_bytes: int | None = None) -> bool:
    """Whether all of ``model`` goes on ``device``: within ``max_bytes`` when given, else within
    ``FIT_FRACTION`` of the device's free memory."""
    size = model_bytes(model)
    return size <= max_bytes if max_bytes is not None else fits(size, free_bytes(device))


def place(model: nn.Module, device: torch.device, lazy_loader: Any = None, max_bytes: int | None = None) -> Placement:
    """Put ``model`` (on CPU, or with blocks on ``meta`` and ``lazy_loader`` to read them) where it
    can compute on ``device``: whole when it fits (in ``max_bytes`` when given, else in
    ``FIT_FRACTION`` of the free memory), else its blocks stay behind (see module docstring)."""
    spec = arch_for(model)
    if fits_whole(model, device, max_bytes):
        if lazy_loader is not None:  # read every block straight onto the device, once
            for i in range(len(get_blocks(model, spec))):
                lazy_loader.acquire(model, i, device)
        model.to(device)
        return Placement(device)
    return offload(model, device, lazy_loader)


def offload(model: nn.Module, device: torch.device, lazy_loader: Any = None) -> Placement:
    """Keep ``model``'s blocks off ``device`` (on disk through ``lazy_loader``, else in CPU memory) and
    put the rest on it."""
    move_outside_blocks(model, arch_for(model), device)
    if lazy_loader is not None:
        return Placement(device, lazy_loader)
    from lwq.models.blocks import ResidentBlocks

    return Placement(device, ResidentBlocks("cpu"))


def park(model: nn.Module, placement: Placement) -> None:
    """Send what ``placement`` put on its device back to the CPU (blocks on ``meta`` stay there)."""
    if placement.offloaded:
        move_outside_blocks(model, arch_for(model), "cpu")
    else:
        model.to("cpu")


def unpark(model: nn.Module, placement: Placement) -> None:
    """Undo ``park``: the same modules go back to ``placement.device``."""
    if placement.offloaded:
        move_outside_blocks(model, arch_for(model), placement.device)
    else:
        model.to(placement.device)


def where(model: nn.Module) -> Placement:
    """The placement of a model that is wholly where its first parameter is."""
    return Placement(next(model.parameters()).device)
