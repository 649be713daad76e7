"""The export directory's file formats, defined once for the writer (:mod:`anpyc.export.exporter`, torch) and the
reader (:mod:`anpyc.export.runtime`, no torch): ``task-NNN.json`` sidecars and ``manifest.json``."""

from __future__ import annotations

__all__ = ["SIDECAR_FORMAT", "SIDECAR_VERSION", "MANIFEST_FORMAT", "MANIFEST_VERSION", "READ_VERSIONS"]

SIDECAR_FORMAT = "anpyc.export"
SIDECAR_VERSION = 1
MANIFEST_FORMAT = "anpyc.export.manifest"
MANIFEST_VERSION = 1
READ_VERSIONS = (1,)  # sidecar and manifest versions this anpyc reads
