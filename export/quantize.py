"""int8 versions of exported task models (onnxruntime quantization) and what they cost in accuracy and gain in speed.

Two modes:

* ``dynamic``: weights of MatMul/Gemm quantized to int8 ahead of time, activations quantized on the fly. Needs no
  data; helps transformers and MLPs. Convolutions stay float32 (onnxruntime's CPU ``ConvInteger`` kernel only takes
  uint8 weights and is rarely faster).
* ``static``: QDQ format, int8 per-channel weights and uint8 activations with ranges calibrated (MinMax) on
  representative inputs. Applies to convolutions too, so it is the mode for CNNs; it needs calibration inputs.

``auto`` picks ``static`` when calibration inputs are given, ``dynamic`` otherwise. The int8 file is written beside
the float32 one (``task-000.int8.onnx``) and described under the sidecar's ``int8`` key.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from anpyc.errors import DataError, clip

from .errors import ExportFailed
from .runtime import ExportedModels, load_export, make_session

__all__ = ["quantize_task", "compare_int8", "QUANT_MODES"]

QUANT_MODES = ("auto", "dynamic", "static")
DYNAMIC_OP_TYPES = ("MatMul", "Gemm")


class _Reader:
    """onnxruntime CalibrationDataReader over a float array, in batches."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 8):
        self._batches = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover - called by some onnxruntime versions only
        pass


