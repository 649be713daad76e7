"""Atomic, versioned state files.

Every file anpyc writes is written to a temporary file in the same folder, flushed, fsynced and renamed over
the target, so a crash leaves either the old file or the new one, never a torn one. Safetensors files carry
``format`` (what the file is), ``version`` (its schema version) and ``schema`` (a JSON string describing the
tensors) in their metadata, so they can be read with ``safetensors`` alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from .errors import StateFileError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "append_jsonl",
    "read_json",
    "save_tensors",
    "load_tensors",
    "read_metadata",
    "sha256_file",
    "sha256_bytes",
]


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


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    p = Path(path)
    if not p.exists():
        raise StateFileError(f"{what} {p} is missing", "check the path, or re-create it by re-running the step")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateFileError(f"{what} {p} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})",
                             "restore it from a backup or re-run the step that writes it") from None


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    fmt: str,
    version: int,
    schema: Any = None,
    extra: Mapping[str, str] | None = None,
) -> str:
    """Save ``tensors`` atomically as safetensors with versioned metadata; returns the file's sha256."""
    meta = {"format": fmt, "version": str(version)}
    if schema is not None:
        meta["schema"] = json.dumps(schema, sort_keys=True, separators=(",", ":"))  # compact: it is stored
    if extra:
        meta.update({k: str(v) for k, v in extra.items()})
    data = st_save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def _parse(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise StateFileError(f"state file {path} is missing", "check the path, or resume/re-run to re-create it")
    raw = path.read_bytes()
    if len(raw) < 8:
        raise StateFileError(f"state file {path} is truncated ({len(raw)} bytes)", "restore it or re-run the step")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len <= 0 or 8 + header_len > len(raw):
        raise StateFileError(f"state file {path} is truncated or not a safetensors file",
                             "restore it from a backup or re-run the step that writes it")
    try:
        header = json.loads(raw[8: 8 + header_len])
        tensors = st_load_bytes(raw)
    except (SafetensorError, ValueError, json.JSONDecodeError, RuntimeError) as e:
        raise StateFileError(f"state file {path} is corrupt ({type(e).__name__})",
                             "restore it from a backup or re-run the step that writes it") from None
    return tensors, dict(header.get("__metadata__") or {})


def load_tensors(
    path: str | os.PathLike, *, fmt: str, versions: tuple[int, ...] = (1,)
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors state file and check its ``format`` and schema ``version``.

    Returns the tensors and the metadata (with ``schema`` decoded from JSON).
    """
    p = Path(path)
    tensors, meta = _parse(p)
    if meta.get("format") != fmt:
        raise StateFileError(f"{p} is a {meta.get('format') or 'foreign'!s} file, not {fmt}",
                             "pass the right file; anpyc state files say what they are in their metadata")
    try:
        version = int(meta.get("version", "-1"))
    except ValueError:
        version = -1
    if version not in versions:
        raise StateFileError(f"{p} has schema version {meta.get('version')}, this anpyc reads {list(versions)}",
                             "use the anpyc version that wrote it, or re-create the file")
    out: dict[str, Any] = dict(meta)
    out["version"] = version
    if "schema" in meta:
        try:
            out["schema"] = json.loads(meta["schema"])
        except json.JSONDecodeError:
            raise StateFileError(f"{p} has an unreadable schema in its metadata", "re-create the file") from None
    return tensors, out


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The raw metadata of a safetensors file (no format check)."""
    return _parse(Path(path))[1]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
