"""Kernels: Triton GEMMs for the quantized formats, each beside a pure-torch reference.

``attach_kernels(model)`` sets ``QuantizedLinear.kernel`` per ``LWQ_KERNEL`` (``auto``: the best
supported kernel on the layer's device, else the reference path; ``triton``: Triton for every layer
whose format a kernel targets, or a one-line error; ``reference``: no kernels). ``kernel_status()``
lists the kernels with whether they can run here and why not (``lwq doctor``).
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
from torch import nn

from lwq.errors import BadInput, LwqError
from lwq.kernels.registry import KERNEL_FORMATS, KERNELS, Kernel, select_kernel, unsupported_reasons
from lwq.kernels.runtime import triton_error

MODES = ("auto", "triton", "reference")
ENV_VAR = "LWQ_KERNEL"


def kernel_mode(mode: str | None = None) -> str:
    """``mode`` or ``$LWQ_KERNEL`` (default ``auto``), checked."""
    m = (mode if mode is not None else os.environ.get(ENV_VAR, "auto")).strip().lower() or "auto"
    if m not in MODES:
        raise BadInput(f"{ENV_VAR} must be one of {', '.join(MODES)}, got {m!r}")
    return m


def quantized_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules that look like ``QuantizedLinear`` (a ``spec`` and a ``kernel`` attribute)."""
    for name, mod in model.named_modules():
        if hasattr(mod, "spec") and hasattr(mod, "kernel") and hasattr(mod, "in_features"):
            yield name, mod


def layer_device(layer: nn.Module) -> torch.device:
    buf = next(layer.buffers(), None)
    return buf.device if buf is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The activation dtype of a model: its first floating-point parameter's (float32 if none)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def attach_kernels(model: nn.Module, mode: str | None = None, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Set ``.kernel`` on every quantized linear of ``model`` (on its final device) per ``mode`` /
    ``$LWQ_KERNEL``, for activations of ``dtype`` (default: the model's dtype). Returns module name
    -> kernel name (``reference`` where none is attached)."""
    m = kernel_mode(mode)
    dtype = dtype or model_dtype(model)
    if m == "triton" and triton_error():
        raise LwqError(f"{ENV_VAR}=triton but Triton is unavailable: {triton_error()}")
    chosen: dict[str, str] = {}
    for name, layer in quantized_linears(model):
        kernel: Kernel | None = None
        if m != "reference":
            kernel = select_kernel(layer, dtype, layer_device(layer))
            if kernel is None and m == "triton" and layer.spec.format in KERNEL_FORMATS and layer.spec.bits < 16:
                why = "; ".join(unsupported_reasons(layer, dtype, layer_device(layer)))
                raise LwqError(f"{ENV_VAR}=triton: no kernel supports {name} ({layer.spec.label}, "
                               f"{layer.out_features}x{layer.in_features}, {dtype}): {why}")
        layer.kernel = None if kernel is None else kernel.run
        chosen[name] = "reference" if kernel is None else kernel.name
    return chosen


def kernel_status(device: torch.device | str | None = None) -> list[tuple[str, bool, str]]:
    """(kernel name, available here, reason or what it covers) for ``lwq doctor``; ``device`` defaults
    to the first GPU, else the CPU."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, k in KERNELS.items():
        why = k.runtime_reason(dev)
        covers = f"{'/'.join(k.formats)} w{'/'.join(map(str, k.bits))} a{'/'.join(map(str, k.act_bits))} on {dev}"
        rows.append((name, why is None, covers if why is None else why))
    return rows


__all__ = ["KERNELS", "MODES", "Kernel", "attach_kernels", "kernel_mode", "kernel_status",
           "select_kernel"]