def _preprocess(src: Path, dst: Path) -> bool:
    """onnxruntime's recommended pre-quantization pass (shape inference + graph optimisation); False if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return True
    except Exception:  # symbolic shape inference does not cover every graph; quantizing the raw graph still works
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            return True
        except Exception:
            return False


def quantize_task(export_dir: str | os.PathLike, task: int, *, mode: str = "auto", calibration: Any = None,
                  per_channel: bool = True, threads: int = 1) -> dict[str, Any]:
    """Write ``task-NNN.int8.onnx`` for an exported task and record it in the sidecar; returns the ``int8`` entry.

    ``calibration`` (for ``static``) is anything :meth:`ExportedModels.preprocess` accepts: image paths, PIL
    images or float arrays ``[N, *shape]``; a few dozen representative samples are enough.
    """
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    from anpyc.fileio import atomic_write_bytes, atomic_write_json, sha256_file

    if mode not in QUANT_MODES:
        raise DataError(f"unknown quantization mode {mode!r}", f"use one of {list(QUANT_MODES)}")
    models = load_export(export_dir, threads=threads)
    sidecar = models.sidecar(task)
    t = int(sidecar["task"])
    if mode == "auto":
        mode = "static" if calibration is not None else "dynamic"
    calib = None
    if mode == "static":
        if calibration is None:
            raise DataError("static int8 quantization needs calibration inputs",
                            "pass calibration samples, or use mode='dynamic'")
        calib = models.preprocess(t, calibration)
    fp32 = models.export_dir / sidecar["file"]
    out_name = f"{Path(sidecar['file']).stem}.int8.onnx"

    with tempfile.TemporaryDirectory(prefix=".anpyc-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        preprocessed = _preprocess(fp32, pre)
        src = pre if preprocessed else fp32
        dst = Path(tmp) / out_name
        try:
            if mode == "dynamic":
                quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                                 op_types_to_quantize=list(DYNAMIC_OP_TYPES))
            else:
                quantize_static(str(src), str(dst), _Reader(sidecar["input_name"], calib),
                                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
            probe = calib[:2] if calib is not None else np.zeros((2, *models.input_spec(t).shape), np.float32)
            out = make_session(dst, threads=threads).run([sidecar["output_name"]], {sidecar["input_name"]: probe})[0]
            if out.shape != (len(probe), sidecar["num_classes"]) or not np.all(np.isfinite(out)):
                raise ValueError(f"the int8 model returns {out.shape} / non-finite logits")
        except Exception as e:
            raise ExportFailed(f"{mode} int8 quantization of task {t} failed ({type(e).__name__}: "
                               f"{clip(e, 300)})",
                               "try the other mode (dynamic/static), or serve the float32 model") from None
        data = dst.read_bytes()

    out_path = models.export_dir / out_name
    atomic_write_bytes(out_path, data)
    entry = {
        "file": out_name,
        "onnx_sha256": sha256_file(out_path),
        "onnx_bytes": len(data),
        "mode": mode,
        "format": "QOperator (dynamic)" if mode == "dynamic" else "QDQ",
        "weight_type": "int8",
        "activation_type": "uint8 (dynamic)" if mode == "dynamic" else "uint8",
        "per_channel": bool(per_channel),
        "op_types": list(DYNAMIC_OP_TYPES) if mode == "dynamic" else "all supported",
        "calibration_samples": 0 if calib is None else int(len(calib)),
        "calibration_method": None if mode == "dynamic" else "MinMax",
        "preprocessed": preprocessed,
        "evaluation": None,
    }
    full = dict(sidecar)
    full["int8"] = entry
    atomic_write_json(models.export_dir / f"{Path(sidecar['file']).stem}.json", full)
    return entry


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare_int8(export_dir: str | os.PathLike, task: int, inputs: Any, labels: Any = None, *, threads: int = 1,
                 repeats: int = 20, warmup: int = 3, record: bool = False, note: str | None = None) -> dict[str, Any]:
    """Accuracy change and speed-up of the int8 model vs float32, measured in one run on the same inputs.

    Returns top-1 agreement, accuracy of each model when ``labels`` are given, the largest softmax-score change,
    and the median latency of one forward pass over all ``inputs`` for each model (``threads`` intra-op threads,
    passes interleaved so both see the same machine state). ``record`` stores the result in the sidecar, with
    ``note`` saying what the inputs were.
    """
    fp32 = load_export(export_dir, threads=threads)
    int8: ExportedModels = load_export(export_dir, threads=threads, int8=True)
    t = int(fp32.sidecar(task)["task"])
    x = fp32.preprocess(t, inputs)
    s = fp32.sidecar(t)
    sess32, sess8 = fp32.session(t), int8.session(t)
    feed = {s["input_name"]: x}
    out32 = sess32.run([s["output_name"]], feed)[0]
    out8 = sess8.run([s["output_name"]], feed)[0]
    from .runtime import softmax

    p32, p8 = softmax(out32), softmax(out8)
    top32, top8 = p32.argmax(1), p8.argmax(1)
    result: dict[str, Any] = {
        "inputs": note,
        "samples": int(len(x)),
        "top1_agreement": float(np.mean(top32 == top8)),
        "max_score_change": float(np.abs(p32 - p8).max()),
        "max_logit_change": float(np.abs(out32 - out8).max()),
    }
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        if len(y) != len(x):
            raise DataError(f"{len(y)} labels for {len(x)} inputs", "pass one label per input")
        result["accuracy_fp32"] = float(np.mean(top32 == y))
        result["accuracy_int8"] = float(np.mean(top8 == y))
        result["accuracy_change"] = result["accuracy_int8"] - result["accuracy_fp32"]
    for _ in range(warmup):
        sess32.run(None, feed)
        sess8.run(None, feed)
    t32, t8 = [], []
    for _ in range(repeats):  # interleaved: drift in machine load hits both models alike
        t32.append(_timed(lambda: sess32.run(None, feed)))
        t8.append(_timed(lambda: sess8.run(None, feed)))
    m32, m8 = float(np.median(t32)), float(np.median(t8))
    result.update({
        "threads": int(threads),
        "batch": int(len(x)),
        "latency_ms_fp32": 1e3 * m32,
        "latency_ms_int8": 1e3 * m8,
        "speedup": m32 / m8 if m8 > 0 else float("inf"),
        "bytes_fp32": int(s["onnx_bytes"]),
        "bytes_int8": int(int8.sidecar(t)["int8"]["onnx_bytes"]),
    })
    if record:
        from anpyc.fileio import atomic_write_json

        full = int8.sidecar(t)
        full = dict(full, int8=dict(full["int8"], evaluation=result))
        atomic_write_json(int8.export_dir / f"{Path(s['file']).stem}.json", full)
    return result
