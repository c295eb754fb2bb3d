"""User-facing errors: one line on stderr and a non-zero exit, never a traceback.

A stage raises `UserError` for anything the user can fix (a typo in params.yaml, a
corrupt archive, missing credentials). Anything else is a bug and keeps its traceback.
The same wrapper sets up what the user sees of the modules' logging: their notices on
stderr, at the level HMNIST_LOG_LEVEL names.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line."""


def first_line(e: BaseException, empty: str = "no details") -> str:
    """The first line of an exception's message, at most 200 characters: what fits in a
    one-line error. `empty` stands in for an exception that says nothing."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else empty


# The range of every seed (params.yaml's and the commands' --seed): numpy's legacy RandomState,
# which scikit-learn seeds with, takes no more; -1 or 2**64 would fail inside numpy or torch.
MAX_SEED = 2**32 - 1


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum` (and at most `maximum`), or
    argparse's one-line usage error."""
    import argparse

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if maximum is not None and not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be between {minimum} and {maximum}, got {value}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return whole_number


def description(doc: str | None, fallback: str = "") -> str:
    """A module docstring's first paragraph on one line: a command's `--help` description. Its
    first line alone stops mid-sentence wherever the sentence wraps."""
    paragraph = (doc or fallback).strip().split("\n\n")[0]
    return " ".join(paragraph.split())


LOG_LEVEL = "HMNIST_LOG_LEVEL"  # DEBUG, INFO (the default: progress and notices), WARNING, ERROR
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class CurrentStderr(logging.StreamHandler):
    """Writes each record to sys.stderr as it is when the record comes, not as it was when the
    handler was made: pytest's capsys and capfd, and contextlib.redirect_stderr, replace
    sys.stderr after the handler exists, and one holding the old stream would write past them.
    Open progress bars step aside while it writes, as `tqdm.write` makes them do."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))  # the plain lines print() wrote before

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        self.stream = sys.stderr
        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


def configure_logging() -> None:
    """Show the `hmnist` loggers' records on stderr at HMNIST_LOG_LEVEL (default INFO). Safe to
    call again (a test or a command may run main() twice in one process): one handler, never two."""
    name = os.environ.get(LOG_LEVEL, "INFO").strip().upper()
    if name not in LEVELS:
        raise UserError(f"{LOG_LEVEL} must be one of {', '.join(LEVELS)}, got {os.environ[LOG_LEVEL]!r}")
    logger = logging.getLogger("hmnist")
    logger.setLevel(name)
    if not any(isinstance(h, CurrentStderr) for h in logger.handlers):
        logger.addHandler(CurrentStderr())
    # this handler is the output; a handler the root logger may have (torch's, a user's) would repeat it
    logger.propagate = False


def cli(main: Callable[..., object]) -> Callable[..., object]:
    """Wrap a stage's main(): UserError -> `error: ...` and exit 2; Ctrl-C -> exit 130; the
    modules' notices on stderr (configure_logging)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            configure_logging()
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper
