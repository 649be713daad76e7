"""What a run directory's JSON files may hold: ``run.json`` (:func:`check_manifest`) and a generation's
``state.json`` (:func:`check_state`), every field read with its type and bounds (:class:`anpyc.validate.Fields`).

Both are applied where the files are read (:class:`anpyc.rundir.RunDir`, :mod:`anpyc.checkpoint`, ``anpyc
inspect``), so a damaged or crafted file is one line naming the file and the field, before anything is built from
it: no field can name a file outside the generation folder, declare an input a reader would need gigabytes for, or
hold a value of the wrong type deep inside a loader.
"""

from __future__ import annotations

from typing import Any

from .errors import RunDirError, StateFileError
from .task import InputSpec
from .validate import MAX_CLASSES, MAX_NAME, MAX_TASKS, PLAIN_NAME, SHA256, Fields, describe

__all__ = ["check_manifest", "check_state", "check_tasks", "PHASES", "REQUIRED_FILES", "MAX_GENERATION",
           "MAX_TASK_ID", "MAX_FILES"]

PHASES = ("train", "prune", "consolidate", "done")  # where a task stands (state.json's cursor)
# every committed generation holds these (probes, growth and optimizer files come and go with the run's state)
REQUIRED_FILES = ("trunk.safetensors", "masks.safetensors", "heads.safetensors", "stats.safetensors",
                  "consolidation.safetensors", "state.json")
MAX_GENERATION = 10 ** 9
MAX_TASK_ID = 2 ** 31 - 1
MAX_FILES = 64  # files of one generation (a run writes at most nine)
GRANULARITIES = ("unit", "element")
RUN_FIX = "restore run.json from a backup, or re-create the run"
STATE_FIX = "restore the run directory from a backup, or re-train"


def check_manifest(doc: Any, where: str) -> dict[str, Any]:
    """``doc`` (a parsed run.json) if every field anpyc reads from it is well-formed; else :class:`RunDirError`
    naming ``where``, the field and the fix. ``format`` and ``version`` are checked by the caller."""
    f = Fields(doc, where, error=RunDirError, fix=RUN_FIX)
    f.string("anpyc_version", max_len=64, optional=True)
    gen = f.int("generation", low=1, high=MAX_GENERATION, null=True, optional=True)
    files = f.mapping("files", max_len=MAX_FILES, null=True, optional=True) or {}
    for name, digest in files.items():
        f.check_string("files", name, max_len=128, pattern=PLAIN_NAME)
        f.check_string(f"files.{name}", digest, max_len=64, pattern=SHA256)
    if gen is not None:
        missing = [n for n in REQUIRED_FILES if n not in files]
        if missing:
            f.fail("files", f"does not list {missing[0]}, which every committed generation holds")
    f.object("config")
    backbone = f.object("backbone")
    backbone.string("source", max_len=MAX_NAME, optional=True)
    backbone.string("name", max_len=MAX_NAME, optional=True, null=True)
    backbone.mapping("kwargs", max_len=256, optional=True, null=True)
    InputSpec.from_dict(f.mapping("input_spec"), where, error=RunDirError, fix=RUN_FIX)
    f.string("granularity", choices=GRANULARITIES, optional=True)
    f.string("fingerprint", max_len=128, optional=True, null=True)
    layout = f.list("layout", optional=True, null=True)
    if layout is not None:
        _check_groups(f.objects("layout"))
    for e in f.objects("growth", optional=True):
        e.int("index", low=0, high=MAX_TASKS)  # the task index (its place in the run), "task" its id
        e.int("task", low=0, high=MAX_TASK_ID)
        e.string("group")
        e.int("units", low=1)
        e.int("free", low=0, optional=True)
        e.int("width", low=1, optional=True)
        e.string("reason", max_len=4096, optional=True)
    if f.has("tasks"):
        check_tasks(f, "tasks")
    return doc


