"""The lwq checkpoint: safetensors shards, ``config.json`` with ``quantization_config`` (the plan),
the source's tokenizer and generation config, and ``lwq_manifest.json`` (sha256 and size per shard).

Writing goes to a temporary sibling folder that is renamed into place once complete; loading checks
the manifest first, then rebuilds the transformers model without random init and swaps the planned
linears for ``QuantizedLinear``s before loading the tensors strictly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lwq.errors import BadInput
from lwq.fileio import write_error
from lwq.formats.folder import (MAX_SHARD_BYTES, TOKENIZER_FILES, TensorRef, copy_side_files,
                               model_from_config, sha256_file, write_json, write_shards)
from lwq.formats.qlinear import QuantizedLinear, add_v1_tensors, install_empty
from lwq.models.load import check_finite_weights, read_config, resolve_device, resolve_dtype, wrong_shape
from lwq.spec import LayerSpec

FORMAT_VERSION = 2  # 2: no g_idx stored for layers without act-order (1: stored for every gptq layer)
READABLE_VERSIONS = (1, 2)
MANIFEST = "lwq_manifest.json"


def quantization_config(plan: dict[str, LayerSpec]) -> dict[str, Any]:
    """The ``quantization_config`` block: format version, the most common spec as default, every layer."""
    specs = [s.to_dict() for s in plan.values()]
    default = max(specs, key=lambda d: specs.count(d)) if specs else LayerSpec().to_dict()
    return {"quant_method": "lwq", "format_version": FORMAT_VERSION, "default": default,
            "layers": {name: spec.to_dict() for name, spec in plan.items()}}


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases (tied weights keep their first name), contiguous and on CPU.
    Tensors on ``meta`` (blocks of a lazily loaded model) are kept as they are, never deduplicated."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if t.is_meta:
            out[key] = t
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = t.detach().to("cpu").contiguous()
    return out


def save_checkpoint(model: nn.Module, out_dir: str | Path, plan: dict[str, LayerSpec], source: str,
                    extra_meta: dict[str, Any] | None = None, force: bool = False, tokenizer: Any = None,
                    max_shard_bytes: int = MAX_SHARD_BYTES, extra_files: dict[str, Any] | None = None,
                    state: dict[str, TensorRef] | None = None, store_dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (its planned linears already ``QuantizedLinear``s) as an lwq checkpoint.

    An existing ``out_dir`` is refused unless ``force`` (and even then unless it is an lwq
    checkpoint or an empty folder); it is replaced only once the new one is complete, so a failed
    write (full disk, interrupt) leaves it as it was. The tokenizer is saved from ``tokenizer`` or
    copied from ``source``'s folder. ``extra_files`` (file name -> JSON-able object, e.g. the plan)
    are written inside it too. ``state``: the tensors to write, in order (default: the model's own;
    ``lwq.pipeline.workdir`` streams the blocks from its work folder instead). ``store_dtype``: the
    source model's dtype, in which every floating tensor that is not a quantized layer's own data
    (embeddings, norms, head, biases) is stored and which config.json names (default: as computed)."""
    from lwq.fileio import check_output, publish

    src = Path(source).expanduser()
    out = check_output(out_dir, "checkpoint", force, inputs=[src] if src.exists() else [])
    missing = [n for n in plan if not isinstance(model.get_submodule(n), QuantizedLinear)]
    if missing:
        raise BadInput(f"{len(missing)} planned layer(s) are not quantized, e.g. {missing[0]}")
    if state is None:
        tensors = unique_state(model)
        on_meta = [k for k, t in tensors.items() if t.is_meta]
        if on_meta:
            raise BadInput(f"{len(on_meta)} tensor(s) of the model are not loaded (meta), e.g. {on_meta[0]}")
        state = {k: TensorRef.of(t) for k, t in tensors.items()}

    if store_dtype is not None:
        state = in_store_dtype(state, plan, store_dtype)

    def build(tmp: Path) -> None:
        names = _write(model, tmp, plan, src, tokenizer, max_shard_bytes, state, store_dtype)
        for fname, obj in (extra_files or {}).items():
            write_json(tmp / fname, obj)
        _write_manifest(tmp, names, src, extra_meta or {})

    try:
        publish(out, build, "checkpoint")  # the manifest is the marker, written by build
    except OSError as exc:
        raise write_error(out_dir, exc) from None
    return out


