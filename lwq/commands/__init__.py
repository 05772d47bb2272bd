"""CLI commands, one module each; ``register_all`` adds them to the Typer app."""
from __future__ import annotations

import importlib

import typer

COMMAND_MODULES = ("info", "calibrate", "score", "plan", "quantize", "eval_cmd", "export", "report", "doctor", "demo")


def register_all(app: typer.Typer) -> None:
    """Import each command module and let it add its command(s) to ``app``."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"lwq.commands.{name}").register(app)
