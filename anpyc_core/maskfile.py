"""The mask file, ``masks.safetensors``: a mask space's owner tensor with a versioned schema (granularity, unit
layout fingerprint, task count, owner dtype) in the safetensors metadata. The spaces themselves are
:mod:`anpyc.masks`; ``anpyc inspect`` reads the file without building one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import StateFileError
from .tensorio import load_tensors, save_tensors

if TYPE_CHECKING:
    from .masks import MaskSpace

__all__ = ["save_masks", "load_masks", "schema_tasks", "MASKS_FORMAT", "MASKS_VERSION", "MASKS_READS"]

MASKS_FORMAT = "anpyc.masks"
MASKS_VERSION = 3
# version 1 listed the task indices (``"tasks": [0, 1, ...]``, ~4 bytes a task); version 2 stores their count
# (``"num_tasks"``): indices are always 0..num_tasks-1; version 3 records the owner dtype (``"dtype"``: uint8, or
# int16 once a run passes 254 tasks) with its free marker. All are read.
MASKS_READS = (1, 2, 3)


def save_masks(path: str | Path, space: MaskSpace, *, tasks: list[int], extra: dict | None = None) -> str:
    """Write ``masks.safetensors``: the owner tensor plus the schema (granularity, layout, task count) as metadata.

    ``tasks`` are the indices of the tasks learned so far, which are always ``0..len(tasks)-1``.
    """
    tasks = list(tasks)
    if tasks != list(range(len(tasks))):
        raise ValueError(f"task indices must be 0..{len(tasks) - 1} in order, got {tasks}")
    schema = dict(space.schema())
    schema["num_tasks"] = len(tasks)
    if extra:
        schema.update(extra)
    return save_tensors(path, space.tensors(), fmt=MASKS_FORMAT, version=MASKS_VERSION, schema=schema)


def load_masks(path: str | Path, space: MaskSpace | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a mask file; with ``space``, check it matches and load the owners into it.

    Returns the tensors and the schema.
    """
    tensors, meta = load_tensors(path, fmt=MASKS_FORMAT, versions=MASKS_READS)
    schema = meta.get("schema") or {}
    if space is not None:
        if schema.get("granularity") != space.granularity or schema.get("fingerprint") != space.layout_key():
            raise StateFileError(f"mask file {path} was made for another backbone or unit layout "
                                 f"({schema.get('granularity')}, {schema.get('fingerprint')})",
                                 "use the mask file of this run, or re-train with this backbone")
        space.load_owners(tensors)
    return tensors, schema


def schema_tasks(schema: dict) -> list[int]:
    """Task indices recorded in a mask file's schema, whichever version wrote it."""
    if "num_tasks" in schema:
        return list(range(int(schema["num_tasks"])))
    return [int(t) for t in schema.get("tasks") or []]
