"""Load a Hugging Face causal LM (hub id or local folder) or an lwq checkpoint, safely."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lwq.errors import BadInput, LwqError, one_line

try:  # transformers 5 validates configs as strict dataclasses; their errors are not ValueErrors
    from huggingface_hub.errors import StrictDataclassError
    CONFIG_ERRORS: tuple[type[Exception], ...] = (StrictDataclassError,)
except ImportError:  # an older huggingface_hub: configs raise ValueError only
    CONFIG_ERRORS = ()

def invalid_config(name: str, exc: BaseException) -> BadInput:
    """The one line for a config.json that transformers' validation rejects."""
    return BadInput(f"cannot load {name}: config.json does not describe a valid model: {one_line(exc)}")


def wrong_shape(key: str, where: str, stored: Any, wanted: Any, others: int = 0) -> BadInput:
    """The one line for a stored tensor whose shape is not the one config.json makes it (``others``:
    how many more differ)."""
    more = f" ({others} more differ)" if others else ""
    return BadInput(f"{key} {where} has shape {list(stored)}, but config.json makes it {list(wanted)}{more} "
                    "(config.json edited, or weights of another model?)")


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise BadInput(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} asked for but no CUDA GPU is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device, config_dtype: Any = None) -> torch.dtype:
    """``auto``: the checkpoint's half dtype on GPU, float32 on CPU (half matmuls are slow there)."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        if isinstance(config_dtype, str):
            config_dtype = DTYPES.get(config_dtype.replace("torch.", ""))
        return config_dtype if config_dtype in (torch.float16, torch.bfloat16) else torch.float16
    try:
        return DTYPES[dtype]
    except KeyError:
        raise BadInput(f"invalid dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}") from None


def source_dtype(name: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a model's weights are published in: config.json's ``dtype`` (or its ``text_config``'s),
    else, for a local folder, the most common floating dtype in its safetensors headers (what
    transformers' ``dtype="auto"`` reads too), else float32. The dtype its checkpoint keeps for what lwq
    does not quantize (see ``store_dtype``)."""
    if looks_local(name):
        cfg = read_config(name)
    else:
        from transformers import AutoConfig

        ensure_hub(name)
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).to_dict()
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    raw = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    if raw is None and looks_local(name):
        raw = _header_dtype(Path(name).expanduser())
    found = raw if isinstance(raw, torch.dtype) else DTYPES.get(str(raw or "float32").replace("torch.", ""))
    return found if found is not None and found.is_floating_point else torch.float32


def store_dtype(source: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """What a checkpoint stores its unquantized tensors in: the source's dtype, or the compute dtype when
    that is narrower (a float32 model computed in 16 bits holds 16-bit values; storing them in 32 would
    only waste bytes)."""
    return compute if compute.itemsize < source.itemsize else source


def checkpoint_dtype(name: str, compute: str, trust_remote_code: bool = False) -> torch.dtype:
    """``store_dtype`` of ``name``'s source dtype and the compute dtype ``compute`` (``float32``...)."""
    return store_dtype(source_dtype(name, trust_remote_code), DTYPES[compute])


def _header_dtype(folder: Path) -> str | None:
    """The most common floating dtype among the tensors of ``folder``'s safetensors files (headers only)."""
    from collections import Counter

    from safetensors import safe_open

    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    count: Counter[str] = Counter()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            count.update(names[d] for d in (st.get_slice(k).get_dtype() for k in st.keys()) if d in names)
    return count.most_common(1)[0][0] if count else None


def looks_local(name: str) -> bool:
    """A path-like string (exists, or starts with ./ ../ / ~, or has more than one slash)."""
    return (os.path.lexists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
            or name.endswith(os.sep) or "\\" in name)


def missing_path(path: str | Path, what: str = "model path") -> BadInput:
    """The one line for a path that does not resolve: a symlink loop, a broken symlink, or nothing."""
    p = Path(path).expanduser()
    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return BadInput(f"{what} {path} is a symlink loop (its links never reach a file or folder)")
    if p.is_symlink():
        return BadInput(f"{what} {path} is a broken symlink (to {os.readlink(p)}, which does not exist)")
    return BadInput(f"no such {what}: {path}")


def read_config(path: str | Path) -> dict[str, Any]:
    """Parse ``config.json`` of a local model folder, with clear errors."""
    p = Path(path).expanduser()
    if not p.exists():
        raise missing_path(path)
    if not p.is_dir():
        raise BadInput(f"model path is not a folder: {path}")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise BadInput(f"no config.json in {path}: not a Hugging Face model folder")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"cannot read {cfg}: {exc}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{cfg} is not a JSON object")
    return data


