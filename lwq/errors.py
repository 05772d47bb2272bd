"""Errors that the CLI turns into one line on stderr and an exit code.

Exit codes (documented in the README): 0 success, 2 bad arguments or input,
1 other failure, 130 interrupted.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class LwqError(Exception):
    """An expected failure with a one-line message and an exit code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class BadInput(LwqError):
    """The user's arguments or input files are wrong (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class GateFailed(LwqError):
    """A quality gate (``--max-ppl`` and friends) was exceeded (exit 1)."""

    exit_code = EXIT_FAILURE


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """A library's (often multi-line) message as one line of at most ``limit`` characters, cut at a word."""
    text = " ".join(str(exc).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."
