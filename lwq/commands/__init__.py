"""CLI commands, one module each; ``register_all`` adds them to the Typer app."""
from __future__ import annotations

import importlib

import typer

COMMAND_MODULES = ("eval_cmd", "info", "demo", "quantize", "calibrate", "score", "export", "doctor", "report")


def register_all(app: typer.Typer) -> None:
    """Import each command module and let it add its command(s) to ``app``."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"lwq.commands.{name}").register(app)
