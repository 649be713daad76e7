"""Helpers of the coverage and latency benchmarks: BENCHMARKS.md sections, the reproducing command, the machine."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["ROOT", "write_section", "command_line", "git_commit", "machine"]

ROOT = Path(__file__).resolve().parents[1]


def write_section(path: Path, name: str, body: str, *, title: str | None = None) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``, leaving every other
    section alone; a missing file or section is created (the section appended at the end, under ``title``)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + (f"## {title}\n\n" if title else "") + block + "\n"
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def command_line(script: str, args: Sequence[str]) -> str:
    """The command that reproduces a table, as typed from the repository root."""
    return " ".join(["python", f"benchmarks/{script}", *(shlex.quote(a) for a in args)])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, python {sys.version.split()[0]}"
