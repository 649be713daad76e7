"""The export directory's file formats, defined once for the writer (:mod:`anpyc.export.exporter`, torch) and the
reader (:mod:`anpyc.export.runtime`, no torch): ``task-NNN.json`` sidecars and ``manifest.json``.

The reader checks every field it uses (:class:`anpyc.validate.Fields`: types, bounds, plain file names inside the
folder, the input spec's size) before anything is built from it, so a damaged or crafted sidecar is one line
naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anpyc.errors import clip
from anpyc.fileio import read_json
from anpyc.task import InputSpec
from anpyc.validate import MAX_CLASSES, MAX_NAME, PLAIN_NAME, SHA256, Fields

from .errors import ExportDirError

__all__ = ["SIDECAR_FORMAT", "SIDECAR_VERSION", "MANIFEST_FORMAT", "MANIFEST_VERSION", "READ_VERSIONS",
           "read_manifest", "read_sidecar", "inside", "MAX_EXPORT_TASKS", "MAX_TASK_ID"]

SIDECAR_FORMAT = "anpyc.export"
SIDECAR_VERSION = 1
MANIFEST_FORMAT = "anpyc.export.manifest"
MANIFEST_VERSION = 1
READ_VERSIONS = (1,)  # sidecar and manifest versions this anpyc reads
MAX_EXPORT_TASKS = 32766
MAX_TASK_ID = 2 ** 31 - 1
FIX = "re-export the run with anpyc export"


def _read_json(path: Path, what: str) -> Any:
    return read_json(path, what=what, error=ExportDirError,
                     missing_fix="export the run first: anpyc export RUN --out DIR", invalid_fix=FIX)


def inside(root: Path, name: Any, what: str) -> Path:
    """``root / name`` for a plain file name that stays in ``root`` once symlinks are resolved; anything else
    (absolute paths, ``..``, folders, a symlink that leaves) is refused."""
    if not isinstance(name, str) or not name:
        raise ExportDirError(f"{what} names no file ({clip(repr(name), 60)})", FIX)
    path = (root / name).resolve()
    if not PLAIN_NAME.fullmatch(name) or not path.is_relative_to(root):
        raise ExportDirError(f"{what} points outside the export directory ({clip(repr(name), 60)}; sidecars name "
                             "plain files in the folder)", "only load exports you trust; re-export the run")
    return path


def _check_version(f: Fields, fmt: str, what: str) -> None:
    if f.doc.get("format") != fmt:
        raise ExportDirError(f"{f.where} is not an anpyc {what}", "pass an export directory (anpyc export RUN)")
    version = f.doc.get("version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise ExportDirError(f"{f.where} has {what} version {clip(version, 30)}, this anpyc reads "
                             f"{list(READ_VERSIONS)}", "use the anpyc version that exported it, or re-export")


def read_manifest(root: Path) -> list[dict[str, Any]]:
    """The task entries (``{"id", "sidecar", ...}``) of ``root/manifest.json``, every one checked."""
    path = root / "manifest.json"
    doc = _read_json(path, "export manifest")
    if not isinstance(doc, dict):
        raise ExportDirError(f"{path} is not an anpyc export manifest", "pass an export directory")
    f = Fields(doc, str(path), error=ExportDirError, fix=FIX)
    _check_version(f, MANIFEST_FORMAT, "manifest")
    entries = f.objects("tasks", max_len=MAX_EXPORT_TASKS)
    if not entries:
        raise ExportDirError(f"the manifest of {root} lists no tasks", FIX)
    seen: set[int] = set()
    for e in entries:
        t = e.int("id", low=0, high=MAX_TASK_ID)
        if t in seen:
            e.fail("id", f"is {t}, listed twice")
        seen.add(t)
        e.string("sidecar", max_len=128)
        e.string("name", optional=True, null=True)
    return [e.doc for e in entries]


def read_sidecar(root: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """The sidecar of manifest ``entry``, every field this anpyc uses checked: format and version, task id,
    classes (1..100,000 names), ONNX file names (plain, inside ``root``) with their sha256, input/output names and
    the input spec (bounded size, a transform this runtime can follow). Returns the parsed document."""
    from .preprocess import check_spec

    task = entry["id"]
    path = inside(root, entry["sidecar"], f"the sidecar of task {task}")
    s = _read_json(path, f"sidecar of task {task}")
    if not isinstance(s, dict):
        raise ExportDirError(f"{path} is not an anpyc export sidecar", FIX)
    f = Fields(s, str(path), error=ExportDirError, fix=FIX)
    if s.get("format") != SIDECAR_FORMAT:
        raise ExportDirError(f"{path} is not an anpyc export sidecar", FIX)
    _check_version(f, SIDECAR_FORMAT, "sidecar")
    if f.int("task", low=0, high=MAX_TASK_ID) != task:
        raise ExportDirError(f"{path} describes task {s['task']}, the manifest says {task}", FIX)
    f.string("name", optional=True, null=True)
    classes = f.strings("classes", min_len=1, max_len=MAX_CLASSES, item_len=MAX_NAME)
    if f.int("num_classes", low=1, high=MAX_CLASSES, optional=True, default=len(classes)) != len(classes):
        f.fail("num_classes", f"is {s['num_classes']}, but 'classes' lists {len(classes)}")
    f.string("file", max_len=128)
    f.string("onnx_sha256", max_len=64, pattern=SHA256)
    f.int("onnx_bytes", low=0, optional=True, null=True)
    f.string("input_name", max_len=256)
    f.string("output_name", max_len=256)
    for key in ("opset", "params", "flops"):
        f.int(key, low=0, optional=True, null=True)
    for key in ("exporter", "exporter_fallback_reason", "backbone", "mask_sha256"):
        f.string(key, max_len=4096, optional=True, null=True)
    parity = f.object("parity", optional=True, null=True)
    if parity is not None:
        parity.number("max_abs_diff", optional=True, null=True)
    spec = InputSpec.from_dict(s["input_spec"] if "input_spec" in s else f.mapping("input_spec"), str(path),
                               error=ExportDirError, fix=FIX)
    check_spec(spec, str(path))
    files = [(s["file"], s["onnx_sha256"], f"the ONNX file of task {task}")]
    q = f.object("int8", optional=True, null=True)
    if q is not None:
        q.string("file", max_len=128)
        q.string("onnx_sha256", max_len=64, pattern=SHA256)
        files.append((q.doc["file"], q.doc["onnx_sha256"], f"the int8 ONNX file of task {task}"))
    for name, _, what in files:
        onnx_path = inside(root, name, what)
        if not onnx_path.is_file():
            raise ExportDirError(f"{what} ({name}) is missing or not a regular file", "re-export the task")
    return s