def is_lwq_checkpoint(path: str | Path) -> bool:
    """True for a local folder whose config carries ``quantization_config.quant_method == "lwq"``."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        return False
    qc = read_config(p).get("quantization_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") == "lwq"


def check_local_model(path: str | Path) -> dict[str, Any]:
    """Validate a local model folder before handing it to transformers; returns its config."""
    p = Path(path).expanduser()
    cfg = read_config(p)
    if "model_type" not in cfg:
        raise BadInput(f"{path}/config.json has no model_type: not a transformers model config")
    if not any(p.glob("*.safetensors")):
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise BadInput(f"{path} holds only pickle weights (*.bin); lwq loads safetensors only. "
                           "Convert them with transformers' save_pretrained(safe_serialization=True) first")
        raise BadInput(f"no *.safetensors weights in {path}")
    check_safetensors(p)
    from transformers import CONFIG_MAPPING

    if cfg["model_type"] not in CONFIG_MAPPING and not cfg.get("auto_map"):
        raise BadInput(f"{path}: unsupported model_type {cfg['model_type']!r} (unknown to this transformers; "
                       "check config.json or upgrade transformers)")
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith(CAUSAL_SUFFIXES) for a in archs):
        raise BadInput(f"{path} holds a {archs[0]}, not a causal language model")
    return cfg


def check_safetensors(folder: Path) -> None:
    """Every ``*.safetensors`` file of ``folder`` has a valid header covering the whole file (reads
    only the headers): a corrupt or truncated download is one clear line, not a library error."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt", device="cpu"):
                pass
        except (SafetensorError, OSError) as exc:
            raise BadInput(f"{f} is not a readable safetensors file (corrupt or truncated?): "
                           f"{' '.join(str(exc).split())[:160]}") from None


def load_pretrained(name: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False) -> nn.Module:
    """Load a Hugging Face causal LM (local folder or hub id) in eval mode on ``device``; an lwq
    checkpoint is refused here (``lwq.pipeline.load.load_model`` reads both).

    Weights are read through safetensors only; ``trust_remote_code`` is off unless asked.
    """
    dev = resolve_device(device)
    local = looks_local(name)
    if local:
        cfg = check_local_model(name)
        if is_lwq_checkpoint(name):
            raise BadInput(f"{name} is an lwq checkpoint: load it with lwq.load")
        torch_dtype = resolve_dtype(dtype, dev, cfg.get("dtype") or cfg.get("torch_dtype"))
    else:
        torch_dtype = resolve_dtype(dtype, dev)
    model = _from_pretrained(name, torch_dtype, trust_remote_code, local)
    model.to(dev)
    model.eval()
    return model


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers on its port (``HF_HUB_OFFLINE=1`` means no)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def ensure_hub(name: str) -> None:
    """For a hub id not in the local cache, fail fast with one line when the hub cannot be reached."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if not hub_reachable():
        raise LwqError(f"cannot fetch {name!r} from the Hugging Face hub (no network or HF_HUB_OFFLINE=1) and it "
                       "is not in the local cache: download it first or pass a local folder")


def _from_pretrained(name: str, torch_dtype: torch.dtype, trust_remote_code: bool, local: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not local:
        ensure_hub(name)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(Path(name).expanduser()) if local else name, dtype=torch_dtype,
            trust_remote_code=trust_remote_code, use_safetensors=True, local_files_only=local,
            ignore_mismatched_sizes=True, output_loading_info=True,  # refused below, in one line
        )
    except CONFIG_ERRORS as exc:
        raise invalid_config(name, exc) from None
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        if "trust_remote_code" in msg:
            raise BadInput(f"{name} needs custom code; rerun with --trust-remote-code if you trust it") from None
        if "Unrecognized configuration class" in msg or "AutoModelForCausalLM" in msg:
            raise BadInput(f"{name} is not a causal language model ({msg[:160]})") from None
        raise BadInput(f"cannot load {name}: {msg}") from None
    except OSError as exc:
        msg = " ".join(str(exc).split())
        if local:
            raise BadInput(f"cannot load {name}: {msg[:300]}") from None
        if "connect" in msg.lower() or "offline" in msg.lower() or "resolve" in msg.lower():
            raise LwqError(f"cannot fetch {name!r} from the Hugging Face hub (no network or offline mode): "
                           f"download it first or pass a local folder") from None
        raise BadInput(f"{name!r} is neither a local folder nor a model on the Hugging Face hub: {msg[:200]}") from None
    except (RuntimeError, KeyError) as exc:  # corrupt or mismatched weight files
        raise BadInput(f"cannot load weights of {name}: {one_line(exc)}") from None
    check_loading_info(name, info)
    return model


def check_loading_info(name: str, info: dict[str, Any]) -> None:
    """Refuse, in one line, weights whose shapes differ from what config.json makes them, or that lack
    a tensor the model needs (transformers would initialise it at random, with a warning)."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, stored, wanted = mismatched[0]
        raise wrong_shape(key, f"in the weight files of {name}", stored, wanted, len(mismatched) - 1)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise BadInput(f"{name}: the weight files lack {len(missing)} tensor(s) the model needs, e.g. {missing[0]}")


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer (an lwq checkpoint carries a copy of its source's tokenizer files)."""
    from transformers import AutoTokenizer

    local = looks_local(name)
    if local:
        read_config(name)  # a missing path or a folder without config.json: the same one line as for the model
    else:
        ensure_hub(name)
    try:
        return AutoTokenizer.from_pretrained(
            str(Path(name).expanduser()) if local else name, trust_remote_code=trust_remote_code,
            local_files_only=local,
        )
    except CONFIG_ERRORS as exc:  # AutoTokenizer reads config.json too
        raise invalid_config(name, exc) from None
    except (OSError, ValueError, TypeError) as exc:
        raise BadInput(f"cannot load a tokenizer for {name}: {one_line(exc, 200)}") from None


def check_finite_weights(model: Any) -> None:
    """Refuse (one line naming the tensors) a loaded model whose floating weights, scales or other
    buffers hold NaN or Inf; tensors still on the meta device (read later, block by block) are checked
    when they are read."""
    import torch

    bad = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise BadInput(f"non-finite (NaN/Inf) values in {', '.join(bad[:3])}{more}")
