"""A transformers quantizer for ``quant_method: "lwq"``: ``AutoModelForCausalLM.from_pretrained`` on an
lwq checkpoint swaps the planned linears for ``QuantizedLinear``s before the weights are read, so the
packed tensors (``qweight``, ``scales``, ...) load straight into their buffers.

Registered in transformers' own quantizer registry by ``register_lwq`` (``import lwq`` arranges it,
see ``lwq.formats.hf_register``). The model built this way computes what ``lwq.load`` gives: the same layers, the same
tensors, the same kernels; the checkpoint's manifest (sha256 per shard) is checked first, as there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "lwq"


class LwqConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an lwq checkpoint (see ``lwq.formats.checkpoint``), as transformers
    wants it: constructed from the JSON keys, and ``to_dict`` giving them back unchanged."""

    def __init__(self, format_version: int = 1, default: dict[str, Any] | None = None,
                 layers: dict[str, dict[str, Any]] | None = None, quant_method: str = QUANT_METHOD,
                 **_ignored: Any) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LwqConfig is for quant_method {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.default = dict(default or {})
        self.layers = {name: dict(spec) for name, spec in (layers or {}).items()}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "default": dict(self.default),
                "layers": {name: dict(spec) for name, spec in self.layers.items()}}


class LwqHfQuantizer(HfQuantizer):
    """Loads pre-quantized lwq checkpoints (lwq quantizes with ``lwq quantize``, not at load time)."""

    requires_calibration = True
    quantization_config: LwqConfig

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from lwq.formats.checkpoint import check_tensor_names, read_plan, verify_manifest
        from lwq.formats.qlinear import add_v1_tensors, install_empty

        files = kwargs.get("checkpoint_files") or []
        shards = verify_manifest(Path(files[0]).parent) if files else []
        plan = read_plan({"quantization_config": self.quantization_config.to_dict()})
        install_empty(model, plan)
        if self.quantization_config.format_version == 1:
            add_v1_tensors(model)
        if shards:
            check_tensor_names(model, shards)  # transformers would leave missing ones uninitialised
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from lwq.kernels import attach_kernels
        from lwq.models.load import check_finite_weights

        check_finite_weights(model)  # a NaN scale would otherwise give NaN logits, silently
        attach_kernels(model)
        return model

    def is_serializable(self) -> bool:
        """No: save with ``lwq``'s own writer, which also writes the manifest."""
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register_lwq() -> bool:
    """Add ``LwqConfig`` / ``LwqHfQuantizer`` to transformers' registries under ``"lwq"``; True when this
    call added them, False when they were there already (the call is idempotent)."""
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is LwqHfQuantizer:
        return False
    from transformers.quantizers.auto import register_quantization_config, register_quantizer

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING or QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        raise ValueError(f"transformers already has another quantizer registered as {QUANT_METHOD!r}")
    register_quantization_config(QUANT_METHOD)(LwqConfig)
    register_quantizer(QUANT_METHOD)(LwqHfQuantizer)
    return True
