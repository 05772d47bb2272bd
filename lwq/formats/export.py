"""Export an lwq checkpoint as a GPTQ checkpoint that vLLM (gptq / gptq_marlin) and GPTQModel load.

The mixed plan becomes GPTQModel's per-module ``dynamic`` overrides: the most common (bits, group
size) is the default, ``+:`` regex keys give the layers that differ, ``-:`` keys skip the layers kept
in 16-bit. Tensors follow GPTQ v1: ``qweight`` int32 [ceil(in*bits/32), out] (codes packed along the
input dimension), ``qzeros`` int32 [groups, ceil(out*bits/32)] holding ``zero - 1`` (wrapped to
``bits`` bits, as AutoGPTQ writes them), ``scales`` fp16 [groups, out], ``g_idx`` int32 [in].

``decide`` is pure: it maps every block linear to what the export does with it (copy, re-quantize
with RTN, keep 16-bit) and refuses, in one line, what the target cannot serve unless ``fix``.
``export_gptq`` does the I/O (temp folder renamed into place).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch

from lwq.errors import BadInput
from lwq.formats.gptq_v1 import gptq_from_lwq, gptq_quantization_config, gptq_requantized
from lwq.registry import Registry
from lwq.spec import LayerSpec

GPTQ_GROUP_SIZES = (256, 128, 64, 32)
# the names serving engines give fused shards (vLLM's packed_modules_mapping)
FUSED_ALIASES = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


@dataclass(frozen=True)
class ExportTarget:
    """What a serving stack accepts: weight bits, whether fused shards (q/k/v, gate/up) must share a
    precision, and whether every group must be whole (``in_features % group_size == 0``)."""

    name: str
    bits: tuple[int, ...]
    fused_must_match: bool
    whole_groups: bool
    half_dtype: bool
    about: str


TARGETS: Registry[ExportTarget] = Registry("export target")
TARGETS.add("gptqmodel", ExportTarget("gptqmodel", (2, 3, 4, 8), False, False, False,
                                      "GPTQModel / transformers: 2/3/4/8-bit, per-module dynamic overrides"))
TARGETS.add("vllm", ExportTarget("vllm", (2, 3, 4, 8), True, True, True,
                                 "vLLM gptq/gptq_marlin: 2/3/4/8-bit, fused shards share bits and group size, "
                                 "whole groups, fp16 activations"))


@dataclass(frozen=True)
class LayerExport:
    """What the export does with one block linear: ``bits`` 16 keeps it as a plain fp16 ``.weight``;
    ``requantize`` (a reason) means RTN from the dequantized source weight, else the tensors are copied."""

    name: str
    source: LayerSpec | None  # None: not in the plan (the source holds its original ``.weight``)
    bits: int
    group_size: int
    sym: bool
    requantize: str | None = None

    @property
    def kept(self) -> bool:
        return self.bits >= 16

    def to_dict(self) -> dict[str, Any]:
        action = "kept 16-bit" if self.kept else ("re-quantized (RTN)" if self.requantize else "copied")
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "action": action,
                "reason": self.requantize, "source": None if self.source is None else self.source.label}


def nearest_bits(bits: int, allowed: Sequence[int]) -> int:
    """The smallest allowed width at least ``bits`` (no precision is lost), else the largest."""
    up = [b for b in sorted(allowed) if b >= bits]
    return up[0] if up else max(allowed)


def whole_group_size(in_features: int, group_size: int) -> int:
    """The largest GPTQ group size not above ``group_size`` that divides ``in_features`` (-1 if none)."""
    fits = [g for g in GPTQ_GROUP_SIZES if g <= group_size and in_features % g == 0]
    return fits[0] if fits else -1


def _first(layers: Sequence[LayerExport], why: Mapping[str, str]) -> str:
    shown = "; ".join(f"{x.name} ({why[x.name]})" for x in layers[:3])
    return shown + (f"; and {len(layers) - 3} more" if len(layers) > 3 else "")


def decide(plan: Mapping[str, LayerSpec], shapes: Mapping[str, tuple[int, int]], groups: Sequence[Sequence[str]],
           target: ExportTarget, fix: bool) -> tuple[dict[str, LayerExport], list[str]]:
    """Per block linear (``shapes``: name -> (out, in), model order), what the export writes, and the
    notes of what ``fix`` changed. ``groups``: fused shards (full names). Refusals are one line."""
    out: dict[str, LayerExport] = {}
    why: dict[str, str] = {}
    for name, (_out_f, in_f) in shapes.items():
        spec = plan.get(name)
        if spec is None or spec.bits >= 16 or spec.format == "fp16":
            out[name] = LayerExport(name, spec, 16, -1, False)
            continue
        bits, gs, reasons = spec.bits, spec.group_size, []
        if spec.format != "gptq":
            reasons.append(f"{spec.format} {spec.bits}-bit is not a GPTQ layout")
        if bits not in target.bits:
            reasons.append(f"{spec.bits}-bit is not served by {target.name} ({'/'.join(map(str, target.bits))})")
        bits = nearest_bits(bits, target.bits)
        if target.whole_groups and gs != -1 and in_f % gs:
            reasons.append(f"group size {gs} does not divide {in_f} inputs")
            gs = whole_group_size(in_f, gs)
        out[name] = LayerExport(name, spec, bits, gs, spec.sym, "; ".join(reasons) or None)
        if reasons:
            why[name] = reasons[0]
    bad = [x for x in out.values() if x.requantize]
    if bad and not fix:
        raise BadInput(f"cannot export {len(bad)} layer(s) to GPTQ for {target.name} as they are: {_first(bad, why)}; "
                       "pass --fix to re-quantize them with RTN")
    notes = [f"{x.name}: {x.requantize} -> re-quantized with RTN to {x.bits}-bit g{x.group_size}" for x in bad]
    if target.fused_must_match:
        notes += _match_fused(out, groups, target, fix)
    return out, notes


def _key(x: LayerExport) -> tuple[int, int, bool]:
    return (16, -1, False) if x.kept else (x.bits, x.group_size, x.sym)


def _match_fused(out: dict[str, LayerExport], groups: Sequence[Sequence[str]], target: ExportTarget,
                 fix: bool) -> list[str]:
    """Fused shards must share bits, group size and symmetry: refuse the first group that does not, or
    (``fix``) raise the group to its most precise member, re-quantizing the others (in ``out``)."""
    notes = []
    for group in groups:
        members = [out[n] for n in group if n in out]
        if len({_key(x) for x in members}) <= 1:
            continue
        if not fix:
            desc = ", ".join(f"{x.name.rsplit('.', 1)[-1]} {'16-bit' if x.kept else f'w{x.bits} g{x.group_size}'}"
                             for x in members)
            raise BadInput(f"{target.name} fuses {'/'.join(n.rsplit('.', 1)[-1] for n in group)} but they differ in "
                           f"{members[0].name.rpartition('.')[0]}: {desc}; pass --fix to raise the group to its "
                           "highest precision")
        best = max(members, key=lambda x: (x.bits, -x.group_size if x.group_size > 0 else -10**9))
        for x in members:
            if _key(x) == _key(best):
                continue
            reason = f"fused with {best.name.rsplit('.', 1)[-1]} at {'16-bit' if best.kept else f'w{best.bits}'}"
            out[x.name] = replace(x, bits=best.bits, group_size=best.group_size, sym=best.sym,
                                  requantize=None if best.kept else reason)
            notes.append(f"{x.name}: {reason} -> " + ("kept 16-bit (dequantized)" if best.kept else
                                                       f"re-quantized with RTN to {best.bits}-bit g{best.group_size}"))
    return notes


def default_and_dynamic(layers: Mapping[str, LayerExport], act_order: Mapping[str, bool],
                        groups: Sequence[Sequence[str]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The default (most common bits/group size/sym among quantized layers; desc_act if any layer uses
    act-order) and GPTQModel ``dynamic`` overrides: ``+:`` for layers that differ, ``-:`` for 16-bit ones.
    Fused groups sharing an override get one key that also names the fused module (``qkv_proj``)."""
    quant = [x for x in layers.values() if not x.kept]
    if not quant:
        raise BadInput("nothing to export: every layer is 16-bit")
    keys = [_key(x) for x in quant]
    bits, gs, sym = max(dict.fromkeys(keys), key=keys.count)
    desc = any(act_order.values())
    default = {"bits": bits, "group_size": gs, "sym": sym, "desc_act": desc}

    def override(x: LayerExport) -> dict[str, Any] | None:
        if x.kept:
            return None
        d = {k: v for k, v in (("bits", x.bits), ("group_size", x.group_size), ("sym", x.sym),
                               ("desc_act", act_order.get(x.name, False))) if v != default[k]}
        return d

    dynamic: dict[str, dict[str, Any]] = {}
    done: set[str] = set()
    for group in groups:
        members = [layers[n] for n in group if n in layers]
        if len(members) > 1 and len({_key(x) for x in members}) == 1 and \
                len({str(override(x)) for x in members}) == 1 and (members[0].kept or override(members[0])):
            _add(dynamic, _group_regex([x.name for x in members]), override(members[0]))
            done.update(x.name for x in members)
    for x in layers.values():
        if x.name not in done and (x.kept or override(x)):
            _add(dynamic, "^" + re.escape(x.name) + "$", override(x))
    return default, dynamic


