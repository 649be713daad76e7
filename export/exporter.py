"""Export each learned task as its own ONNX model, parity-checked against the masked dense model.

Layout of an export directory (schema in :data:`SIDECAR_KEYS` and the README's file-format section)::

    task-000.onnx   the task's physically pruned subnetwork; input "input" [batch, *shape], output "logits"
    task-000.json   its sidecar (format "anpyc.export", version 1): classes, input spec, hashes, parity, stats
    manifest.json   the tasks in the folder (format "anpyc.export.manifest", version 1); written last

Every file is written atomically, and an ONNX file is moved into place only after it passed ``onnx.checker`` and
the parity check, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

import torch

from anpyc.errors import ModelError
from anpyc.fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from anpyc.task import InputSpec

from . import onnx as _onnx
from .errors import ExportDirError, ParityError, UnknownTaskError
from .formats import MANIFEST_FORMAT, MANIFEST_VERSION, SIDECAR_FORMAT, SIDECAR_VERSION

__all__ = [
    "ExportSource",
    "CalibrationSource",
    "export_task",
    "export_all",
    "tasks_to_export",
    "task_stem",
    "SIDECAR_FORMAT",
    "SIDECAR_VERSION",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "SIDECAR_KEYS",
    "PARITY_BATCH_SIZES",
]

MANIFEST_NAME = "manifest.json"
# Batch sizes of the random parity inputs: 1 and >1, so a batch dimension that was traced as a constant fails.
PARITY_BATCH_SIZES: tuple[int, ...] = (1, 3, 2)
PARITY_SEED = 0

# Keys of a sidecar, in the order they are written.
SIDECAR_KEYS: tuple[str, ...] = (
    "format", "version", "task", "name", "classes", "num_classes", "file", "onnx_sha256", "onnx_bytes",
    "input_name", "output_name", "input_spec", "opset", "exporter", "exporter_fallback_reason", "params", "flops",
    "mask_sha256", "parity", "backbone", "anpyc_version", "torch_version", "onnx_version", "onnxruntime_version",
    "int8",
)


@runtime_checkable
class ExportSource(Protocol):
    """What the exporter needs from a trained learner (``anpyc.learner.ContinualLearner`` implements it)."""

    backbone_name: str
    input_spec: InputSpec

    def task_ids(self) -> list[int]:
        """The learned tasks."""
        ...

    def task_info(self, task: int) -> dict:
        """``{"id": int, "name": str, "classes": [str, ...]}``."""
        ...

    def subnetwork(self, task: int) -> torch.nn.Module:
        """Standalone eval float32 module with the task's units only, its head and norm stats: x -> logits."""
        ...

    def reference_forward(self, task: int, x: torch.Tensor) -> torch.Tensor:
        """The masked dense model (eval) on ``x``: the parity reference."""
        ...

    def mask_digest(self, task: int) -> str:
        """sha256 hex of the task's mask."""
        ...

    def subnetwork_stats(self, task: int) -> dict:
        """``{"params": int, "flops": int}`` of the task's subnetwork."""
        ...


@runtime_checkable
class CalibrationSource(Protocol):
    """Optional extension of :class:`ExportSource`: representative inputs for static int8 calibration."""

    def calibration_inputs(self, task: int, n: int) -> torch.Tensor:
        """Up to ``n`` preprocessed inputs ``[n, *input_spec.shape]`` from the task's training/validation data."""
        ...


def task_stem(task: int) -> str:
    """File stem of a task's artifacts: ``task-000``."""
    return f"task-{int(task):03d}"


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _parity_inputs(spec: InputSpec) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(PARITY_SEED)
    return [torch.randn(b, *spec.shape, generator=g, dtype=torch.float32) for b in PARITY_BATCH_SIZES]


def _check_task(source: ExportSource, task: int) -> None:
    valid = list(source.task_ids())
    if task not in valid:
        raise UnknownTaskError(f"task {task} is not a learned task of this run (learned: {valid})",
                               "pass one of the learned task ids, or --all")


