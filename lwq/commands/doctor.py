"""``lwq doctor``: what this installation can do, and for each missing piece, why."""
from __future__ import annotations

import importlib
import importlib.util
import platform
from typing import Any

import typer

from lwq.commands.common import JSON_OPT, emit_json
from lwq.ui import out_console

# display name -> import name
PACKAGES = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors", "datasets": "datasets",
            "triton": "triton", "bitsandbytes": "bitsandbytes", "lm-eval": "lm_eval", "highspy": "highspy",
            "compressed-tensors": "compressed_tensors"}
EXTRAS = {"triton": "lwq[triton]", "bitsandbytes": "lwq[bnb]", "lm-eval": "lwq[lm-eval]", "highspy": "lwq[ilp]",
          "compressed-tensors": "lwq[serve]"}


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def package_status(module: str) -> dict[str, Any]:
    """``{"version", "error"}``: the version when ``module`` imports, else None and the import error."""
    from importlib import metadata

    try:
        mod = importlib.import_module(module)
    except (ImportError, OSError, RuntimeError) as exc:
        return {"version": None, "error": _one_line(exc)}
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            version = metadata.version(module.replace("_", "-"))
        except metadata.PackageNotFoundError:
            version = "unknown"
    return {"version": str(version), "error": None}


def cuda_status() -> dict[str, Any]:
    """CUDA availability, the torch build's CUDA version, and each device's name and compute capability."""
    import torch

    built = torch.version.cuda
    if not torch.cuda.is_available():
        why = "torch is built without CUDA (a CPU wheel)" if built is None else "no CUDA device is visible (driver or CUDA_VISIBLE_DEVICES)"
        return {"available": False, "torch_cuda": built, "devices": [], "reason": why}
    devices = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        devices.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"})
    return {"available": True, "torch_cuda": built, "devices": devices, "reason": None}


def backend_status() -> list[dict[str, Any]]:
    from lwq.backends import BACKENDS, bnb_status

    bnb = bnb_status()  # the one optional package a backend needs today
    return [{"name": n, "available": not (b.package and bnb), "reason": bnb if b.package else None}
            for n, b in BACKENDS.items()]


def kernel_rows() -> list[dict[str, Any]]:
    """``lwq.kernels.kernel_status()`` as rows (``reason`` says what a usable kernel covers)."""
    from lwq.kernels import kernel_status

    return [{"name": n, "available": ok, "reason": why} for n, ok, why in kernel_status()]


def solver_status() -> list[dict[str, Any]]:
    from lwq.allocate import SOLVERS

    rows = []
    for name, solver in SOLVERS.items():
        need = solver.package
        missing = need is not None and importlib.util.find_spec(need) is None
        rows.append({"name": name, "available": not missing,
                     "reason": f"needs {need}: pip install {need} (or lwq[ilp])" if missing else None})
    return rows


def transformers_status() -> dict[str, Any]:
    """Whether ``AutoModelForCausalLM.from_pretrained`` can load lwq checkpoints (lwq's quantizer registers)."""
    from lwq.formats.hf_register import register

    try:
        register()
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        return {"from_pretrained": False, "reason": _one_line(exc)}
    return {"from_pretrained": True, "reason": None}


def target_rows() -> list[dict[str, Any]]:
    """Each serving target and, per export format it reads, what it accepts (``lwq.formats.targets``)."""
    from lwq.formats.targets import TARGETS

    return [{"name": name, "about": t.about, "fused_must_match": t.fused_must_match, "half_dtype": t.half_dtype,
             "formats": [{"format": r.format, "bits": list(r.bits), "zero_points": r.asym,
                          "group_sizes": None if r.group_sizes is None else list(r.group_sizes),
                          "whole_groups": r.whole_groups, "one_scheme": r.uniform, "act_order": r.act_order}
                         for r in t.rules]} for name, t in TARGETS.items()]


def doctor_report() -> dict[str, Any]:
    """The JSON document of ``lwq doctor --json``."""
    from lwq.spec import __version__

    backends = backend_status()  # first: it keeps bitsandbytes' import-time advice off stderr
    packages = {name: package_status(mod) for name, mod in PACKAGES.items()}
    for name, extra in EXTRAS.items():
        if packages[name]["error"] and "No module named" in packages[name]["error"]:
            packages[name]["error"] += f" (pip install '{extra}')"
    return {"lwq": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "packages": packages, "cuda": cuda_status(), "backends": backends, "kernels": kernel_rows(),
            "solvers": solver_status(), "transformers_integration": transformers_status(), "targets": target_rows()}


def doctor_command(json_out: bool = JSON_OPT) -> None:
    """Versions, CUDA device and capability, and which backends, kernels and solvers work here (and why not)."""
    from rich.markup import escape
    from rich.table import Table

    from lwq.spec import __version__

    if json_out:
        emit_json(doctor_report())
        return
    console = out_console()  # the first line needs no torch: it is out before the checks import anything
    console.print(f"lwq {__version__} on Python {platform.python_version()} ({platform.platform()})", highlight=False)
    report = doctor_report()
    pk = Table(title="packages")
    for col in ("package", "version", "note"):
        pk.add_column(col)
    for name, p in report["packages"].items():
        pk.add_row(name, escape(p["version"]) if p["version"] else "[red]missing[/]", escape(p["error"] or ""))
    console.print(pk)
    cuda = report["cuda"]
    if cuda["available"]:
        for d in cuda["devices"]:
            console.print(f"CUDA {cuda['torch_cuda']}: cuda:{d['index']} {d['name']} (compute capability {d['capability']})",
                          highlight=False)
    else:
        console.print(f"CUDA: not available ({cuda['reason']})", highlight=False)
    for title in ("backends", "kernels", "solvers"):
        t = Table(title=title)
        for col in ("name", "available", "why / what"):
            t.add_column(col)
        for r in report[title]:
            t.add_row(r["name"], "[green]yes[/]" if r["available"] else "[red]no[/]", escape(r["reason"] or ""))
        console.print(t)
    t = Table(title="serving targets (lwq plan/quantize/export --target)")
    for col in ("target", "format", "bits", "zero points", "groups", "notes"):
        t.add_column(col)
    for row in report["targets"]:
        for r in row["formats"]:
            notes = ", ".join(n for n, on in (("whole groups", r["whole_groups"]), ("one scheme", r["one_scheme"]),
                                              ("act-order", r["act_order"]), ("fused shards tied", row["fused_must_match"]))
                              if on)
            t.add_row(row["name"], r["format"], "/".join(map(str, r["bits"])), "yes" if r["zero_points"] else "no",
                      "any" if r["group_sizes"] is None else "/".join(map(str, r["group_sizes"])), notes)
    console.print(t)
    hf = report["transformers_integration"]
    console.print("transformers from_pretrained of lwq checkpoints: " +
                  ("yes" if hf["from_pretrained"] else f"no ({hf['reason']})"), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_command)
