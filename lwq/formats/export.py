"""Export an lwq checkpoint as a GPTQ checkpoint (GPTQModel, transformers, vLLM's Marlin path).

The mixed plan becomes GPTQModel's per-module ``dynamic`` overrides: the most common (bits, group
size, sym) is the default, ``+:`` regex keys give the layers that differ (fused groups also name
the fused module, ``qkv_proj``, as vLLM matches on it), ``-:`` keys skip the layers kept in 16-bit.
Tensors: ``qweight`` int32 [ceil(in*bits/32), out] (codes packed along the input dimension),
``qzeros`` int32 [groups, ceil(out*bits/32)], ``scales`` fp16 [groups, out], ``g_idx`` int32 [in].

Zero points: a symmetric export is GPTQ v1 (``checkpoint_format: gptq``, zeros stored minus one,
what every reader takes); an asymmetric one is ``gptq_v2`` (zeros stored as they are, which is how
lwq holds them): GPTQModel refuses asymmetric v1 checkpoints not made by itself, and v1's minus
one wraps a zero point of 0 to ``2**bits - 1``. transformers reads both.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from lwq.errors import BadInput
from lwq.formats.decide import LayerExport, decide
from lwq.formats.export_io import Source, half_config, open_source, publish, write_shards
from lwq.formats.folder import copy_side_files
from lwq.formats.gptq_v1 import gptq_from_lwq, gptq_quantization_config, gptq_requantized
from lwq.formats.targets import TARGETS

# the names serving engines give fused shards (vLLM's packed_modules_mapping)
FUSED_ALIASES = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


def default_and_dynamic(layers: Mapping[str, LayerExport], act_order: Mapping[str, bool],
                        groups: Sequence[Sequence[str]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The default (most common bits/group size/sym among quantized layers; desc_act if any layer uses
    act-order) and GPTQModel ``dynamic`` overrides: ``+:`` for layers that differ, ``-:`` for 16-bit ones.
    Fused groups sharing an override get one key that also names the fused module (``qkv_proj``)."""
    quant = [x for x in layers.values() if not x.kept]
    if not quant:
        raise BadInput("nothing to export: every layer is 16-bit")
    keys = [x.key for x in quant]
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
        if len(members) > 1 and len({x.key for x in members}) == 1 and \
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


def _layer_tensors(x: LayerExport, src: dict[str, torch.Tensor], shape: tuple[int, int],
                   conv1d: bool, v2: bool) -> dict[str, torch.Tensor]:
    """The output tensors of one block linear from its source tensors (both without the module prefix).
    A layer outside the plan holds its original ``.weight`` (transposed for GPT-2's Conv1D); planned
    16-bit and quantized layers are stored (out, in)."""
    from lwq.formats.layouts import get_layout

    spec = x.source
    if spec is None and x.kept:
        return {"weight": src["weight"]}
    if x.requantize is None and not x.kept and spec is not None and spec.format == "gptq":
        return gptq_from_lwq(src, x.bits, shape[0], shape, spec.group_size, v2)
    if spec is None:
        w = src["weight"].float().t() if conv1d else src["weight"].float()
    else:
        w = src["weight"].float() if spec.format == "fp16" else get_layout(spec.format).dequantize(src, spec, shape)
    if x.kept:
        w = w.to(torch.float16)
        return {"weight": (w.t() if conv1d else w).contiguous()}
    return gptq_requantized(w, x.bits, x.group_size, x.sym, v2)


def export_gptq(source: str | Source, output: Path, target: str = "gptqmodel", fix: bool = False,
                version: str = "0") -> dict[str, Any]:
    """Export ``source`` to ``output`` (already checked by ``lwq.fileio.check_output``) as GPTQ (module
    docstring); returns a JSON-able summary (default, dynamic, what happened to each layer, notes)."""
    tgt = TARGETS.get(target)
    src = open_source(source) if isinstance(source, str) else source
    layers, notes = decide(src.plan, src.shapes, src.groups, tgt, "gptq", fix)
    v2 = any(not x.kept and not x.sym for x in layers.values())
    tensors = src.tensors()
    state: dict[str, torch.Tensor] = {}
    act_order: dict[str, bool] = {}
    for name, x in layers.items():
        src_t = tensors.layer(name)
        bias = src_t.pop("bias", None)
        for leaf, t in _layer_tensors(x, src_t, src.shapes[name], name in src.conv1d, v2).items():
            state[f"{name}.{leaf}"] = t
        if bias is not None:
            state[f"{name}.bias"] = bias
        if not x.kept:
            g = state[f"{name}.g_idx"].long()
            trivial = torch.arange(g.numel()) // (g.numel() if x.group_size == -1 else x.group_size)
            act_order[name] = not torch.equal(g, trivial)
    for key, t in tensors.others(set(layers)):
        state[key] = t
    default, dynamic = default_and_dynamic(layers, act_order, src.groups)
    qconfig = gptq_quantization_config(default, dynamic, version, "gptq_v2" if v2 else "gptq")
    config = half_config(src.config, notes, f"{tgt.name}'s GPTQ kernels take 16-bit activations") \
        if tgt.half_dtype else {k: v for k, v in src.config.items() if k != "quantization_config"}
    config["quantization_config"] = qconfig

    def write(folder: Path) -> None:
        import json

        write_shards(state, folder)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
        copy_side_files(src.path, folder)

    files = publish(output, write, {"kind": "export", "format": "gptq", "target": tgt.name, "lwq": version,
                                    "source": str(src.path)})
    return {"source": str(src.path), "output": str(output), "format": "gptq", "target": tgt.name,
            "checkpoint_format": qconfig["checkpoint_format"], "default": default, "dynamic": dynamic,
            "files": files, "bytes": sum((output / f).stat().st_size for f in files if f.endswith(".safetensors")),
            "requantized": [n for n, x in layers.items() if x.requantize],
            "kept_16bit": [n for n, x in layers.items() if x.kept], "notes": notes,
            "layers": {n: x.to_dict() for n, x in layers.items()}}