def _check_float32(module: torch.nn.Module, task: int) -> None:
    bad = sorted({str(t.dtype) for t in list(module.parameters()) + list(module.buffers())
                  if t.is_floating_point() and t.dtype != torch.float32})
    if bad:
        raise ModelError(f"the subnetwork of task {task} holds {', '.join(bad)} tensors, export needs float32",
                         "return a float32 module from subnetwork() (call .float())")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from anpyc import __version__

    return {"anpyc_version": __version__, "torch_version": torch.__version__.split("+")[0],
            "onnx_version": onnx.__version__, "onnxruntime_version": onnxruntime.__version__}


def _export_one(source: ExportSource, task: int, out_dir: Path, *, opset: int | None, parity_atol: float,
                threads: int) -> dict[str, Any]:
    _check_task(source, task)
    info = source.task_info(task)
    classes = [str(c) for c in info["classes"]]
    spec = source.input_spec
    module = source.subnetwork(task).eval()
    _check_float32(module, task)

    inputs = _parity_inputs(spec)
    with torch.no_grad():
        sub_out = [module(x).detach().float().numpy() for x in inputs]
        ref_out = [source.reference_forward(task, x).detach().float().numpy() for x in inputs]
    for x, y in zip(inputs, sub_out):
        if tuple(y.shape) != (x.shape[0], len(classes)):
            raise ModelError(f"the subnetwork of task {task} maps a [{x.shape[0]}, *{list(spec.shape)}] batch to "
                             f"{list(y.shape)}, expected logits [{x.shape[0]}, {len(classes)}] (one per class)",
                             "return the task's head with subnetwork(); its width must match task_info's classes")

    stem = task_stem(task)
    with tempfile.TemporaryDirectory(prefix=".anpyc-export-") as tmp:
        candidate = Path(tmp) / f"{stem}.onnx"
        result = _onnx.export_verified(module, inputs, sub_out, candidate, opset=opset, atol=parity_atol,
                                       threads=threads)
        ref_diff = _onnx.max_abs_diff(result.outputs, ref_out)
        scale = _onnx.output_scale(ref_out)
        if not ref_diff <= parity_atol * scale:
            torch_diff = _onnx.max_abs_diff(sub_out, ref_out)
            if not torch_diff <= parity_atol * scale:
                raise ParityError(
                    f"task {task}: the pruned subnetwork differs from the masked reference model by {torch_diff:.3g} "
                    f"(> atol {parity_atol:g} x output scale {scale:.3g}) already in torch, so the ONNX file was "
                    "not written",
                    "this is a subnetwork-extraction bug; report it with the backbone name "
                    f"({source.backbone_name}) and use the run in torch meanwhile")
            raise ParityError(
                f"task {task}: the ONNX model differs from the masked reference model by {ref_diff:.3g} "
                f"(> atol {parity_atol:g} x output scale {scale:.3g}), so the ONNX file was not written",
                "try another --opset, or report the model")
        data = candidate.read_bytes()

    onnx_path = out_dir / f"{stem}.onnx"
    atomic_write_bytes(onnx_path, data)
    stats = source.subnetwork_stats(task)
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "task": int(task),
        "name": str(info.get("name", stem)),
        "classes": classes,
        "num_classes": len(classes),
        "file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "onnx_bytes": len(data),
        "input_name": _onnx.INPUT_NAME,
        "output_name": _onnx.OUTPUT_NAME,
        "input_spec": spec.to_dict(),
        "opset": result.opset,
        "exporter": result.exporter,
        "exporter_fallback_reason": result.fallback_reason,
        "params": int(stats["params"]),
        "flops": int(stats["flops"]),
        "mask_sha256": str(source.mask_digest(task)),
        "parity": {
            "reference": "reference_forward (masked dense model, torch) vs onnxruntime CPU",
            "max_abs_diff": ref_diff,
            "subnetwork_max_abs_diff": result.module_max_abs_diff,
            "atol": parity_atol,
            "output_scale": scale,  # the rule: max_abs_diff <= atol * output_scale (largest |logit|, at least 1)
            "batch_sizes": list(PARITY_BATCH_SIZES),
            "seed": PARITY_SEED,
        },
        "backbone": str(source.backbone_name),
        **_versions(),
        "int8": None,
    }
    assert tuple(sidecar) == SIDECAR_KEYS
    atomic_write_json(out_dir / f"{stem}.json", sidecar)
    return sidecar


