"""Every file helper in one place (kept for code that imports ``anpyc.io``): :mod:`anpyc.fileio` (atomic files,
JSON, hashing; no torch) and :mod:`anpyc.tensorio` (safetensors state files). New code imports those directly."""

from .fileio import (append_jsonl, atomic_write_bytes, atomic_write_json, finite, read_json, read_jsonl, sha256_bytes,
                     sha256_file)
from .tensorio import load_tensors, read_metadata, save_tensors

__all__ = ["atomic_write_bytes", "atomic_write_json", "append_jsonl", "read_jsonl", "read_json", "save_tensors",
           "load_tensors", "read_metadata", "sha256_file", "sha256_bytes", "finite"]