def _check_groups(groups: list[Fields]) -> None:
    """Unit groups in order: names, kinds, and offsets that tile 0..units without a gap."""
    end = 0
    for g in groups:
        g.string("name")
        g.string("kind", max_len=64)
        offset = g.int("offset", low=0)
        g.int("size", low=1)
        if offset != end:
            g.fail("offset", f"is {offset}, but the group before it ends at {end}")
        end = offset + g.doc["size"]


def check_tasks(f: Fields, key: str) -> list[dict[str, Any]]:
    """Task records (``{"id", "name", "classes", "index", "done", "final"}``) in learned order: indices 0..n-1,
    distinct ids, at least one class each."""
    seen: set[int] = set()
    records = f.objects(key, max_len=MAX_TASKS)
    for i, r in enumerate(records):
        t = r.int("id", low=0, high=MAX_TASK_ID)
        if t in seen:
            r.fail("id", f"is {t}, the id of an earlier task too")
        seen.add(t)
        r.string("name")
        r.strings("classes", min_len=1, max_len=MAX_CLASSES)
        if r.int("index", low=0, high=MAX_TASKS) != i:
            r.fail("index", f"is {r.doc['index']}, but the record is number {i} of the list")
        r.boolean("done", optional=True)
        r.boolean("final", optional=True)
    return f.doc[key]


def check_state(doc: Any, where: str, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """``doc`` (a parsed state.json) if well-formed and consistent with the run's ``manifest``: a cursor in one of
    :data:`PHASES`, task records, lower-triangular accuracy matrices (row k holds tasks 0..k, values in [0, 1] or
    null) and one history record per finished task. Raises :class:`StateFileError` naming ``where`` and the field."""
    f = Fields(doc, where, error=StateFileError, fix=STATE_FIX)
    tasks = check_tasks(f, "tasks")
    ids = [r["id"] for r in tasks]
    cursor = f.object("cursor")
    cursor.string("phase", choices=PHASES)
    task = cursor.int("task", low=0, high=MAX_TASK_ID, null=True, optional=True)
    if task is not None and task not in ids:
        cursor.fail("task", f"is {task}, not one of the run's tasks {ids[:8]}")
    cursor.int("epoch", low=0, optional=True)
    cursor.number("a0", low=0, high=1, optional=True, null=True)
    cursor.mapping("prune", optional=True, null=True)
    for key in ("acc_test", "acc_val"):
        for k, row in enumerate(f.list(key, max_len=len(tasks))):
            if not isinstance(row, list) or len(row) != k + 1:
                f.fail(f"{key}[{k}]", f"is {describe(row)}, not a list of {k + 1} accuracies (tasks 0..{k})")
            for j, v in enumerate(row):
                if v is not None:
                    f.check_number(f"{key}[{k}][{j}]", v, low=0, high=1, null=True)
    done = sum(1 for r in tasks if r.get("done"))
    for h in f.objects("history", max_len=len(tasks)):
        h.int("id", low=0, high=MAX_TASK_ID)
        h.int("index", low=0, high=MAX_TASKS)
        for key in ("capacity", "capacity_params"):
            h.number(key, low=0, high=1, null=True)
        for key in ("owned_units", "params", "flops", "dense_params", "dense_flops"):
            h.int(key, low=0, null=True)
        h.number("seconds", low=0, null=True)
        prune = h.object("prune", null=True)
        if prune is not None:
            for key in ("released", "claim", "steps"):
                prune.int(key, low=0, optional=True)
            prune.number("a0", low=0, high=1, optional=True, null=True)
    if len(doc["history"]) > done:
        f.fail("history", f"has {len(doc['history'])} records for {done} finished task(s)")
    if manifest is not None and isinstance(manifest.get("tasks"), list):
        recorded = [r.get("id") for r in manifest["tasks"]]
        if recorded != ids:
            f.fail("tasks", f"are {ids[:8]}, run.json records {recorded[:8]}")
    return doc
