"""User-facing errors: one line on stderr and a non-zero exit, never a traceback.

A stage raises `UserError` for anything the user can fix (a typo in params.yaml, a
corrupt archive, missing credentials). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
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


def cli(main: Callable[..., object]) -> Callable[..., object]:
    """Wrap a stage's main(): UserError -> `error: ...` and exit 2; Ctrl-C -> exit 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper
