"""Shared plumbing for the typer commands: user-error handling, console, lazy heavy imports.

Command modules import only typer and the standard library at module level; torch, onnx and onnxruntime are
imported inside command bodies so that ``anpyc --help`` stays instant.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

import typer

__all__ = ["user_errors", "fail", "console", "err_console", "is_tty", "parse_value", "parse_assignments",
           "read_config_file", "flatten", "is_number", "printable"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """``text`` with control characters (terminal escape codes, newlines, bells) written as ``\\xNN``: a task,
    class or file name read from a file must not reach the terminal raw (rich passes ESC through)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


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


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool, not None, not NaN): a value a table or plot can show."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------------------------ config input

def parse_value(text: str) -> Any:
    """A command-line value as a TOML/JSON literal (``3``, ``0.01``, ``true``, ``[1, 2]``, ``"x"``); else the text."""
    import json

    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignments(items: list[str] | None, option: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings (repeatable options such as ``--set optim.lr=0.01``) as a dict of parsed values."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        out[key.strip()] = parse_value(value)
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file as a dict: TOML (``tomllib``), YAML (pyyaml) or JSON, chosen by the extension."""
    import json

    from anpyc.errors import ConfigError

    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path} ({e})", "pass a readable UTF-8 .toml/.yaml/.json file")
    try:
        if suffix == ".toml":
            import tomllib

            doc = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        elif suffix == ".json":
            doc = json.loads(text)
        else:
            raise ConfigError(f"config file {path} has an unknown extension {path.suffix!r}",
                              "use .toml, .yaml/.yml or .json")
    except ConfigError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError
        detail = " ".join(str(e).split())
        raise ConfigError(f"config file {path} is not valid {suffix[1:].upper()}: {detail}",
                          "fix the syntax at the position given") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a table/mapping at the top, not {type(doc).__name__}",
                          "write key = value lines (TOML) or key: value lines (YAML)")
    return doc


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys: ``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
