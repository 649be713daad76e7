"""Shared plumbing for the typer commands: user-error handling, console, lazy heavy imports.

Command modules import only typer and the standard library at module level; torch, onnx and onnxruntime are
imported inside command bodies so that ``anpyc --help`` stays instant.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import typer

__all__ = ["user_errors", "fail", "console", "err_console"]


def fail(problem: str, fix: str) -> "typer.Exit":
    """Print a one-line user error (problem and fix) and return the Exit to raise (code 2)."""
    typer.echo(f"error: {problem} ({fix})", err=True)
    return typer.Exit(code=2)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`anpyc.errors.AnpycError` (bad input) into a one-line message and exit code 2.

    Any other exception is a bug in anpyc and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from anpyc.errors import AnpycError

        try:
            return fn(*args, **kwargs)
        except AnpycError as e:
            typer.echo(f"error: {e.one_line}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: the run directory holds the last completed step; resume with --resume", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def console():
    from rich.console import Console

    return Console()


def err_console():
    from rich.console import Console

    return Console(stderr=True)


def is_tty() -> bool:
    return sys.stdout.isatty()