def _write_manifest(out_dir: Path, source: ExportSource, sidecars: Iterable[dict[str, Any]]) -> dict[str, Any]:
    from anpyc import __version__

    path = out_dir / MANIFEST_NAME
    entries: dict[int, dict[str, Any]] = {}
    if path.exists():
        old = read_json(path, what="export manifest")
        if not isinstance(old, dict) or old.get("format") != MANIFEST_FORMAT:
            raise ExportDirError(f"{path} is not an anpyc export manifest", "export into an empty folder (--out)")
        if old.get("backbone") != source.backbone_name:
            raise ExportDirError(f"{out_dir} already holds exports of backbone {old.get('backbone')!r}, "
                                 f"not {source.backbone_name!r}", "export into another folder (--out)")
        entries = {int(e["id"]): e for e in old.get("tasks", [])}
    for s in sidecars:
        entries[s["task"]] = {"id": s["task"], "name": s["name"], "sidecar": f"{task_stem(s['task'])}.json"}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "backbone": str(source.backbone_name),
        "anpyc_version": __version__,
        "tasks": [entries[k] for k in sorted(entries)],
    }
    atomic_write_json(path, manifest)
    return manifest


def export_task(source: ExportSource, task: int, out_dir: str | os.PathLike, *, opset: int | None = None,
                parity_atol: float = 1e-4, threads: int | None = None) -> dict[str, Any]:
    """Export one task to ``out_dir/task-NNN.onnx`` + sidecar, update the manifest; returns the sidecar.

    Raises :class:`ParityError` (nothing written) when onnxruntime and ``source.reference_forward`` differ by more
    than ``parity_atol`` times the logits' scale (their largest absolute value, at least 1:
    :func:`anpyc.export.onnx.output_scale`) on random inputs of batch sizes :data:`PARITY_BATCH_SIZES`. ``threads`` sets onnxruntime's
    intra-op threads for the check.
    """
    out = Path(out_dir)
    sidecar = _export_one(source, int(task), out, opset=opset, parity_atol=parity_atol,
                          threads=threads or _default_threads())
    _write_manifest(out, source, [sidecar])
    return sidecar


def tasks_to_export(source: ExportSource, tasks: Iterable[int] | None = None) -> list[int]:
    """The task ids :func:`export_all` would export (every learned task, or ``tasks``); raises
    :class:`UnknownTaskError` for an id the run has not learned, or a run with no task. Callers check with it before
    they open anything (the CLI, before its log), so a bad id changes no file."""
    ids = list(source.task_ids()) if tasks is None else [int(t) for t in tasks]
    for t in ids:
        _check_task(source, t)
    if not ids:
        raise UnknownTaskError("the run has no learned task to export", "train at least one task first")
    return ids


def export_all(source: ExportSource, out_dir: str | os.PathLike, tasks: Iterable[int] | None = None, *,
               opset: int | None = None, parity_atol: float = 1e-4, threads: int | None = None) -> list[dict[str, Any]]:
    """Export every learned task (or ``tasks``) in one call; the manifest is written once, after the last task.

    Tasks are exported in order; if one fails, the ones before it stay written (each is complete and verified) but
    the manifest is not updated, and the error says which task failed.
    """
    out = Path(out_dir)
    ids = tasks_to_export(source, tasks)
    threads = threads or _default_threads()
    sidecars = []
    for t in ids:
        sidecars.append(_export_one(source, t, out, opset=opset, parity_atol=parity_atol, threads=threads))
    _write_manifest(out, source, sidecars)
    return sidecars
