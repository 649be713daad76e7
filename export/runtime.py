"""Serve an export directory with onnxruntime: numpy, onnxruntime and PIL only (no torch, no onnx).

    models = load_export("runs/x/export", threads=2)
    models.predict(0, ["cat.png", "dog.jpg"], top_k=3)
    # -> [[{"index": 3, "label": "cat", "score": 0.91}, ...], [...]]
    models.route(["cat.png"])  # task unknown: every task model sees the input, the most certain one answers
    # -> [{"task": 2, "name": "animals", "confidence": 0.87, "predictions": [...], "candidates": [...]}]

On load every ONNX file's sha256 is checked against its sidecar and every path must stay inside the export
directory. Images are preprocessed exactly like timm's eval transform
(``timm.data.create_transform(input_size, interpolation=, mean=, std=, crop_pct=, is_training=False)``) after
``img.convert(color_mode)``; numpy arrays are taken as already preprocessed float tensors.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from anpyc.errors import DataError
from anpyc.fileio import read_json, sha256_file
from anpyc.task import InputSpec

from .errors import ExportDirError, InputShapeError, UnknownTaskError
from .formats import MANIFEST_FORMAT, READ_VERSIONS, SIDECAR_FORMAT
from .preprocess import check_spec, open_image, preprocess_image

__all__ = ["ExportedModels", "load_export", "make_session", "preprocess_image", "softmax", "normalized_entropy",
           "ROUTING_CRITERION"]

_CHUNK = 64  # samples per onnxruntime call, bounds memory on big batches



def make_session(path: str | os.PathLike, *, threads: int = 1):
    """An onnxruntime CPU session with explicit threads: ``threads`` intra-op, 1 inter-op, sequential execution."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _read_json(path: Path, what: str) -> Any:
    return read_json(path, what=what, error=ExportDirError,
                     missing_fix="export the run first: anpyc export RUN --out DIR",
                     invalid_fix="re-export the run with anpyc export")


