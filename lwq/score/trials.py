"""What a trial quantizes with: the candidate's backend and storage format, as the checkpoint will hold it."""
from __future__ import annotations

from typing import Callable

import torch

from lwq.backends import get_backend
from lwq.formats.layouts import get_layout
from lwq.spec import LayerSpec


def layer_trials(measure_with: str) -> str:
    """How one layer's trial quantizes under ``--measure-with``: ``backend`` or ``rtn``; ``refined``
    measures backend trials, then scales them by the refinement ratios of ``lwq.pipeline.refined_trials``."""
    return "backend" if measure_with == "refined" else measure_with


def backend_quantizer(spec: LayerSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """What a trial of ``spec`` quantizes with when estimates follow the backend: the spec's backend
    (GPTQ on the layer's full-precision-input Hessian; RTN, bitsandbytes, ...) then its storage
    layout's own dequantization, so the trial's weight is the one the checkpoint will hold."""
    backend, layout = get_backend(spec.backend), get_layout(spec.format)

    def fake(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        return layout.dequantize(layout.pack(backend(W, spec, H)), spec, (int(W.shape[0]), int(W.shape[1])))

    return fake
