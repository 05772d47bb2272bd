"""lwq: layer-wise mixed-precision quantization of large language models."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> Any:
    """Load a model folder, hub id or lwq checkpoint as a transformers model in eval mode."""
    from lwq.models.load import load_model

    return load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _arrange_hf_registration() -> None:
    """``AutoModelForCausalLM.from_pretrained`` loads lwq checkpoints once lwq is imported; the
    registration waits until transformers' quantizer registry is imported (see ``lwq.hf``)."""
    from lwq.hf import arrange_registration

    arrange_registration()


_arrange_hf_registration()

__all__ = ["__version__", "load"]