def in_store_dtype(state: dict[str, TensorRef], plan: dict[str, LayerSpec], dtype: torch.dtype
                   ) -> dict[str, TensorRef]:
    """``state`` with every floating tensor outside the quantized layers' data (their codes, scales,
    zeros) cast to ``dtype`` when it is read; biases count as outside."""
    def quantized_data(key: str) -> bool:
        owner, _, field = key.rpartition(".")
        return owner in plan and field != "bias"

    def cast(ref: TensorRef) -> TensorRef:
        return TensorRef(dtype, ref.shape, lambda: ref.read().to(dtype))

    return {k: cast(r) if r.dtype.is_floating_point and r.dtype != dtype and not quantized_data(k) else r
            for k, r in state.items()}


def _write(model: nn.Module, tmp: Path, plan: dict[str, LayerSpec], src: Path, tokenizer: Any,
           max_shard_bytes: int, state: dict[str, TensorRef], store_dtype: torch.dtype | None) -> list[str]:
    """Shards, config.json, tokenizer and generation config; returns the shard names."""
    names = write_shards(state, tmp, max_shard_bytes)
    config = json.loads(model.config.to_json_string(use_diff=True))
    if store_dtype is not None:
        config["dtype"] = str(store_dtype).replace("torch.", "")
        config.pop("torch_dtype", None)
    config["quantization_config"] = quantization_config(plan)
    write_json(tmp / "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    elif src.is_dir():
        copy_side_files(src, tmp, TOKENIZER_FILES)
    if src.is_dir() and (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
    elif getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(tmp))
    return names


def _write_manifest(tmp: Path, names: list[str], src: Path, extra_meta: dict[str, Any]) -> None:
    """``lwq_manifest.json``: sha256 and size of the shards (``files``) and of every other file
    (``others``: config.json, tokenizer, plan, ...), so every file a loader reads is covered and the
    folder's contents are listed exactly (the output rule, ``lwq.fileio``)."""
    def entry(n: str) -> dict[str, Any]:
        return {"sha256": sha256_file(tmp / n), "size": (tmp / n).stat().st_size}

    files = {n: entry(n) for n in names}
    others = {p.name: entry(p.name) for p in sorted(tmp.iterdir()) if p.name not in files and p.name != MANIFEST}
    write_json(tmp / MANIFEST, {"format_version": FORMAT_VERSION, "source": str(src), "files": files, "others": others,
                           **extra_meta})


def verify_manifest(path: str | Path) -> list[Path]:
    """Check every shard, and every other file the manifest lists (config.json, tokenizer, plan:
    manifests since 2026-12 list them under ``others``), against ``lwq_manifest.json``; returns the
    shard paths."""
    p = Path(path).expanduser()
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise BadInput(f"{p} has no {MANIFEST}: not a complete lwq checkpoint")
    try:
        doc = json.loads(mpath.read_text())
        items = [(str(n), int(d["size"]), str(d["sha256"])) for n, d in doc["files"].items()]
        others = [(str(n), int(d["size"]), str(d["sha256"])) for n, d in (doc.get("others") or {}).items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadInput(f"{mpath} is unreadable or malformed ({type(exc).__name__}: {exc})") from None
    if not items:
        raise BadInput(f"{mpath} lists no weight files")
    for name, size, digest in items + others:
        f = p / name
        if Path(name).name != name:
            raise BadInput(f"{mpath} names a file outside the checkpoint: {name!r}")
        if not f.is_file():
            raise BadInput(f"checkpoint file {name} is missing from {p}")
        if f.stat().st_size != size:
            raise BadInput(f"checkpoint file {name} has {f.stat().st_size} bytes, the manifest says {size} "
                           "(truncated or replaced)")
        if sha256_file(f) != digest:
            raise BadInput(f"checkpoint file {name} does not match its sha256 in {MANIFEST} (modified or corrupt)")
    return [p / name for name, _, _ in items]


def read_plan(config: dict[str, Any]) -> dict[str, LayerSpec]:
    """The per-layer specs of a checkpoint config's ``quantization_config`` (version checked)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "lwq":
        raise BadInput("config.json has no lwq quantization_config")
    if qc.get("format_version") not in READABLE_VERSIONS:
        raise BadInput(f"unsupported lwq checkpoint format_version {qc.get('format_version')!r} "
                       f"(this lwq reads {', '.join(map(str, READABLE_VERSIONS))})")
    layers = qc.get("layers")
    if not isinstance(layers, dict):
        raise BadInput("quantization_config.layers must map module names to specs")
    return {name: LayerSpec.from_dict(d, where=f"quantization_config.layers[{name!r}]") for name, d in layers.items()}


def load_checkpoint(path: str | Path, device: str = "auto", dtype: str = "auto") -> nn.Module:
    """Load an lwq checkpoint as a transformers model with ``QuantizedLinear``s, in eval mode."""
    p = Path(path).expanduser()
    config = read_config(p)
    plan = read_plan(config)
    shards = verify_manifest(p)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, config.get("dtype") or config.get("torch_dtype"))
    model = model_from_config(config, torch_dtype)
    install_empty(model, plan)
    if config["quantization_config"].get("format_version") == 1:
        add_v1_tensors(model)
    _load_tensors(model, shards)
    model.tie_weights()
    check_finite_weights(model)
    model.to(dev)
    model.eval()
    _attach_kernels(model)
    return model


def check_tensor_names(model: nn.Module, shards: list[Path]) -> None:
    """Refuse, in one line, shards that lack a tensor the model needs, hold one it does not have, or
    hold one of another shape (the transformers path runs this before loading; ``lwq.load`` checks the
    same while loading). A tied pair (head and embedding) needs one of its two names stored."""
    from safetensors import safe_open

    expected = {k: tuple(t.shape) for k, t in unique_state(model).items()}
    stored: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), "pt") as f:
                stored.update((k, tuple(f.get_slice(k).get_shape())) for k in f.keys())
        except (SafetensorError, OSError) as exc:
            raise BadInput(f"cannot read {shard.name}: {exc}") from None
    missing = set(expected) - set(stored)
    for target, source in tied_weights(model).items():  # one stored tensor serves both names
        if target in stored or source in stored:
            missing -= {target, source}
    unexpected, missing = sorted(set(stored) - set(expected)), sorted(missing)
    if unexpected:
        raise BadInput(f"the checkpoint holds {len(unexpected)} tensor(s) the model does not have, "
                       f"e.g. {unexpected[0]}")
    if missing:
        raise BadInput(f"the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    wrong = [k for k in stored if stored[k] != expected[k]]
    if wrong:
        raise wrong_shape(wrong[0], "in the checkpoint", stored[wrong[0]], expected[wrong[0]], len(wrong) - 1)


def tied_weights(model: nn.Module) -> dict[str, str]:
    """transformers' ``{target: source}`` map of tied parameters (``lm_head.weight`` ->
    ``model.embed_tokens.weight`` when ``tie_word_embeddings``); empty for other modules."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    return dict(expand(all_submodels=True)) if callable(expand) else {}


def _load_tensors(model: nn.Module, shards: list[Path]) -> None:
    check_tensor_names(model, shards)
    for shard in shards:
        try:
            tensors = load_file(str(shard))
        except (SafetensorError, OSError) as exc:
            raise BadInput(f"cannot read {shard.name}: {exc}") from None
        try:
            model.load_state_dict(tensors, strict=False)
        except RuntimeError as exc:
            raise BadInput(f"{shard.name} does not fit the model: {' '.join(str(exc).split())[:300]}") from None


def _attach_kernels(model: nn.Module) -> None:
    """Let ``lwq.kernels`` (when present) pick fast kernels for the quantized layers."""
    try:
        import lwq.kernels as kernels
    except ModuleNotFoundError as exc:
        if exc.name != "lwq.kernels":
            raise
        return
    attach = getattr(kernels, "attach_kernels", None)
    if attach is not None:
        attach(model)