def _inside(root: Path, name: Any, what: str) -> Path:
    """``root / name`` resolved, refusing anything (absolute paths, ``..``, symlinks) that leaves ``root``."""
    if not isinstance(name, str) or not name:
        raise ExportDirError(f"{what} names no file ({name!r})", "re-export the run with anpyc export")
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ExportDirError(f"{what} points outside the export directory ({name!r})",
                             "only load exports you trust; re-export the run with anpyc export")
    return path


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy of each row divided by ``log(num_classes)``: 0 = one class certain, 1 = uniform.

    Dividing by the largest possible entropy puts tasks with different class counts on one scale (a uniform guess
    over 10 classes has 3.3x the raw entropy of one over 2). A one-class task carries no evidence and scores 1.
    """
    n = probs.shape[-1]
    if n < 2:
        return np.ones(probs.shape[:-1])
    p = np.clip(probs.astype(np.float64), 1e-300, 1.0)
    return np.clip(-(probs * np.log(p)).sum(axis=-1) / math.log(n), 0.0, 1.0)


ROUTING_CRITERION = "lowest normalised predictive entropy (entropy / log(num_classes)); confidence = 1 - that"


# --------------------------------------------------------------------------- models


class ExportedModels:
    """The task models of one export directory; sessions are created on first use and cached per task."""

    def __init__(self, export_dir: Path, sidecars: dict[int, dict[str, Any]], *, threads: int = 1,
                 int8: bool = False):
        self.export_dir = export_dir
        self.threads = int(threads)
        self.int8 = bool(int8)
        self._sidecars = sidecars
        self._specs = {t: InputSpec.from_dict(s["input_spec"]) for t, s in sidecars.items()}
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()

    # --- metadata
    @property
    def tasks(self) -> dict[int, dict[str, Any]]:
        """Sidecars by task id (copies)."""
        return {t: json.loads(json.dumps(s)) for t, s in self._sidecars.items()}

    @property
    def task_ids(self) -> list[int]:
        return list(self._sidecars)

    def sidecar(self, task: Any) -> dict[str, Any]:
        return self._sidecars[self._task_id(task)]

    def input_spec(self, task: Any) -> InputSpec:
        return self._specs[self._task_id(task)]

    def _task_id(self, task: Any) -> int:
        t: int | None = None
        if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
            t = int(task)
        elif isinstance(task, str) and task.strip().lstrip("-").isdigit():
            t = int(task)
        if t is None or t not in self._sidecars:
            raise UnknownTaskError(f"unknown task {task!r}; this export holds tasks {self.task_ids}",
                                   "pass one of those task ids")
        return t

    def model_path(self, task: Any) -> Path:
        """The ONNX file served for ``task`` (the int8 one when the models were loaded with ``int8=True``)."""
        t = self._task_id(task)
        s = self._sidecars[t]
        if not self.int8:
            return self.export_dir / s["file"]
        if not s.get("int8"):
            raise ExportDirError(f"task {t} has no int8 model in {self.export_dir}",
                                 "create it with anpyc export RUN --int8, or drop --int8")
        return self.export_dir / s["int8"]["file"]

    # --- inference
    def session(self, task: Any):
        t = self._task_id(task)
        with self._lock:
            sess = self._sessions.get(t)
            if sess is None:
                sess = make_session(self.model_path(t), threads=self.threads)
                self._check_session(t, sess)
                self._sessions[t] = sess
        return sess

    def _check_session(self, task: int, sess: Any) -> None:
        shape = self._specs[task].shape
        inputs = sess.get_inputs()
        s = self._sidecars[task]
        ok = (len(inputs) == 1 and inputs[0].name == s["input_name"] and inputs[0].type == "tensor(float)"
              and len(inputs[0].shape) == 1 + len(shape)
              and all(not isinstance(d, int) or d == e for d, e in zip(inputs[0].shape[1:], shape)))
        if not ok:
            desc = [(i.name, i.type, i.shape) for i in inputs]
            raise ExportDirError(f"the ONNX model of task {task} takes {desc}, its sidecar says "
                                 f"{s['input_name']!r} float [batch, {', '.join(map(str, shape))}]",
                                 "re-export the task with anpyc export")

    def preprocess(self, task: Any, inputs: Any, *, names: Sequence[str] | None = None) -> np.ndarray:
        """Inputs (image paths, PIL images, encoded image bytes, or float arrays) -> float32 ``[B, *shape]``.

        ``names`` (one per input, e.g. upload file names) label the inputs in error messages.
        """
        t = self._task_id(task)
        spec = self._specs[t]
        if isinstance(inputs, np.ndarray):
            return self._array(t, inputs, "input", batch_ok=True)
        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if not items:
            raise InputShapeError("no inputs given", "pass at least one image or tensor")
        rows = []
        for i, item in enumerate(items):
            if names is not None and i < len(names):
                label = str(names[i])
            else:
                label = str(item) if isinstance(item, (str, os.PathLike)) else f"#{i}"
            if isinstance(item, np.ndarray):
                rows.append(self._array(t, item, f"input {label}", batch_ok=False)[0])
            elif isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
                if spec.kind != "image":
                    raise InputShapeError(f"task {t} takes vectors of shape {list(spec.shape)}, not images",
                                          "pass float arrays")
                rows.append(preprocess_image(open_image(item, label), spec))
            else:
                raise InputShapeError(f"input {label} is a {type(item).__name__}",
                                      "pass image paths, PIL images or numpy float arrays")
        return np.stack(rows).astype(np.float32, copy=False)

    def _array(self, task: int, arr: np.ndarray, label: str, *, batch_ok: bool) -> np.ndarray:
        shape = tuple(self._specs[task].shape)
        if arr.dtype.kind not in "f":
            raise InputShapeError(
                f"{label} has dtype {arr.dtype}, task {task} takes float32 tensors",
                "pass float arrays preprocessed as the sidecar's input_spec says, or the image files themselves")
        if arr.shape == shape:
            arr = arr[None]
        elif not (batch_ok and arr.ndim == len(shape) + 1 and arr.shape[1:] == shape and arr.shape[0] > 0):
            dims = ", ".join(map(str, shape))
            want = f"[{dims}]" + (f" or [batch, {dims}]" if batch_ok else "")
            got = list(arr.shape)
            hint = ""
            if len(shape) == 3 and arr.ndim in (3, 4) and arr.shape[-3] != shape[0]:
                hint = f": it has {arr.shape[-3]} channel(s), the model takes {shape[0]}"
            raise InputShapeError(f"{label} has shape {got}, task {task} takes {want}{hint}",
                                  "resize/convert the input to the model's input shape, or send images instead")
        arr = arr.astype(np.float32, copy=False)
        if not np.all(np.isfinite(arr)):
            raise InputShapeError(f"{label} contains NaN or inf values (or values beyond float32 range)",
                                  "pass finite float32 values")
        return np.ascontiguousarray(arr)

    def logits(self, task: Any, inputs: Any, *, names: Sequence[str] | None = None) -> np.ndarray:
        """Raw logits ``[B, num_classes]`` for ``inputs`` (see :meth:`preprocess`)."""
        t = self._task_id(task)
        return self._run(t, self.preprocess(t, inputs, names=names))

    def predict(self, task: Any, inputs: Any, top_k: int = 1, *,
                names: Sequence[str] | None = None) -> list[list[dict[str, Any]]]:
        """Top-``top_k`` classes per input: ``[{"index", "label", "score"}]`` with softmax scores, best first.

        ``top_k`` larger than the number of classes returns every class.
        """
        _check_top_k(top_k)
        t = self._task_id(task)
        probs = softmax(self.logits(t, inputs, names=names))
        classes = self._sidecars[t]["classes"]
        return _top_k(probs, classes, top_k)

    def route(self, inputs: Any, top_k: int = 1, *, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Predict without a task id: every task model sees each input and the most certain one answers.

        The criterion (:data:`ROUTING_CRITERION`) is the lowest normalised predictive entropy, see
        :func:`normalized_entropy`; ties go to the lower task id. Per input: ``{"task", "name", "confidence",
        "predictions", "candidates"}`` where ``confidence`` is 1 - the chosen task's normalised entropy,
        ``predictions`` its top-``top_k`` classes (as :meth:`predict`) and ``candidates`` every task's confidence,
        best first. How often this picks the right task is measured in BENCHMARKS.md (routing section).
        """
        _check_top_k(top_k)
        ids = self.task_ids
        batches: dict[InputSpec, np.ndarray] = {}  # tasks of one export share a spec: preprocess once
        probs = {}
        for t in ids:
            spec = self._specs[t]
            if spec not in batches:
                batches[spec] = self.preprocess(t, inputs, names=names)
            probs[t] = softmax(self._run(t, batches[spec]))
        conf = np.stack([1.0 - normalized_entropy(probs[t]) for t in ids], axis=1)  # [B, tasks]
        out = []
        for i, row in enumerate(conf):
            order = np.argsort(-row, kind="stable")  # stable: equal confidences keep the lower task id first
            t = ids[int(order[0])]
            out.append({"task": t, "name": self._sidecars[t].get("name"), "confidence": float(row[order[0]]),
                        "predictions": _top_k(probs[t][i:i + 1], self._sidecars[t]["classes"], top_k)[0],
                        "candidates": [{"task": ids[int(j)], "confidence": float(row[j])} for j in order]})
        return out

    def _run(self, task: int, x: np.ndarray) -> np.ndarray:
        sess = self.session(task)
        s = self._sidecars[task]
        outs = [sess.run([s["output_name"]], {s["input_name"]: x[i:i + _CHUNK]})[0] for i in range(0, len(x), _CHUNK)]
        return np.concatenate(outs, axis=0)


