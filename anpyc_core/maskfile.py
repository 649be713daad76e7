"""The mask file, ``masks.safetensors``: a mask space's owner tensor with a versioned schema (granularity, unit
layout fingerprint, task count, owner dtype) in the safetensors metadata. The spaces themselves are
:mod:`anpyc.masks`; ``anpyc inspect`` reads the file without building one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import StateFileError, clip
from .tensorio import load_tensors, save_tensors
from .validate import MAX_LIST, MAX_TASKS, Fields

if TYPE_CHECKING:
    from .masks import MaskSpace

__all__ = ["save_masks", "load_masks", "check_masks", "schema_tasks", "MASKS_FORMAT", "MASKS_VERSION",
           "MASKS_READS"]

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
    schema = meta.get("schema")
    check_masks(tensors, schema, path)
    if space is not None:
        if schema.get("granularity") != space.granularity or schema.get("fingerprint") != space.layout_key():
            raise StateFileError(f"mask file {path} was made for another backbone or unit layout "
                                 f"({schema.get('granularity')}, {schema.get('fingerprint')})",
                                 "use the mask file of this run, or re-train with this backbone")
        space.load_owners(tensors)
    return tensors, schema


def schema_tasks(schema: dict) -> list[int]:
    """Task indices recorded in a mask file's schema, whichever version wrote it (checked by :func:`check_masks`)."""
    if "num_tasks" in schema:
        return list(range(int(schema["num_tasks"])))
    return [int(t) for t in schema.get("tasks") or []]


_OWNER_DTYPES = {"uint8": torch.uint8, "int16": torch.int16}


def check_masks(tensors: dict[str, torch.Tensor], schema: object, path: str | Path) -> None:
    """A mask file whose every field is well-formed: one 1-d ``owners`` tensor (uint8 or int16, as its schema says)
    with ``num_units`` entries, a free marker that is its dtype's largest value, unit groups (or weight tensors) that
    tile the units, and every owner either a recorded task (< the task count) or free. Raises StateFileError naming
    the file and the field."""
    fix = "restore the run directory from a backup, or re-train"
    f = Fields(schema, f"mask file {path}", error=StateFileError, fix=fix, path="schema")
    granularity = f.string("granularity", choices=("unit", "element"))
    owners = tensors.get("owners")
    if owners is None or set(tensors) != {"owners"}:
        raise StateFileError(f"mask file {path} holds tensors {clip(sorted(tensors)[:4], 80)}, not one tensor "
                             "'owners'", fix)
    dtype = f.string("dtype", choices=tuple(_OWNER_DTYPES), optional=True, default="uint8")  # versions 1-2: uint8
    if owners.dtype != _OWNER_DTYPES[dtype] or owners.ndim != 1:
        f.fail("dtype", f"says {dtype}, but the owners are {str(owners.dtype).removeprefix('torch.')} of shape "
                        f"{list(owners.shape)} (a vector of {dtype} is expected)")
    free = int(torch.iinfo(owners.dtype).max)
    if f.int("free", optional=True, default=free) != free:
        f.fail("free", f"is {f.doc['free']}, but the free marker of {dtype} owners is {free}")
    units = f.int("num_units", low=0, high=2 ** 40)
    if units != owners.numel():
        f.fail("num_units", f"is {units}, but the owner tensor holds {owners.numel()}")
    if "num_tasks" in f.doc or "tasks" not in f.doc:
        tasks = f.int("num_tasks", low=0, high=MAX_TASKS)
    else:  # version 1: the task indices, always 0..n-1
        listed = f.ints("tasks", low=0, high=MAX_TASKS, max_len=MAX_TASKS)
        if listed != list(range(len(listed))):
            f.fail("tasks", f"are {listed[:6]}..., not 0..{len(listed) - 1} in order")
        tasks = len(listed)
    f.string("fingerprint", max_len=128, optional=True)
    end = 0
    if granularity == "unit":
        for g in f.objects("groups", max_len=MAX_LIST):
            g.string("name")
            g.string("kind", max_len=64)
            if g.int("offset", low=0) != end:
                g.fail("offset", f"is {g.doc['offset']}, but the group before it ends at {end}")
            end += g.int("size", low=1)
    else:
        for t in f.objects("tensors", max_len=MAX_LIST):
            t.string("name")
            size = 1
            for v in t.ints("shape", low=1, max_len=8):
                size *= v
            if t.int("offset", low=0) != end:
                t.fail("offset", f"is {t.doc['offset']}, but the tensor before it ends at {end}")
            end += size
    if end != units:
        f.fail("groups" if granularity == "unit" else "tensors", f"cover {end} units, the file holds {units}")
    wide = owners.to(torch.int32)
    bad = ~((wide == free) | ((wide >= 0) & (wide < tasks)))
    if bool(bad.any()):
        u = int(bad.nonzero()[0, 0])
        raise StateFileError(f"mask file {path}: unit {u} is owned by task index {int(wide[u])}, but the file "
                             f"records {tasks} task(s) (owners are task indices below {tasks}, or {free} = free)", fix)
