"""Serve an export directory with onnxruntime: numpy, onnxruntime and PIL only (no torch, no onnx).

    models = load_export("runs/x/export", threads=2)
    models.predict(0, ["cat.png", "dog.jpg"], top_k=3)
    # -> [[{"index": 3, "label": "cat", "score": 0.91}, ...], [...]]
    models.route(["cat.png"])  # task unknown: every task model sees the input, the most certain one answers
    # -> [{"task": 2, "name": "animals", "confidence": 0.87, "predictions": [...], "candidates": [...]}]

On load every field of the manifest and the sidecars is checked (:mod:`anpyc.export.formats`: file names are
plain names inside the export directory, input specs of bounded size) and every ONNX file's sha256 against its
sidecar; a session is made from the file's bytes after their sha256 is checked again, so a file replaced after
loading is refused, never served. Images are decoded within :class:`~anpyc.export.limits.Limits` and preprocessed
exactly like timm's eval transform (``timm.data.create_transform(input_size, interpolation=, mean=, std=,
crop_pct=, is_training=False)``) after ``img.convert(color_mode)``; numpy arrays are taken as already preprocessed
float tensors. Any number of inputs is preprocessed and run 64 at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from anpyc.errors import DataError, clip
from anpyc.fileio import read_regular, sha256_bytes, sha256_file
from anpyc.task import InputSpec

from .errors import ExportDirError, InputShapeError, UnknownTaskError
from .formats import inside, read_manifest, read_sidecar
from .limits import Limits
from .preprocess import load_image, preprocess_image

__all__ = ["ExportedModels", "load_export", "make_session", "preprocess_image", "softmax", "normalized_entropy",
           "ROUTING_CRITERION", "parse_task_id"]

_CHUNK = 64  # samples per onnxruntime call and per preprocessing step: bounds memory on any number of inputs
MAX_ONNX_BYTES = 2 ** 31  # onnxruntime reads single-file models up to protobuf's 2 GiB
_TASK_ID = re.compile(r"[+-]?[0-9]{1,10}")  # ASCII digits only: int() also reads '²'-like digits and 5,000 of them


def parse_task_id(task: Any) -> int | None:
    """A task id as an int (an int, or a string of at most 10 ASCII digits), else None."""
    if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
        return int(task)
    if isinstance(task, str) and _TASK_ID.fullmatch(task.strip()):
        return int(task.strip())
    return None


def make_session(model: str | os.PathLike | bytes, *, threads: int = 1):
    """An onnxruntime CPU session (from a path or the model's bytes) with explicit threads: ``threads`` intra-op,
    1 inter-op, sequential execution."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])


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
    """The task models of one export directory; sessions are created on first use (or all at once by
    :meth:`preload`) from the bytes of each ONNX file, whose sha256 is checked against the sidecar at that moment."""

    def __init__(self, export_dir: Path, sidecars: dict[int, dict[str, Any]], *, threads: int = 1,
                 int8: bool = False, limits: Limits | None = None):
        self.export_dir = export_dir
        self.threads = int(threads)
        self.int8 = bool(int8)
        self.limits = limits or Limits()
        self._sidecars = sidecars
        self._specs = {t: InputSpec.from_dict(s["input_spec"], str(export_dir), error=ExportDirError)
                       for t, s in sidecars.items()}
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
        t = parse_task_id(task)
        if t is None or t not in self._sidecars:
            raise UnknownTaskError(f"unknown task {clip(repr(task), 40)}; this export holds tasks "
                                   f"{clip(self.task_ids, 80)}", "pass one of those task ids")
        return t

    def _served(self, t: int) -> tuple[str, str]:
        """(file name, sha256) of the ONNX file served for task ``t``."""
        s = self._sidecars[t]
        if not self.int8:
            return s["file"], s["onnx_sha256"]
        if not s.get("int8"):
            raise ExportDirError(f"task {t} has no int8 model in {self.export_dir}",
                                 "create it with anpyc export RUN --int8, or drop --int8")
        return s["int8"]["file"], s["int8"]["onnx_sha256"]

    def model_path(self, task: Any) -> Path:
        """The ONNX file served for ``task`` (the int8 one when the models were loaded with ``int8=True``)."""
        return inside(self.export_dir, self._served(self._task_id(task))[0], f"the ONNX file of task {task}")

    # --- inference
    def session(self, task: Any):
        t = self._task_id(task)
        with self._lock:
            sess = self._sessions.get(t)
            if sess is None:
                sess = self._open_session(t)
                self._sessions[t] = sess
        return sess

    def _open_session(self, t: int):
        name, digest = self._served(t)
        path = inside(self.export_dir, name, f"the ONNX file of task {t}")
        fix = "re-export the task with anpyc export"
        data = read_regular(path, what=f"the ONNX file of task {t}", error=ExportDirError, fix=fix,
                            max_bytes=MAX_ONNX_BYTES)
        actual = sha256_bytes(data)  # the bytes onnxruntime gets are the bytes checked: a file swapped later is
        if actual != digest:  # never served
            raise ExportDirError(f"{name} does not match its sidecar (sha256 {actual[:12]}... != {digest[:12]}...): "
                                 "the file was modified or replaced", fix)
        try:
            sess = make_session(data, threads=self.threads)
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            raise ExportDirError(f"{name} (task {t}) cannot be loaded by onnxruntime ({type(e).__name__}: "
                                 f"{clip(e, 120)})", fix) from None
        del data
        self._check_session(t, sess)
        return sess

    def _check_session(self, task: int, sess: Any) -> None:
        shape = self._specs[task].shape
        inputs, outputs = sess.get_inputs(), sess.get_outputs()
        s = self._sidecars[task]
        ok = (len(inputs) == 1 and inputs[0].name == s["input_name"] and inputs[0].type == "tensor(float)"
              and len(inputs[0].shape) == 1 + len(shape)
              and all(not isinstance(d, int) or d == e for d, e in zip(inputs[0].shape[1:], shape)))
        if not ok:
            desc = [(i.name, i.type, i.shape) for i in inputs]
            raise ExportDirError(f"the ONNX model of task {task} takes {clip(desc, 120)}, its sidecar says "
                                 f"{clip(repr(s['input_name']), 40)} float [batch, {', '.join(map(str, shape))}]",
                                 "re-export the task with anpyc export")
        out = next((o for o in outputs if o.name == s["output_name"]), None)
        n = len(s["classes"])
        if out is None or len(out.shape) != 2 or (isinstance(out.shape[1], int) and out.shape[1] != n):
            desc = [(o.name, o.shape) for o in outputs]
            raise ExportDirError(f"the ONNX model of task {task} gives {clip(desc, 120)}, its sidecar says "
                                 f"{clip(repr(s['output_name']), 40)} [batch, {n}] ({n} classes)",
                                 "re-export the task with anpyc export")

    def preload(self) -> None:
        """Create every task's session now (each from the bytes whose sha256 was checked) and run it once on a
        zero input: a model that cannot load or answers in the wrong shape fails here, not on a request."""
        for t in self.task_ids:
            self._run(t, np.zeros((1, *self._specs[t].shape), np.float32), check_finite=False)

    def preprocess(self, task: Any, inputs: Any, *, names: Sequence[str] | None = None) -> np.ndarray:
        """Inputs (image paths, PIL images, encoded image bytes, or float arrays) -> float32 ``[B, *shape]``.

        ``names`` (one per input, e.g. upload file names) label the inputs in error messages.
        """
        t = self._task_id(task)
        return np.concatenate(list(self._batches(t, inputs, names)), axis=0)

    def _batches(self, t: int, inputs: Any, names: Sequence[str] | None) -> Iterator[np.ndarray]:
        """Preprocessed batches of at most ``_CHUNK`` inputs (a float array comes whole: it is already in memory)."""
        if isinstance(inputs, np.ndarray):
            yield self._array(t, inputs, "input", batch_ok=True)
            return
        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if not items:
            raise InputShapeError("no inputs given", "pass at least one image or tensor")
        for start in range(0, len(items), _CHUNK):
            yield np.stack([self._row(t, item, i, names) for i, item in enumerate(items[start:start + _CHUNK],
                                                                                 start)]).astype(np.float32)

    def _row(self, t: int, item: Any, i: int, names: Sequence[str] | None) -> np.ndarray:
        spec = self._specs[t]
        if names is not None and i < len(names):
            label = str(names[i])
        else:
            label = str(item) if isinstance(item, (str, os.PathLike)) else f"#{i}"
        if isinstance(item, np.ndarray):
            return self._array(t, item, f"input {clip(label, 80)}", batch_ok=False)[0]
        if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
            if spec.kind != "image":
                raise InputShapeError(f"task {t} takes vectors of shape {list(spec.shape)}, not images",
                                      "pass float arrays")
            return load_image(item, label, spec, self.limits)
        raise InputShapeError(f"input {clip(label, 80)} is a {type(item).__name__}",
                              "pass image paths, PIL images or numpy float arrays")

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
            got = clip(list(arr.shape), 60)
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
        self.session(t)  # the model and its sidecar agree before any input is decoded
        return np.concatenate([self._run(t, x) for x in self._batches(t, inputs, names)], axis=0)

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
        for t in ids:
            self.session(t)
        groups: dict[InputSpec, list[int]] = {}  # tasks of one export share a spec: preprocess once per spec
        for t in ids:
            groups.setdefault(self._specs[t], []).append(t)
        parts: dict[int, list[np.ndarray]] = {t: [] for t in ids}
        for tasks in groups.values():
            for x in self._batches(tasks[0], inputs, names):
                for t in tasks:
                    parts[t].append(softmax(self._run(t, x)))
        probs = {t: np.concatenate(parts[t], axis=0) for t in ids}
        conf = np.stack([1.0 - normalized_entropy(probs[t]) for t in ids], axis=1)  # [B, tasks]
        out = []
        for i, row in enumerate(conf):
            order = np.argsort(-row, kind="stable")  # stable: equal confidences keep the lower task id first
            t = ids[int(order[0])]
            out.append({"task": t, "name": self._sidecars[t].get("name"), "confidence": float(row[order[0]]),
                        "predictions": _top_k(probs[t][i:i + 1], self._sidecars[t]["classes"], top_k)[0],
                        "candidates": [{"task": ids[int(j)], "confidence": float(row[j])} for j in order]})
        return out

    def _run(self, task: int, x: np.ndarray, *, check_finite: bool = True) -> np.ndarray:
        sess = self.session(task)
        s = self._sidecars[task]
        n = len(s["classes"])
        outs = []
        for i in range(0, len(x), _CHUNK):
            try:
                y = sess.run([s["output_name"]], {s["input_name"]: x[i:i + _CHUNK]})[0]
            except Exception as e:  # inputs were checked; a failure here is the model's (or memory's)
                raise ExportDirError(f"onnxruntime failed to run the model of task {task} ({type(e).__name__}: "
                                     f"{clip(e, 120)})", "re-export the task, or send fewer inputs at once") from None
            if not isinstance(y, np.ndarray) or y.shape != (len(x[i:i + _CHUNK]), n):
                raise ExportDirError(f"the model of task {task} gives outputs of shape "
                                     f"{clip(list(getattr(y, 'shape', ())), 40)} for {len(x[i:i + _CHUNK])} "
                                     f"input(s), its sidecar lists {n} classes", "re-export the task")
            if check_finite and not np.all(np.isfinite(y)):
                bad = i + int(np.nonzero(~np.isfinite(y).all(axis=1))[0][0])
                raise InputShapeError(f"the model of task {task} gives NaN or inf for input #{bad} (values of "
                                      "extreme magnitude?)", "pass inputs preprocessed as the sidecar's input_spec "
                                      "says, or the image files themselves")
            outs.append(y)
        return np.concatenate(outs, axis=0)


def _check_top_k(top_k: Any) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise DataError(f"top_k must be a positive integer, got {clip(repr(top_k), 40)}", "pass top_k >= 1")


def _top_k(probs: np.ndarray, classes: Sequence[str], top_k: int) -> list[list[dict[str, Any]]]:
    k = min(int(top_k), probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"index": int(j), "label": classes[j], "score": float(p[j])} for j in row]
            for row, p in zip(order, probs)]