def _add(dynamic: dict[str, dict[str, Any]], regex: str, over: dict[str, Any] | None) -> None:
    if over is None:
        dynamic["-:" + regex] = {}
    else:
        dynamic["+:" + regex] = over


def _group_regex(names: Sequence[str]) -> str:
    """``^model\\.layers\\.0\\.self_attn\\.(?:q_proj|k_proj|v_proj|qkv_proj)$`` (the fused alias when known)."""
    parents = {n.rpartition(".")[0] for n in names}
    leaves = [n.rpartition(".")[2] for n in names]
    if len(parents) != 1:
        return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    alias = FUSED_ALIASES.get(tuple(leaves))
    alts = leaves + ([alias] if alias else [])
    return "^" + re.escape(parents.pop()) + r"\.(?:" + "|".join(alts) + ")$"


# ---- I/O: read the lwq checkpoint, write the GPTQ one -------------------------------------------

MAX_SHARD_BYTES = 2 * 1024**3
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


def meta_model(config: dict[str, Any]) -> Any:
    """The transformers model of ``config`` on the meta device (shapes and module names, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = d.pop("model_type", None)
    if not model_type:
        raise BadInput("checkpoint config.json has no model_type")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **d))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"cannot build a {model_type!r} model from the checkpoint config: "
                       f"{str(exc).splitlines()[0][:200]}") from None


def _layer_tensors(x: LayerExport, src: dict[str, torch.Tensor], shape: tuple[int, int],
                   conv1d: bool) -> dict[str, torch.Tensor]:
    """The output tensors of one block linear from its source tensors (both without the module prefix)."""
    from lwq.formats.layouts import get_layout

    spec = x.source
    if spec is None:
        return {"weight": src["weight"]}
    fmt = "fp16" if spec.bits >= 16 else spec.format
    layout = get_layout(fmt)
    if x.kept:
        w = src["weight"] if fmt == "fp16" else layout.dequantize(src, spec, shape).to(torch.float16)
        return {"weight": (w.t() if conv1d else w).contiguous()}
    if x.requantize is None and fmt == "gptq":
        return gptq_from_lwq(src, x.bits, shape[0], shape, spec.group_size)
    return gptq_requantized(layout.dequantize(src, spec, shape), x.bits, x.group_size, x.sym)


def export_gptq(source: str, output: str, target: str = "gptqmodel", fix: bool = False, force: bool = False,
                version: str = "0") -> dict[str, Any]:
    """Export the lwq checkpoint ``source`` to a GPTQ checkpoint in ``output`` (see module docstring);
    returns a JSON-able summary (default, dynamic, what happened to each layer, notes)."""
    import json
    import os
    import shutil
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lwq.formats.checkpoint import read_plan, verify_manifest
    from lwq.formats.pack import unpack
    from lwq.models.arch import arch_for, get_blocks, linear_shape
    from lwq.models.load import read_config

    tgt = TARGETS.get(target)
    src, out = Path(source).expanduser(), Path(output).expanduser().resolve()
    config = read_config(src)
    plan = read_plan(config)
    shard_files = verify_manifest(src)
    if out.exists() and not force:
        raise BadInput(f"output {output} already exists; pass --force to replace it")
    if out == src.resolve():
        raise BadInput("the output folder must differ from the checkpoint folder")
    model = meta_model(config)
    arch = arch_for(model)
    nblocks = len(get_blocks(model, arch))
    names = [f"{arch.blocks}.{i}.{lin}" for i in range(nblocks) for lin in arch.linears]
    unknown = sorted(set(plan) - set(names))
    if unknown:
        raise BadInput(f"the checkpoint plans {len(unknown)} layer(s) that are not block linears, e.g. {unknown[0]}")
    modules = {n: model.get_submodule(n) for n in names}
    shapes = {n: linear_shape(m) for n, m in modules.items()}
    groups = [[f"{arch.blocks}.{i}.{lin}" for lin in g] for i in range(nblocks) for g in arch.groups if len(g) > 1]
    layers, notes = decide(plan, shapes, groups, tgt, fix)

    handles = [safe_open(str(f), "pt") for f in shard_files]
    where = {k: h for h in handles for k in h.keys()}
    state: dict[str, torch.Tensor] = {}
    act_order: dict[str, bool] = {}
    wraps = 0
    by_layer: dict[str, list[str]] = {}
    for key in where:
        by_layer.setdefault(key.rpartition(".")[0], []).append(key)
    for name, x in layers.items():
        src_t = {k.rpartition(".")[2]: where[k].get_tensor(k) for k in by_layer.get(name, [])}
        if not src_t:
            raise BadInput(f"the checkpoint has no tensors for layer {name}")
        bias = src_t.pop("bias", None)
        conv1d = type(modules[name]).__name__ == "Conv1D"
        for leaf, t in _layer_tensors(x, src_t, shapes[name], conv1d).items():
            state[f"{name}.{leaf}"] = t
        if bias is not None:
            state[f"{name}.bias"] = bias
        if not x.kept:
            g = state[f"{name}.g_idx"].long()
            trivial = torch.arange(g.numel()) // (g.numel() if x.group_size == -1 else x.group_size)
            act_order[name] = not torch.equal(g, trivial)
            zeros = unpack(state[f"{name}.qzeros"], x.bits, shapes[name][0], dim=1)
            wraps += int((zeros == (1 << x.bits) - 1).sum()) if not x.sym else 0
    for key, h in where.items():
        if key.rpartition(".")[0] not in layers:
            state[key] = h.get_tensor(key)
    default, dynamic = default_and_dynamic(layers, act_order, groups)
    qconfig = gptq_quantization_config(default, dynamic, version)

    out_config = {k: v for k, v in config.items() if k != "quantization_config"}
    if tgt.half_dtype and (out_config.get("dtype") or out_config.get("torch_dtype")) in (None, "float32"):
        out_config["dtype"] = "float16"
        out_config.pop("torch_dtype", None)
        notes.append(f"config dtype set to float16 ({tgt.name}'s GPTQ kernels take fp16 activations)")
    out_config["quantization_config"] = qconfig
    if wraps:
        notes.append(f"{wraps} group zero point(s) are 0, stored as 2**bits - 1 (v1 minus one, wrapped): "
                     "loaders that do not wrap (zeros + 1) to bits read them wrong")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = _write_shards(state, tmp, save_file)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
        for fname in COPIED_FILES:
            if (src / fname).is_file():
                shutil.copyfile(src / fname, tmp / fname)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"source": str(src), "output": str(out), "format": "gptq", "target": tgt.name, "default": default,
            "dynamic": dynamic, "files": files, "bytes": sum((out / f).stat().st_size for f in files),
            "requantized": [n for n, x in layers.items() if x.requantize],
            "kept_16bit": [n for n, x in layers.items() if x.kept], "notes": notes,
            "layers": {n: x.to_dict() for n, x in layers.items()}}


def _write_shards(state: dict[str, torch.Tensor], folder: Any, save_file: Any,
                  max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json`` past ``max_bytes``."""
    import json

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        n = state[key].numel() * state[key].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key].contiguous()
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
