"""lwq: layer-wise mixed-precision quantization of large language models."""
from __future__ import annotations

from typing import Any

from lwq.spec import __version__


def load(path: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> Any:
    """Load a model folder, hub id or lwq checkpoint as a transformers model in eval mode."""
    from lwq.pipeline.load import load_model

    return load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _arrange_hf_registration() -> None:
    """``AutoModelForCausalLM.from_pretrained`` loads lwq checkpoints once lwq is imported; the
    registration waits until transformers' quantizer registry is imported (see ``lwq.formats.hf_register``)."""
    from lwq.formats.hf_register import arrange_registration

    arrange_registration()


_arrange_hf_registration()

__all__ = ["__version__", "load"]
