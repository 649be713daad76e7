"""Atomic files without torch: write-then-rename, JSON and JSON lines, hashing.

Every file anpyc writes is written to a temporary file in the same folder, flushed, fsynced and renamed over
the target, so a crash leaves either the old file or the new one, never a torn one. This module imports only the
standard library, so the onnxruntime side of anpyc (``anpyc.export.runtime``, the server) uses it too; tensor files
are :mod:`anpyc.tensorio`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .errors import AnpycError, StateFileError

__all__ = ["atomic_write_bytes", "atomic_write_json", "append_jsonl", "read_jsonl", "read_json", "read_regular",
           "sha256_file", "sha256_bytes", "finite", "MAX_JSON_BYTES"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line. A torn last line (crash mid-append) is skipped by :func:`read_jsonl`."""
    line = json.dumps(dict(record), allow_nan=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


MAX_JSON_BYTES = 64 * 1024 * 1024  # no JSON file anpyc writes comes near it (a 100,000-class sidecar is ~2 MB)


def read_json(path: str | os.PathLike, *, what: str = "JSON file", error: type[AnpycError] = StateFileError,
              missing_fix: str = "check the path, or re-create it by re-running the step",
              invalid_fix: str = "restore it from a backup or re-run the step that writes it",
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON document at ``path``; a missing, oversized or unreadable file (or one that is not a regular file: a
    device or a pipe would block) raises ``error`` naming ``what`` and the fix."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise error(f"{what} {p} is missing", missing_fix)
    data = read_regular(p, what=what, error=error, fix=invalid_fix, max_bytes=max_bytes)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {p} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})", invalid_fix) from None
    except RecursionError:
        raise error(f"{what} {p} is nested too deeply to be a file anpyc wrote", invalid_fix) from None


def _constant(name: str) -> float:
    # NaN and Infinity are not JSON; anpyc writes its documents with finite() first, so one in a file is damage
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


def read_regular(path: str | os.PathLike, *, what: str, error: type[AnpycError] = StateFileError,
                 fix: str = "restore it from a backup or re-run the step that writes it",
                 max_bytes: int | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file (after symlinks) of at most ``max_bytes``; the size is
    checked before anything is read and the read stops at the limit, so no file can make this allocate more."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{what} {p} is missing", fix) from None
    except OSError as e:
        raise error(f"{what} {p} cannot be opened ({e.strerror or e})", fix) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {p} is not a regular file", fix)
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(f"{what} {p} is {st.st_size:,} bytes, more than the {max_bytes:,} this reader accepts", fix)
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"{what} {p} grew past {max_bytes:,} bytes while it was read", fix)
    return data


def finite(obj: Any) -> Any:
    """A JSON-safe copy: NaN/inf floats become None (recursively through dicts, lists, tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
