"""``lwq info``: architecture, blocks, linears, parameters and the size at 16/8/4/3/2 bits."""
from __future__ import annotations

from typing import Any

import typer

from lwq.commands.common import JSON_OPT, TRUST_OPT, emit_json, fmt_bytes
from lwq.ui import out_console


def model_info(model: Any, group_size: int = 128, itemsize: int = 2) -> dict[str, Any]:
    """Facts about a loaded model, with exact sizes under uniform GPTQ-layout quantization (what is not
    quantized stored ``itemsize`` bytes an element: the source's dtype)."""
    from lwq.formats.bytes import layer_bytes
    from lwq.models.arch import arch_for, get_blocks, linear_names, linear_shape
    from lwq.spec import LayerSpec

    spec = arch_for(model)
    names = linear_names(model, spec)
    shapes = [linear_shape(model.get_submodule(n)) for n in names]
    num_params = sum(p.numel() for p in model.parameters())
    quantizable = sum(o * i for o, i in shapes)
    rest_bytes = itemsize * (num_params - quantizable)
    sizes = {}
    for bits in (16, 8, 4, 3, 2):
        s = LayerSpec(bits=bits, group_size=group_size)
        q = sum(layer_bytes(o, i, s) for o, i in shapes)
        sizes[str(bits)] = {"bytes": q + rest_bytes, "bits_per_weight": 8 * q / quantizable}
    return {
        "model_type": getattr(model.config, "model_type", None), "arch": spec.name, "arch_note": spec.why_generic or None,
        "num_blocks": len(get_blocks(model, spec)), "num_params": num_params,
        "quantizable_params": quantizable, "num_linears": len(names), "linear_layers": names,
        "group_size": group_size, "sizes": sizes,
    }


def _model(model: str, trust_remote_code: bool) -> Any:
    """The model to describe: loaded, or for an lwq checkpoint (verified against its manifest) its
    architecture on the meta device (the original shapes; what the plan made of them is in
    config.json's quantization_config and ``lwq report``)."""
    from lwq.models.load import is_lwq_checkpoint, looks_local, read_config
    from lwq.pipeline.load import load_model

    if looks_local(model) and is_lwq_checkpoint(model):
        from lwq.formats.checkpoint import verify_manifest
        from lwq.formats.folder import model_from_config

        verify_manifest(model)
        return model_from_config(read_config(model), meta=True)
    return load_model(model, "float32", "cpu", trust_remote_code)


def info_command(
    model: str = typer.Argument(..., help="Model folder or hub id."),
    group_size: int = typer.Option(128, "--group-size", help="Group size for the size estimates."),
    trust_remote_code: bool = TRUST_OPT, json_out: bool = JSON_OPT,
) -> None:
    """Architecture, decoder blocks, linears, parameter count and size at 16/8/4/3/2 bits."""
    from rich.table import Table
    from lwq.spec import LayerSpec

    LayerSpec(group_size=group_size)  # validates the group size with a clear error
    from lwq.models.load import source_dtype

    loaded = _model(model, trust_remote_code)
    doc = {"model": model, **model_info(loaded, group_size, source_dtype(model, trust_remote_code).itemsize)}
    if json_out:
        emit_json(doc)
        return
    con = out_console()
    con.print(f"[bold]{model}[/]: {doc['arch']} ({doc['model_type']}), {doc['num_blocks']} blocks, "
              f"{doc['num_linears']} quantizable linears, {doc['num_params']:,} parameters "
              f"({doc['quantizable_params']:,} in block linears)")
    if doc["arch_note"]:
        con.print(f"generic layout: {doc['arch_note']}")
    table = Table(title=f"size when block linears are quantized (GPTQ layout, group {group_size}; "
                        "embeddings and head in 16-bit)")
    table.add_column("bits", justify="right")
    table.add_column("bits/weight (real)", justify="right")
    table.add_column("checkpoint size", justify="right")
    for bits, s in doc["sizes"].items():
        table.add_row(bits, f"{s['bits_per_weight']:.3f}", fmt_bytes(s["bytes"]))
    con.print(table)


def register(app: typer.Typer) -> None:
    app.command("info")(info_command)
