"""The ``lwq`` command line: a Typer app whose commands live in ``lwq.commands``.

Errors become one line on stderr starting with ``error:`` and an exit code: 0 success, 2 bad
arguments or input, 1 other failure, 130 interrupted. ``--debug`` (anywhere on the line, or
``LWQ_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import os
import sys
import warnings

import click
import typer

try:  # typer >= 0.26 vendors its own click; older ones use click's exceptions
    from typer.exceptions import Abort as _TAbort, Exit as _TExit, TyperException as _TUsage
except ImportError:  # pragma: no cover - depends on the installed typer
    _TAbort, _TExit, _TUsage = click.exceptions.Abort, click.exceptions.Exit, click.exceptions.ClickException

from lwq.spec import __version__
from lwq.commands import register_all
from lwq.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, LwqError

app = typer.Typer(
    name="lwq", help="Layer-wise mixed-precision quantization of LLMs.", no_args_is_help=True,
    pretty_exceptions_enable=False, add_completion=True, rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lwq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors (also accepted after a command)."),
) -> None:
    """lwq: calibrate, score, allocate bits under a budget, quantize, pack and evaluate LLMs."""


register_all(app)


def _fail(message: str, code: int) -> int:
    first = " ".join(str(message).split()) or "failed"
    sys.stderr.write(f"error: {first}\n")
    return code


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code (never raises unless ``--debug``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LWQ_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    _prepare_environment()
    bad = next((a for a in args if not _utf8(a)), None)
    if bad is not None:  # safetensors, tokenizers and JSON take UTF-8 paths only
        return _fail(f"argument {ascii(bad)} is not valid UTF-8 (a path with undecodable bytes?); "
                     "rename it or pass a UTF-8 path", EXIT_BAD_INPUT)
    with warnings.catch_warnings(record=True) as caught:  # libraries' warnings never precede an error line
        warnings.simplefilter("default")
        code = _dispatch(args, debug)
    if code == 0:
        for w in caught:
            if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                sys.stderr.write(f"warning: {' '.join(str(w.message).split())[:300]}\n")
    return code


def _dispatch(args: list[str], debug: bool) -> int:
    try:
        rv = app(args=args, prog_name="lwq", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except (click.exceptions.Exit, _TExit) as exc:
        return exc.exit_code
    except (click.exceptions.ClickException, _TUsage) as exc:  # usage errors, bad option values
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `lwq`: help was printed
            return 0
        return _fail(exc.format_message(), EXIT_BAD_INPUT if exc.exit_code in (1, 2) else exc.exit_code)
    except (click.exceptions.Abort, _TAbort, KeyboardInterrupt):
        sys.stderr.write("error: interrupted\n")
        return EXIT_INTERRUPTED
    except LwqError as exc:
        if debug:
            raise
        return _fail(str(exc), exc.exit_code)
    except Exception as exc:  # the last line of defence: one line, exit 1, traceback with --debug
        if debug:
            raise
        return _fail(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)", EXIT_FAILURE)


def _utf8(arg: str) -> bool:
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _prepare_environment() -> None:
    """Keep third-party progress bars and advice off our stderr (rich bars are ours); let cuBLAS
    be deterministic (it reads ``CUBLAS_WORKSPACE_CONFIG`` once, when its first handle is made, which
    planning may do before quantizing asks for determinism; a value the user set is kept).
    transformers reads its settings from the environment when it is first imported (commands import
    it only when they need it: ``--help`` and ``--version`` never do); if it is already loaded, it
    is told directly."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
