"""Export an lwq checkpoint as compressed-tensors ``pack-quantized`` (what llm-compressor writes;
vLLM serves it, transformers decompresses it on CPU).

Per quantized block linear: ``weight_packed`` int32 [out, ceil(in*bits/32)] (codes minus 2**(bits-1)
packed densely along the input dimension by the library's own ``pack_to_int32``), ``weight_scale``
[out, groups] (the stored fp16 scales), ``weight_shape`` [2] and, for asymmetric layers,
``weight_zero_point`` int32 [ceil(out*bits/32), groups] (zero points minus 2**(bits-1), packed along
the output dimension). The weight is ``(code - zero) * scale``, exactly lwq's grid. One
``config_groups`` entry per distinct scheme (bits, group size or channel, symmetry), its ``targets``
the exact module names; 16-bit block linears and ``lm_head`` are listed in ``ignore``.
The ``compressed-tensors`` package (``pip install 'lwq[serve]'``) builds the config and packs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from lwq.backends.base import QuantizedWeight
from lwq.errors import BadInput
from lwq.formats.decide import LayerExport, decide
from lwq.formats.export_io import Source, half_config, open_source, publish, write_shards
from lwq.formats.folder import copy_side_files
from lwq.formats.targets import TARGETS
from lwq.spec import LayerSpec

FORMAT = "compressed-tensors"


def require_library() -> Any:
    """The compressed-tensors package, or one line saying how to install it."""
    try:
        import compressed_tensors
    except ImportError:
        raise BadInput("--format compressed-tensors needs the compressed-tensors package: "
                       "pip install 'lwq[serve]'") from None
    return compressed_tensors


def split_groups(qw: QuantizedWeight, split: int) -> QuantizedWeight:
    """The same weight with groups of ``split`` columns (a divisor of the group size and of in_features):
    each original group's scale and zero repeated, so the dequantized weight is unchanged."""
    spec, (_, in_f) = qw.spec, qw.shape
    assert qw.scale is not None and qw.zero is not None
    owner = (torch.arange(in_f // split) * split) // spec.group_size
    return QuantizedWeight(spec, qw.q, qw.scale[:, owner].contiguous(), qw.zero[:, owner].contiguous(),
                           torch.arange(in_f, dtype=torch.int32) // split)


def grid_of(x: LayerExport, src: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> QuantizedWeight:
    """The integer grid written for one layer: the source's codes, or RTN from its dequantized weight."""
    from lwq.backends.rtn import rtn_quantize
    from lwq.formats.layouts import get_layout

    spec = x.source
    if x.requantize is None and spec is not None:
        qw = get_layout(spec.format).codes(dict(src), spec, shape)
        if qw is None or spec.act_order:
            raise BadInput(f"{x.name}: {spec.format} {spec.label} has no plain weight grid; pass --fix")
        return split_groups(qw, x.split) if x.split else qw
    w = src["weight"].float() if spec is None or spec.format == "fp16" else \
        get_layout(spec.format).dequantize(dict(src), spec, shape)
    return rtn_quantize(w.float(), LayerSpec(bits=x.bits, group_size=x.group_size, sym=x.sym, format="gptq"))


def ct_tensors(qw: QuantizedWeight, bits: int, sym: bool) -> dict[str, torch.Tensor]:
    """``weight_packed``, ``weight_scale`` (fp16, as lwq stores them: exact), ``weight_shape``
    (+ ``weight_zero_point`` when asymmetric)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    assert qw.q is not None and qw.scale is not None and qw.zero is not None
    mid = 1 << (bits - 1)
    t = {"weight_packed": pack_to_int32((qw.q.to(torch.int32) - mid).to(torch.int8), bits),
         "weight_scale": qw.scale.to(torch.float16).contiguous(),
         "weight_shape": torch.tensor(list(qw.shape), dtype=torch.int64)}
    if not sym:
        t["weight_zero_point"] = pack_to_int32((qw.zero.to(torch.int32) - mid).to(torch.int8), bits, packed_dim=0)
    return t


def ct_config(layers: Mapping[str, LayerExport]) -> dict[str, Any]:
    """``quantization_config``: one ``config_groups`` entry per scheme, built by the library."""
    ct = require_library()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    schemes: dict[tuple[int, int, bool], list[str]] = {}
    for x in layers.values():
        if not x.kept:
            schemes.setdefault(x.key, []).append(x.name)
    if not schemes:
        raise BadInput("nothing to export: every layer is 16-bit")
    groups = {}
    for i, ((bits, gs, sym), names) in enumerate(sorted(schemes.items(), key=lambda kv: -len(kv[1]))):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, dynamic=False,
                                strategy="channel" if gs == -1 else "group", group_size=None if gs == -1 else gs)
        groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=args)
    ignore = [n for n, x in layers.items() if x.kept] + ["lm_head"]
    cfg = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                             ignore=ignore).model_dump()
    return {**cfg, "quant_method": "compressed-tensors", "version": ct.__version__}


def export_compressed_tensors(source: str | Source, output: Path, target: str = "transformers", fix: bool = False,
                              version: str = "0") -> dict[str, Any]:
    """Export ``source`` to ``output`` (already checked by ``lwq.fileio.check_output``); returns a JSON-able
    summary: schemes, what happened to each layer, notes."""
    require_library()
    src = open_source(source) if isinstance(source, str) else source
    tgt = TARGETS.get(target)
    if src.conv1d:
        raise BadInput(f"compressed-tensors compresses nn.Linear only; this model's block linears are Conv1D "
                       f"(e.g. {sorted(src.conv1d)[0]}); export --format gptq instead")
    layers, notes = decide(src.plan, src.shapes, src.groups, tgt, FORMAT, fix)
    config = half_config(src.config, notes, f"{tgt.name} computes in 16-bit") if tgt.half_dtype else \
        {k: v for k, v in src.config.items() if k != "quantization_config"}
    tensors = src.tensors()
    state: dict[str, torch.Tensor] = {}
    for name, x in layers.items():
        t = tensors.layer(name)
        bias = t.pop("bias", None)
        if x.kept:
            w = t["weight"] if x.source is None or x.source.format == "fp16" else \
                _dequantized(x.source, t, src.shapes[name])
            state[f"{name}.weight"] = w.to(torch.float16 if tgt.half_dtype else w.dtype)
        else:
            for leaf, v in ct_tensors(grid_of(x, t, src.shapes[name]), x.bits, x.sym).items():
                state[f"{name}.{leaf}"] = v
        if bias is not None:
            state[f"{name}.bias"] = bias
    for key, v in tensors.others(set(layers)):
        state[key] = v
    qconfig = ct_config(layers)
    config["quantization_config"] = qconfig

    def write(folder: Path) -> None:
        write_shards(state, folder)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(src.path, folder)

    files = publish(output, write, {"kind": "export", "format": FORMAT, "target": tgt.name, "lwq": version,
                                    "source": str(src.path)})
    schemes = [{"targets": len(g["targets"]), **{k: g["weights"][k] for k in ("num_bits", "group_size",
                                                                                 "symmetric", "strategy")}}
               for g in qconfig["config_groups"].values()]
    return {"source": str(src.path), "output": str(output), "format": FORMAT, "target": tgt.name,
            "schemes": schemes, "ignore": qconfig["ignore"], "files": files,
            "bytes": sum((output / f).stat().st_size for f in files if f.endswith(".safetensors")),
            "requantized": [n for n, x in layers.items() if x.requantize],
            "kept_16bit": [n for n, x in layers.items() if x.kept], "notes": notes,
            "layers": {n: x.to_dict() for n, x in layers.items()}}


def _dequantized(spec: LayerSpec, t: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    from lwq.formats.layouts import get_layout

    return get_layout(spec.format).dequantize(dict(t), spec, shape)
