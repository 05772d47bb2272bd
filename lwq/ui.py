"""Rich consoles and progress bars. Logs and progress go to stderr; results go to stdout."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def out_console() -> Console:
    """Console for results (tables) on stdout."""
    return Console()


def err_console(quiet: bool = False) -> Console:
    """Console for logs and progress on stderr; silent when ``quiet`` or ``LWQ_QUIET`` is set."""
    return Console(stderr=True, quiet=quiet or bool(os.environ.get("LWQ_QUIET")))


@contextmanager
def progress(quiet: bool = False) -> Iterator[Progress]:
    """A rich progress bar on stderr (hidden when quiet or when stderr is not a terminal)."""
    console = err_console(quiet)
    prog = Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )
    with prog:
        yield prog