def load_export(export_dir: str | os.PathLike, *, threads: int = 1, int8: bool = False,
                limits: Limits | None = None, preload: bool = False) -> ExportedModels:
    """Open an export directory: check its manifest, every sidecar (every field, :mod:`anpyc.export.formats`)
    and every ONNX file's sha256.

    ``threads`` is onnxruntime's intra-op thread count per session (inter-op is 1). ``int8`` serves the quantized
    models (``task-NNN.int8.onnx``) instead of the float32 ones; a task without one raises when it is used.
    ``limits`` bounds what one decoded image may cost (:class:`~anpyc.export.limits.Limits`). ``preload`` creates
    every session now (:meth:`ExportedModels.preload`) instead of on first use. The sha256 is checked again on
    the bytes each session is made from, so a file replaced after this call is refused, never served.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise DataError(f"threads must be a positive integer, got {clip(repr(threads), 30)}", "pass threads >= 1")
    root = Path(export_dir).resolve()
    if not root.is_dir():
        raise ExportDirError(f"export directory {export_dir} does not exist", "check the path, or run anpyc export")
    sidecars: dict[int, dict[str, Any]] = {}
    for entry in read_manifest(root):
        s = read_sidecar(root, entry)
        files = [(s["file"], s["onnx_sha256"])] + ([(s["int8"]["file"], s["int8"]["onnx_sha256"])]
                                                    if s.get("int8") else [])
        for name, digest in files:  # fail fast; each session checks its bytes again when it is made
            actual = sha256_file(inside(root, name, f"the ONNX file of task {s['task']}"))
            if actual != digest:
                raise ExportDirError(f"{name} does not match its sidecar (sha256 {actual[:12]}... != "
                                     f"{digest[:12]}...): the file was modified or replaced",
                                     "re-export the task with anpyc export")
        sidecars[s["task"]] = s
    models = ExportedModels(root, dict(sorted(sidecars.items())), threads=threads, int8=int8, limits=limits)
    if preload:
        models.preload()
    return models