def _check_top_k(top_k: Any) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise DataError(f"top_k must be a positive integer, got {top_k!r}", "pass top_k >= 1")


def _top_k(probs: np.ndarray, classes: Sequence[str], top_k: int) -> list[list[dict[str, Any]]]:
    k = min(int(top_k), probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"index": int(j), "label": classes[j], "score": float(p[j])} for j in row]
            for row, p in zip(order, probs)]


def _load_sidecar(root: Path, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
        raise ExportDirError(f"the manifest of {root} has a malformed task entry ({entry!r})", "re-export the run")
    task = entry["id"]
    path = _inside(root, entry.get("sidecar"), f"the sidecar of task {task}")
    s = _read_json(path, f"sidecar of task {task}")
    if not isinstance(s, dict) or s.get("format") != SIDECAR_FORMAT:
        raise ExportDirError(f"{path} is not an anpyc export sidecar", "re-export the run with anpyc export")
    if s.get("version") not in READ_VERSIONS:
        raise ExportDirError(f"{path} has sidecar version {s.get('version')}, this anpyc reads {list(READ_VERSIONS)}",
                             "use the anpyc version that exported it, or re-export")
    if s.get("task") != task:
        raise ExportDirError(f"{path} describes task {s.get('task')}, the manifest says {task}", "re-export the run")
    for key in ("classes", "file", "onnx_sha256", "input_spec", "input_name", "output_name"):
        if key not in s:
            raise ExportDirError(f"{path} lacks {key!r}", "re-export the run with anpyc export")
    try:
        spec = InputSpec.from_dict(s["input_spec"])
    except (KeyError, TypeError, ValueError):
        raise ExportDirError(f"{path} has an unreadable input_spec", "re-export the run with anpyc export") from None
    check_spec(spec, str(path))
    files = [(s["file"], s["onnx_sha256"])]
    q = s.get("int8")
    if q is not None:
        if not isinstance(q, dict) or "file" not in q:
            raise ExportDirError(f"{path} has a malformed int8 entry", "re-run the int8 export (anpyc export --int8)")
        files.append((q["file"], q.get("onnx_sha256")))
    for name, digest in files:
        onnx_path = _inside(root, name, f"the ONNX file of task {task}")
        if not onnx_path.is_file():
            raise ExportDirError(f"the ONNX file {name} of task {task} is missing", "re-export the task")
        actual = sha256_file(onnx_path)
        if actual != digest:
            raise ExportDirError(f"{name} does not match its sidecar (sha256 {actual[:12]}... != "
                                 f"{str(digest)[:12]}...): the file was modified or replaced",
                                 "re-export the task with anpyc export")
    return s


def load_export(export_dir: str | os.PathLike, *, threads: int = 1, int8: bool = False) -> ExportedModels:
    """Open an export directory: check its manifest, every sidecar and every ONNX file's sha256.

    ``threads`` is onnxruntime's intra-op thread count per session (inter-op is 1). ``int8`` serves the quantized
    models (``task-NNN.int8.onnx``) instead of the float32 ones; a task without one raises when it is used.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise DataError(f"threads must be a positive integer, got {threads!r}", "pass threads >= 1")
    root = Path(export_dir).resolve()
    if not root.is_dir():
        raise ExportDirError(f"export directory {export_dir} does not exist", "check the path, or run anpyc export")
    manifest = _read_json(root / "manifest.json", "export manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ExportDirError(f"{root / 'manifest.json'} is not an anpyc export manifest", "pass an export directory")
    if manifest.get("version") not in READ_VERSIONS:
        raise ExportDirError(f"the manifest has version {manifest.get('version')}, this anpyc reads "
                             f"{list(READ_VERSIONS)}", "use the anpyc version that exported it, or re-export")
    entries = manifest.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ExportDirError(f"the manifest of {root} lists no tasks", "re-export the run with anpyc export")
    sidecars: dict[int, dict[str, Any]] = {}
    for entry in entries:
        s = _load_sidecar(root, entry)
        sidecars[s["task"]] = s
    return ExportedModels(root, dict(sorted(sidecars.items())), threads=threads, int8=int8)

