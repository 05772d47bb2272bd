"""Load what a command is given: a Hugging Face model (local folder or hub id) or an lwq checkpoint."""
from __future__ import annotations

from torch import nn

from lwq.formats.checkpoint import load_checkpoint
from lwq.models.load import check_local_model, is_lwq_checkpoint, load_pretrained, looks_local, resolve_device


def load_model(name: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False) -> nn.Module:
    """A causal LM or an lwq checkpoint in eval mode on ``device`` (weights through safetensors only;
    ``trust_remote_code`` off unless asked)."""
    if looks_local(name) and check_local_model(name) and is_lwq_checkpoint(name):
        return load_checkpoint(name, device=str(resolve_device(device)), dtype=dtype)
    return load_pretrained(name, dtype, device, trust_remote_code)
