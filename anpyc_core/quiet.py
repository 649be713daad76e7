"""Library chatter to a log file: what torch.onnx, onnxscript, onnx_ir, onnxruntime and friends print while anpyc
works is kept out of anpyc's own output.

``with library_output(path):`` sends, for its duration, everything the libraries say to ``path`` (appended):

* Python logging: every handler that writes to a stream is pointed at the file, and records that would reach
  logging's last-resort handler (the one that prints "Skipping constant folding for op Split with multiple
  outputs." for onnxscript's optimiser) go to a file handler on the root logger;
* warnings (``warnings.warn``): ``warnings.showwarning`` writes to the file;
* ``print``: ``sys.stdout``/``sys.stderr`` are the file;
* C and C++ output (onnxruntime, torch's native warnings): file descriptors 1 and 2 are the file.

anpyc's own messages are printed after the block, or through the handles it yields (``out.stdout``), which still
reach the terminal. ``verbose=True`` leaves everything where it was (the libraries print as usual) and still logs
the Python logging records to ``path``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

__all__ = ["library_output", "Captured", "LOG_NAME"]

LOG_NAME = "export.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class Captured:
    """What :func:`library_output` yields: the log file, and the terminal's streams for anpyc's own output."""

    path: Path
    stdout: IO[str]
    stderr: IO[str]


def _terminal_handlers(streams: tuple) -> list[logging.StreamHandler]:
    """Every logging handler, on any logger that exists now, that writes to the terminal (one of ``streams`` or
    file descriptor 1 or 2); handlers with files of their own are left alone."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger)]
    seen: dict[int, logging.StreamHandler] = {}
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                stream = getattr(h, "stream", None)
                if stream is not None and (any(stream is s for s in streams) or _fd(stream) in (1, 2)):
                    seen[id(h)] = h
    return list(seen.values())


def _fd(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        return None


@contextlib.contextmanager
def library_output(path: str | os.PathLike, *, verbose: bool = False, title: str = "") -> Iterator[Captured]:
    """Route library output to ``path`` for the duration of the block (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", encoding="utf-8", buffering=1)
    log.write(f"--- {_dt.datetime.now().isoformat(timespec='seconds')} {title}".rstrip() + "\n")
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    if verbose:  # the libraries print as usual; their logging records also go to the file
        shown = None
        streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
        if not any(h in root.handlers for h in _terminal_handlers(streams)):
            # what logging's last resort would have printed, now that the root logger has a handler (the file)
            shown = logging.StreamHandler()
            shown.setLevel(logging.WARNING)
            root.addHandler(shown)
        root.addHandler(handler)
        try:
            yield Captured(path, sys.stdout, sys.stderr)
        finally:
            root.removeHandler(handler)
            if shown is not None:
                root.removeHandler(shown)
            log.close()
        return

    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    # the terminal, for anpyc's own output while the block runs: the original streams, or duplicates of fds 1/2
    saved_fds: dict[int, int] = {}
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            saved_fds[fd] = os.dup(fd)
    old_out, old_err = sys.stdout, sys.stderr
    term_out = old_out if _fd(old_out) not in saved_fds else os.fdopen(os.dup(saved_fds[1]), "w", buffering=1)
    term_err = old_err if _fd(old_err) not in saved_fds else os.fdopen(os.dup(saved_fds[2]), "w", buffering=1)
    moved = [(h, h.stream) for h in _terminal_handlers((old_out, old_err, sys.__stdout__, sys.__stderr__))]
    for h, _ in moved:
        h.setStream(log)
    root.addHandler(handler)
    last_resort, logging.lastResort = logging.lastResort, handler
    for fd in saved_fds:
        os.dup2(log.fileno(), fd)
    sys.stdout = sys.stderr = log
    old_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        log.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show
    try:
        yield Captured(path, term_out, term_err)
    finally:
        warnings.showwarning = old_show
        sys.stdout, sys.stderr = old_out, old_err
        for s in (log,):
            with contextlib.suppress(Exception):
                s.flush()
        for fd, saved in saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        logging.lastResort = last_resort
        root.removeHandler(handler)
        for h, stream in moved:
            with contextlib.suppress(Exception):
                h.setStream(stream)
        for t, old in ((term_out, old_out), (term_err, old_err)):
            if t is not old:
                with contextlib.suppress(Exception):
                    t.close()
        log.close()
