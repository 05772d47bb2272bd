"""Kernel registry: each kernel declares what it supports; selection checks every declaration.

``select_kernel`` returns the highest-priority kernel whose declaration covers the layer's spec,
shape, the activation dtype and the device (and whose runtime, Triton, is importable), else None
(the layout's pure-torch reference path). It never picks a kernel that does not declare support.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from lwq.kernels.int6.ops import run_w6a8, run_w6a16
from lwq.kernels.runtime import device_reason, triton_error
from lwq.kernels.w4a8.ops import run_w4a8
from lwq.kernels.w4a16.ops import FLOAT_DTYPES, run_gptq
from lwq.registry import Registry
from lwq.spec import SUPPORTED_GROUP_SIZES, LayerSpec

RunFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class Kernel:
    """A kernel and its declared support. ``run(x, layer)`` computes ``x @ W^T`` (no bias) from a
    ``QuantizedLinear``'s buffers; ``interpreter`` says it also runs on CPU under ``TRITON_INTERPRET=1``."""

    name: str
    run: RunFn
    formats: tuple[str, ...]
    bits: tuple[int, ...]
    act_bits: tuple[int, ...]
    group_sizes: tuple[int, ...] = SUPPORTED_GROUP_SIZES
    act_order: bool = True
    sym_only: bool = False
    k_multiple: int = 1
    n_multiple: int = 1
    min_cc: tuple[int, int] = (8, 0)
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    interpreter: bool = True
    priority: int = 0
    backend: str = "triton"

    def spec_reason(self, spec: LayerSpec, shape: tuple[int, int]) -> str | None:
        """Why this kernel cannot run a layer of this spec and (out, in) shape (None when it can)."""
        out_f, in_f = shape
        checks = (
            (spec.format in self.formats, f"format {spec.format} not in {self.formats}"),
            (spec.bits in self.bits, f"{spec.bits}-bit weights not in {self.bits}"),
            (spec.act_bits in self.act_bits, f"act_bits {spec.act_bits} not in {self.act_bits}"),
            (spec.group_size in self.group_sizes, f"group size {spec.group_size} not in {self.group_sizes}"),
            (self.act_order or not spec.act_order, "act-order not supported"),
            (spec.sym or not self.sym_only, "needs symmetric weights"),
            (in_f % self.k_multiple == 0, f"in_features {in_f} not a multiple of {self.k_multiple}"),
            (out_f % self.n_multiple == 0, f"out_features {out_f} not a multiple of {self.n_multiple}"),
        )
        return next((why for ok, why in checks if not ok), None)

    def runtime_reason(self, device: torch.device | str) -> str | None:
        """Why this kernel cannot run on ``device`` here (missing Triton, old GPU, CPU without interpreter)."""
        if self.backend == "triton":
            err = triton_error()
            if err:
                return err
        return device_reason(device, self.min_cc, self.interpreter)

    def reason(self, spec: LayerSpec, shape: tuple[int, int], x_dtype: torch.dtype,
               device: torch.device | str) -> str | None:
        """Why this kernel cannot run this layer with these activations (None when it can)."""
        why = self.spec_reason(spec, shape)
        if why is None and x_dtype not in self.dtypes:
            why = f"activation dtype {x_dtype} not supported"
        return why or self.runtime_reason(device)


KERNELS: Registry[Kernel] = Registry("kernel")
KERNELS.add("triton-w4a16", Kernel("triton-w4a16", run_gptq, formats=("gptq",), bits=(2, 4, 8), act_bits=(16,)))
KERNELS.add("triton-w4a8", Kernel("triton-w4a8", run_w4a8, formats=("w4a8",), bits=(4,), act_bits=(8,),
                                  sym_only=True))
KERNELS.add("triton-w6a16", Kernel("triton-w6a16", run_w6a16, formats=("int6",), bits=(6,), act_bits=(16,)))
KERNELS.add("triton-w6a8", Kernel("triton-w6a8", run_w6a8, formats=("int6",), bits=(6,), act_bits=(8,),
                                  sym_only=True))

# Formats some kernel targets: with LWQ_KERNEL=triton, a layer of one of these formats must get a kernel.
KERNEL_FORMATS: frozenset[str] = frozenset(f for _, k in KERNELS.items() for f in k.formats)


def layer_shape(layer: Any) -> tuple[int, int]:
    return int(layer.out_features), int(layer.in_features)


def ranked() -> list[Kernel]:
    """Registered kernels, best first."""
    return sorted((k for _, k in KERNELS.items()), key=lambda k: -k.priority)


def select_kernel(layer: Any, x_dtype: torch.dtype, device: torch.device | str) -> Kernel | None:
    """The best kernel that supports ``layer`` (``.spec``, ``.out_features``, ``.in_features``) with
    activations of ``x_dtype`` on ``device``; None when none does (use the reference path)."""
    for k in ranked():
        if k.reason(layer.spec, layer_shape(layer), x_dtype, device) is None:
            return k
    return None


def unsupported_reasons(layer: Any, x_dtype: torch.dtype, device: torch.device | str) -> list[str]:
    """``name: reason`` for every kernel that cannot run ``layer`` (for error messages)."""
    return [f"{k.name}: {k.reason(layer.spec, layer_shape(layer), x_dtype, device)}" for k in ranked()]
