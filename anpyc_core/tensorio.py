"""Safetensors state files with a versioned schema: every tensor file anpyc writes or reads.

Safetensors files carry ``format`` (what the file is), ``version`` (its schema version) and ``schema`` (a JSON
string describing the tensors) in their metadata, so they can be read with ``safetensors`` alone. They are written
atomically (:func:`anpyc.fileio.atomic_write_bytes`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from .errors import StateFileError, clip
from .fileio import atomic_write_bytes, read_regular, sha256_bytes

__all__ = ["save_tensors", "load_tensors", "read_metadata"]


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
    raw = read_regular(path, what="state file", fix="restore it from a backup or re-run the step that writes it")
    if len(raw) < 8:
        raise StateFileError(f"state file {path} is truncated ({len(raw)} bytes)", "restore it or re-run the step")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len <= 0 or 8 + header_len > len(raw):
        raise StateFileError(f"state file {path} is truncated or not a safetensors file",
                             "restore it from a backup or re-run the step that writes it")
    try:
        header = json.loads(raw[8: 8 + header_len])
        meta = header.get("__metadata__") or {} if isinstance(header, dict) else None
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("the header or its metadata is not a string table")
        tensors = st_load_bytes(raw)
    except (SafetensorError, ValueError, RecursionError, RuntimeError, TypeError, OverflowError) as e:
        raise StateFileError(f"state file {path} is corrupt ({type(e).__name__})",
                             "restore it from a backup or re-run the step that writes it") from None
    return tensors, dict(meta)


def load_tensors(
    path: str | os.PathLike, *, fmt: str, versions: tuple[int, ...] = (1,)
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors state file and check its ``format`` and schema ``version``.

    Returns the tensors and the metadata (with ``schema`` decoded from JSON).
    """
    p = Path(path)
    tensors, meta = _parse(p)
    if meta.get("format") != fmt:
        raise StateFileError(f"{p} is a {clip(meta.get('format') or 'foreign', 40)} file, not {fmt}",
                             "pass the right file; anpyc state files say what they are in their metadata")
    try:
        version = int(meta.get("version", "-1"))
    except ValueError:
        version = -1
    if version not in versions:
        raise StateFileError(f"{p} has schema version {clip(meta.get('version'), 40)}, this anpyc reads "
                             f"{list(versions)}",
                             "use the anpyc version that wrote it, or re-create the file")
    out: dict[str, Any] = dict(meta)
    out["version"] = version
    if "schema" in meta:
        try:
            out["schema"] = json.loads(meta["schema"])
        except (json.JSONDecodeError, RecursionError):
            raise StateFileError(f"{p} has an unreadable schema in its metadata", "re-create the file") from None
    return tensors, out


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The raw metadata of a safetensors file (no format check)."""
    return _parse(Path(path))[1]
