"""Errors raised by export, runtime and server; all are :class:`anpyc.errors.AnpycError` (one line: problem + fix).

This module imports nothing heavy, so the runtime and the server can use it without torch. The server maps each
class to an HTTP status (see ``anpyc.export.server``).
"""

from __future__ import annotations

from anpyc.errors import AnpycError, DataError, ModelError, StateFileError

__all__ = [
    "ParityError",
    "ExportFailed",
    "ExportDirError",
    "UnknownTaskError",
    "InputShapeError",
    "ImageReadError",
    "PayloadError",
    "UnsupportedMediaType",
]


class ParityError(ModelError):
    """The exported ONNX model does not reproduce the reference (masked dense) model within tolerance."""


class ExportFailed(ModelError):
    """Neither the dynamo nor the TorchScript exporter could produce a valid ONNX model."""


class ExportDirError(StateFileError):
    """An export directory, its manifest or a sidecar is missing, foreign, tampered with or escapes the folder."""


class UnknownTaskError(AnpycError):
    """A task id that the export directory does not hold."""


class InputShapeError(DataError):
    """An input tensor of the wrong shape, channel count or dtype for the task's model."""


class ImageReadError(DataError):
    """An image file or upload that PIL cannot decode."""


class PayloadError(DataError):
    """A request body that is not what the endpoint accepts (garbage JSON, missing field, no files)."""


class UnsupportedMediaType(PayloadError):
    """A request body of a content type the endpoint does not read (it takes JSON or multipart images)."""
