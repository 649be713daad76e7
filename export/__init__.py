"""anpyc.export: each task as its own ONNX model (parity-checked), served with onnxruntime.

Names resolve lazily, like ``anpyc``'s: ``import anpyc.export.runtime`` (and the server) never imports torch or
onnx; only the exporter (:mod:`anpyc.export.exporter`) needs torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # torch -> ONNX
    "ExportSource": "anpyc.export.exporter",
    "export_task": "anpyc.export.exporter",
    "export_all": "anpyc.export.exporter",
    # onnxruntime (no torch)
    "load_export": "anpyc.export.runtime",
    "ExportedModels": "anpyc.export.runtime",
    "preprocess_image": "anpyc.export.runtime",
    "Limits": "anpyc.export.limits",
    # HTTP
    "create_app": "anpyc.export.server",
    "serve": "anpyc.export.server",
    # int8
    "quantize_task": "anpyc.export.quantize",
    "compare_int8": "anpyc.export.quantize",
    # errors
    "ParityError": "anpyc.export.errors",
    "ExportFailed": "anpyc.export.errors",
    "ExportDirError": "anpyc.export.errors",
    "UnknownTaskError": "anpyc.export.errors",
    "InputShapeError": "anpyc.export.errors",
    "ImageReadError": "anpyc.export.errors",
    "PayloadError": "anpyc.export.errors",
    "UnsupportedMediaType": "anpyc.export.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anpyc.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
