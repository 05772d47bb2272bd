"""``QuantizedLinear``: a linear layer whose weight lives in a storage layout's tensors (as buffers)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lwq.backends.base import QuantizedWeight
from lwq.kernels.pack import group_index
from lwq.errors import BadInput
from lwq.formats.layout import Layout, Tensors, num_groups
from lwq.formats.layouts import get_layout
from lwq.kernels.pack import packed_len
from lwq.models.arch import LINEAR_TYPES, linear_shape, linear_weight
from lwq.spec import LayerSpec

Kernel = Callable[[torch.Tensor, "QuantizedLinear"], torch.Tensor]


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored in the layout named by ``spec.format``.

    The layout's tensors are buffers named as in the checkpoint (``qweight``, ``scales``, ...).
    ``kernel`` (set by ``lwq.kernels``) computes ``x W^T`` from the buffers; without one the layout's
    pure-torch reference path is used (always correct, on any device).
    """

    def __init__(self, spec: LayerSpec, out_features: int, in_features: int, tensors: Tensors,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.out_features = out_features
        self.in_features = in_features
        self.kernel: Kernel | None = None
        self._cached: tuple[tuple, torch.Tensor] | None = None
        self.tensor_names: tuple[str, ...] = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)

    @property
    def layout(self) -> Layout:
        return get_layout(_format(self.spec))

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def tensors(self) -> Tensors:
        """The layout tensors (current buffers, wherever they are)."""
        return {n: getattr(self, n) for n in self.tensor_names}

    def weight_bytes(self) -> int:
        """Bytes of the stored weight tensors (bias excluded): the layer's real cost."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        if self.kernel is not None:
            y = self.kernel(x, self)
        elif type(layout).forward is Layout.forward and x.device.type == "cpu":
            y = torch.nn.functional.linear(x, self._cpu_weight(x.dtype))
        else:
            y = layout.forward(x, self.tensors(), self.spec, self.shape)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _cpu_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight for the CPU reference path, kept until a buffer changes (in place or
        by moving): dequantizing on every call would dominate CPU evaluation time."""
        key = (dtype,) + tuple((t.data_ptr(), t._version, t.dtype) for t in self.tensors().values())
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.dequantize().to(dtype))
        return self._cached[1]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) the buffers stand for."""
        return self.layout.dequantize(self.tensors(), self.spec, self.shape)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """Pack ``qw`` with its spec's layout."""
        out_f, in_f = qw.shape
        tensors = get_layout(_format(qw.spec)).pack(qw)
        return cls(qw.spec, out_f, in_f, tensors, None if bias is None else bias.detach().clone())

    @classmethod
    def empty(cls, spec: LayerSpec, out_features: int, in_features: int, bias: bool = False,
              dtype: torch.dtype = torch.float32) -> "QuantizedLinear":
        """A layer with zero tensors of the right shapes, to load a checkpoint into."""
        fmt = _format(spec)
        layout = get_layout(fmt)
        maker = getattr(layout, "empty", None) or _EMPTY.get(fmt)
        tensors = maker(spec, (out_features, in_features)) if maker else layout.pack(
            _zero_weight(spec, out_features, in_features))
        b = torch.zeros(out_features, dtype=dtype) if bias else None
        return cls(spec, out_features, in_features, tensors, b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.label!r}"


def _format(spec: LayerSpec) -> str:
    return "fp16" if spec.bits >= 16 else spec.format


def _gptq_empty(spec: LayerSpec, shape: tuple[int, int]) -> Tensors:
    """Shapes of ``GptqLayout.pack`` computed without packing (tests check they agree)."""
    out_f, in_f = shape
    g = num_groups(in_f, spec.group_size)
    t = {"qweight": torch.zeros(packed_len(in_f, spec.bits), out_f, dtype=torch.int32)}
    if not spec.sym:
        t["qzeros"] = torch.zeros(g, packed_len(out_f, spec.bits), dtype=torch.int32)
    t["scales"] = torch.zeros(g, out_f, dtype=torch.float16)
    if spec.act_order:
        t["g_idx"] = torch.zeros(in_f, dtype=torch.int32)
    return t


def _fp16_empty(spec: LayerSpec, shape: tuple[int, int]) -> Tensors:
    return {"weight": torch.zeros(shape, dtype=torch.float16)}


# layouts of lwq.formats.layout that have no ``empty`` method of their own
_EMPTY: dict[str, Callable[[LayerSpec, tuple[int, int]], Tensors]] = {"gptq": _gptq_empty, "fp16": _fp16_empty}


def _zero_weight(spec: LayerSpec, out_f: int, in_f: int) -> QuantizedWeight:
    g = num_groups(in_f, spec.group_size)
    return QuantizedWeight(
        spec, torch.zeros(out_f, in_f, dtype=torch.int32), torch.ones(out_f, g),
        torch.zeros(out_f, g, dtype=torch.int32),
        group_index(in_f, spec.group_size), extra={"weight": torch.zeros(out_f, in_f, dtype=torch.float16)},
        meta={"shape": (out_f, in_f)},
    )


def add_v1_tensors(model: nn.Module) -> None:
    """Give every ``gptq``-format layer the tensors format version 1 checkpoints stored although
    they are implied: ``g_idx`` without act-order, ``qzeros`` of symmetric layers (loaded values used)."""
    for module in model.modules():
        if not (isinstance(module, QuantizedLinear) and _format(module.spec) == "gptq"):
            continue
        spec, (out_f, in_f) = module.spec, module.shape
        if "g_idx" not in module.tensor_names:
            module.register_buffer("g_idx", group_index(in_f, spec.group_size))
            module.tensor_names = module.tensor_names + ("g_idx",)
        if "qzeros" not in module.tensor_names:
            g = num_groups(in_f, spec.group_size)
            module.register_buffer("qzeros", torch.zeros(g, packed_len(out_f, spec.bits), dtype=torch.int32))
            module.tensor_names = module.tensor_names + ("qzeros",)


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of the module called ``name``; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias of an ``nn.Linear`` / ``Conv1D`` (None when it has none)."""
    b = getattr(module, "bias", None)
    return None if b is None else b.detach()


def quantized_from_linear(module: nn.Module, qw: QuantizedWeight) -> QuantizedLinear:
    """A ``QuantizedLinear`` for ``qw`` that keeps ``module``'s bias (Linear or GPT-2 Conv1D)."""
    if not isinstance(module, LINEAR_TYPES):
        raise TypeError(f"expected a linear layer, got {type(module).__name__}")
    assert tuple(linear_weight(module).shape) == qw.shape
    return QuantizedLinear.from_quantized(qw, linear_bias(module))


def install_empty(model: nn.Module, plan: dict[str, LayerSpec]) -> nn.Module:
    """Replace every planned linear of ``model`` by an empty ``QuantizedLinear`` of its shape (bias and
    dtype kept), ready for the checkpoint's tensors; a planned name the model lacks is a ``BadInput``."""
    for name, spec in plan.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise BadInput(f"checkpoint plans layer {name!r}, which this model has no module for") from None
        out_f, in_f = linear_shape(module)
        bias = getattr(module, "bias", None)
        dtype = (bias if bias is not None else module.weight).dtype
        replace_linear(model, name, QuantizedLinear.empty(spec, out_f, in_f, bias is not None, dtype))
    return model
