"""torch module -> one verified ONNX file: the dynamo exporter first, the TorchScript exporter as a fallback.

A candidate counts as exported only when ``onnx.checker`` accepts it, onnxruntime (CPU) loads it, and it reproduces
the torch module on batches of several sizes (which proves the batch dimension really is dynamic). The exporter that
produced the accepted file, and why the dynamo one was passed over, are returned so the sidecar can say so.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from anpyc.errors import clip

from .errors import ExportFailed, ParityError
from .runtime import make_session

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ExportResult", "export_verified", "onnx_opset", "max_abs_diff", "output_scale"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_verified` accepted: the exporter, the opset, and the ONNX outputs on the check inputs."""

    exporter: str  # "dynamo" | "torchscript"
    opset: int
    outputs: list[np.ndarray]
    module_max_abs_diff: float
    fallback_reason: str | None = None
    attempts: list[dict] = field(default_factory=list)


def onnx_opset(path: str | os.PathLike) -> int:
    """The default-domain opset of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ExportFailed(f"{path} declares no default-domain opset", "re-export the model")


def output_scale(expected: Sequence[np.ndarray]) -> float:
    """What a parity tolerance is relative to: the largest absolute expected output, at least 1. float32 rounding
    grows with the values it rounds: a model whose logits reach 50 (deep multi-branch blocks) differs between two
    correct runtimes by a few 1e-4 where one with logits of 5 differs by 1e-5 (the walk's parity rule is the same)."""
    peaks = [float(np.abs(e).max()) for e in expected if e.size and np.all(np.isfinite(e))]
    return max([1.0, *peaks])


def max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Largest absolute difference over pairs of arrays; ``inf`` when shapes differ or values are not finite."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        d = np.abs(x.astype(np.float64) - y.astype(np.float64))
        if d.size:
            if not np.all(np.isfinite(d)):
                return float("inf")
            worst = max(worst, float(d.max()))
    return worst


def _export_dynamo(module: torch.nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    """The dynamo exporter; when its graph optimiser leaves an invalid graph (gemma4_vit: a Clip reading a value
    no earlier node produces), the same export again without the optimiser."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    for optimize in (True, False):
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            optimize=optimize,
            verbose=False,
        )
        try:
            onnx.checker.check_model(str(path))
            return
        except onnx.checker.ValidationError:
            if not optimize:
                raise


def _export_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice; the sidecar records its use
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )


_EXPORTERS: dict[str, Callable[[torch.nn.Module, torch.Tensor, Path, int | None], None]] = {
    "dynamo": _export_dynamo,
    "torchscript": _export_torchscript,
}


class _Mismatch(ValueError):
    def __init__(self, diff: float, tolerance: float):
        self.diff = diff
        super().__init__(f"onnxruntime output differs from the torch module by {diff:.3g} > {tolerance:.3g}")


def _summary(e: BaseException) -> str:
    text = clip(e, 300)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _verify(path: Path, inputs: Sequence[torch.Tensor], threads: int) -> list[np.ndarray]:
    import onnx

    onnx.checker.check_model(str(path))
    sess = make_session(path, threads=threads)  # the runtime's own settings
    names = [i.name for i in sess.get_inputs()]
    if names != [INPUT_NAME]:
        raise ValueError(f"graph inputs are {names}, expected [{INPUT_NAME!r}]")
    return [sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0] for x in inputs]


def export_verified(
    module: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    expected: Sequence[np.ndarray],
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    atol: float = 1e-4,
    threads: int = 1,
    exporters: Sequence[str] = ("dynamo", "torchscript"),
) -> ExportResult:
    """Export ``module`` to ``path`` and check it against ``expected`` (the module's own outputs on ``inputs``):
    the largest difference may be ``atol`` times :func:`output_scale` of ``expected``.

    ``inputs`` must include batches of different sizes. Tries each exporter in order and keeps the first file that
    passes; otherwise raises :class:`ParityError` if some exporter produced a runnable model that differs
    numerically, :class:`ExportFailed` (naming every attempt's failure) if none did. ``path`` should lie in a private
    temporary folder: a rejected candidate is deleted, an accepted one is left for the caller to move into place.
    """
    path = Path(path)
    example = max(inputs, key=lambda x: x.shape[0])
    if example.shape[0] < 2:
        raise ValueError("export_verified needs a check input with batch > 1 to trace a dynamic batch dimension")
    attempts: list[dict] = []
    scale = output_scale(expected)
    tolerance = atol * scale
    for name in exporters:
        try:
            with torch.no_grad():
                _EXPORTERS[name](module, example, path, opset)
            got = onnx_opset(path)
            if opset is not None and got != opset:  # dynamo falls back to its own opset when conversion fails
                raise ValueError(f"produced opset {got} instead of the requested {opset}")
            outputs = _verify(path, inputs, threads)
            diff = max_abs_diff(outputs, expected)
            if not diff <= tolerance:
                raise _Mismatch(diff, tolerance)
        except Exception as e:  # any exporter/checker/runtime failure: record it and try the next exporter
            attempts.append({"exporter": name, "ok": False, "error": _summary(e),
                             "diff": e.diff if isinstance(e, _Mismatch) else None})
            path.unlink(missing_ok=True)
            continue
        attempts.append({"exporter": name, "ok": True, "error": None})
        reason = None
        if len(attempts) > 1:
            reason = "; ".join(f"{a['exporter']} failed: {a['error']}" for a in attempts[:-1])
        return ExportResult(name, got, outputs, diff, reason, attempts)
    detail = " | ".join(f"{a['exporter']}: {a['error']}" for a in attempts)
    diffs = [a["diff"] for a in attempts if a["diff"] is not None]
    if diffs:
        raise ParityError(
            f"the ONNX export of {type(module).__name__} differs from the torch subnetwork by {min(diffs):.3g} "
            f"(> atol {atol:g} x output scale {scale:.3g}) with every exporter ({detail}), so no file was written",
            "try another --opset or a looser parity tolerance, or report the model")
    raise ExportFailed(
        f"could not export {type(module).__name__} to ONNX ({detail})",
        "try another --opset, or report the model; a torch-only subnetwork can still be evaluated with anpyc",
    )
