"""Typed, bounded reads of the JSON documents anpyc reads back: every field of run.json, state.json, a mask file's
schema, an export's sidecars and manifest, and data.json is read through a :class:`Fields`, which checks its type
and bounds and raises one line naming the file, the field and the fix.

    f = Fields(doc, "run manifest runs/x/run.json", error=RunDirError, fix="restore run.json or re-create the run")
    gen = f.int("generation", low=1, null=True)     # 'generation' is the string '3', not an integer or null (...)
    files = f.mapping("files", max_len=64)

The library is the standard library only (the onnxruntime side uses it without torch). pydantic would do the
typing, but it is not a dependency of anpyc's core (it comes with the serving extra), its lax mode coerces ("3" to
3) where a file that says "3" is malformed, and its errors are multi-line lists; the few dozen fields anpyc reads
are checked here in one line each, with bounds (counts, sizes, ranges) the files' own schemas promise.
"""

from __future__ import annotations

import math
import re
from typing import Any, NoReturn

from .errors import AnpycError, StateFileError, clip

__all__ = ["Fields", "describe", "MAX_TASKS", "MAX_CLASSES", "MAX_NAME", "MAX_INT", "MAX_LIST", "PLAIN_NAME",
           "SHA256", "check_plain_name"]

MAX_TASKS = 32766  # owner ids are int16 past 254 tasks; 32767 is the free marker (anpyc.masks)
MAX_CLASSES = 100_000  # classes of one task (ImageNet-21k has 21,841)
MAX_NAME = 1024  # characters of a task, class, group or tensor name
MAX_INT = 2 ** 53  # no count, size or index in a file anpyc writes comes near it (and floats hold it exactly)
MAX_LIST = 1_000_000  # entries of any list a file holds (units are a tensor, not a JSON list)
# A plain file name: no folder part, no "..", no leading dot, nothing a shell or a path would read specially.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")

_MISSING = object()


def describe(value: Any) -> str:
    """A JSON value as a phrase for an error message: 'the string \\'3\\'', 'a list of 3 items', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"the integer {clip(value, 24)}"
    if isinstance(value, float):
        return f"the number {clip(repr(value), 24)}"
    if isinstance(value, str):
        return f"the string {clip(repr(value), 40)}"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return f"an object of {len(value)} key{'s' if len(value) != 1 else ''}"
    return f"a {type(value).__name__}"


def check_plain_name(name: Any, what: str, error: type[AnpycError], fix: str) -> str:
    """``name`` if it is a plain file name (:data:`PLAIN_NAME`: no folder, no '..', no leading dot)."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise error(f"{what} {describe(name)} is not a plain file name", fix)
    return name


class Fields:
    """The fields of one JSON object, read with their types and bounds checked.

    ``where`` names the document (and ``path`` the object inside it), ``error`` is the exception raised and ``fix``
    its advice. Keys a reader does not ask for are ignored (files may carry more than this anpyc reads).
    """

    def __init__(self, doc: Any, where: str, *, error: type[AnpycError] = StateFileError, fix: str,
                 path: str = ""):
        self.where, self.error, self.fix, self.path = where, error, fix, path
        if not isinstance(doc, dict):
            raise error(f"{where}: {self._label(None)} is {describe(doc)}, not an object", fix)
        self.doc = doc

    # ------------------------------------------------------------------ plumbing
    def _label(self, key: Any) -> str:
        name = self.path if key is None else (f"{self.path}.{key}" if self.path and not isinstance(key, int)
                                              else f"{self.path}[{key}]" if isinstance(key, int) else str(key))
        return f"field {clip(name, 60)!r}" if name else "the document"

    def fail(self, key: Any, problem: str) -> NoReturn:
        """Raise the error for field ``key``: '<where>: field 'k' <problem> (<fix>)'."""
        raise self.error(f"{self.where}: {self._label(key)} {problem}", self.fix)

    def _get(self, key: str, optional: bool, default: Any) -> Any:
        if key in self.doc:
            return self.doc[key]
        if optional:
            return default
        self.fail(key, "is missing")

    def has(self, key: str) -> bool:
        return key in self.doc

    def child(self, key: Any, value: Any) -> "Fields":
        path = f"{self.path}.{key}" if self.path and not isinstance(key, int) else \
            f"{self.path}[{key}]" if isinstance(key, int) else str(key)
        return Fields(value, self.where, error=self.error, fix=self.fix, path=path)

    # ------------------------------------------------------------------ scalars
    def int(self, key: str, *, low: int | None = None, high: int = MAX_INT, optional: bool = False,
            default: Any = None, null: bool = False) -> Any:
        v = self._get(key, optional, _MISSING)
        if v is _MISSING or (v is None and null):
            return default if v is _MISSING else None
        return self.check_int(key, v, low=low, high=high, null=null)

    def check_int(self, key: Any, v: Any, *, low: int | None = None, high: int = MAX_INT, null: bool = False) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"is {describe(v)}, not an integer{' or null' if null else ''}")
        lo = -MAX_INT if low is None else low
        if not lo <= v <= high:
            self.fail(key, f"is {describe(v)}, outside {lo}..{high}")
        return v

    def number(self, key: str, *, low: float | None = None, high: float | None = None, optional: bool = False,
               default: Any = None, null: bool = False) -> Any:
        v = self._get(key, optional, _MISSING)
        if v is _MISSING or (v is None and null):
            return default if v is _MISSING else None
        return self.check_number(key, v, low=low, high=high, null=null)

    def check_number(self, key: Any, v: Any, *, low: float | None = None, high: float | None = None,
                     null: bool = False) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(key, f"is {describe(v)}, not a number{' or null' if null else ''}")
        if isinstance(v, int) and abs(v) > MAX_INT:
            self.fail(key, f"is {describe(v)}, beyond +-{MAX_INT}")
        if not math.isfinite(v):
            self.fail(key, f"is {describe(v)}, not a finite number")
        if (low is not None and v < low) or (high is not None and v > high):
            span = f"{low:g}..{high:g}" if low is not None and high is not None else \
                f">= {low:g}" if low is not None else f"<= {high:g}"
            self.fail(key, f"is {describe(v)}, outside {span}")
        return float(v)

    def string(self, key: str, *, max_len: int = MAX_NAME, choices: Any = None, pattern: re.Pattern | None = None,
               optional: bool = False, default: Any = None, null: bool = False) -> Any:
        v = self._get(key, optional, _MISSING)
        if v is _MISSING or (v is None and null):
            return default if v is _MISSING else None
        return self.check_string(key, v, max_len=max_len, choices=choices, pattern=pattern, null=null)

    def check_string(self, key: Any, v: Any, *, max_len: int = MAX_NAME, choices: Any = None,
                     pattern: re.Pattern | None = None, null: bool = False) -> str:
        if not isinstance(v, str):
            self.fail(key, f"is {describe(v)}, not a string{' or null' if null else ''}")
        if len(v) > max_len:
            self.fail(key, f"is a string of {len(v)} characters, longer than {max_len}")
        if choices is not None and v not in choices:
            self.fail(key, f"is {describe(v)}, not one of {clip(', '.join(sorted(map(str, choices))), 80)}")
        if pattern is not None and not pattern.fullmatch(v):
            self.fail(key, f"is {describe(v)}, not of the form {clip(pattern.pattern, 60)}")
        return v

    def boolean(self, key: str, *, optional: bool = False, default: Any = None) -> Any:
        v = self._get(key, optional, _MISSING)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            self.fail(key, f"is {describe(v)}, not true or false")
        return v

    # ------------------------------------------------------------------ containers
    def list(self, key: str, *, max_len: int = MAX_LIST, min_len: int = 0, optional: bool = False,
             default: Any = None, null: bool = False) -> Any:
        v = self._get(key, optional, _MISSING)
        if v is _MISSING or (v is None and null):
            return default if v is _MISSING else None
        if not isinstance(v, list):
            self.fail(key, f"is {describe(v)}, not a list{' or null' if null else ''}")
        if not min_len <= len(v) <= max_len:
            self.fail(key, f"has {len(v)} entries, outside {min_len}..{max_len}")
        return v

    def mapping(self, key: str, *, max_len: int = MAX_LIST, optional: bool = False, default: Any = None,
                null: bool = False) -> Any:
        v = self._get(key, optional, _MISSING)
        if v is _MISSING or (v is None and null):
            return default if v is _MISSING else None
        if not isinstance(v, dict):
            self.fail(key, f"is {describe(v)}, not an object{' or null' if null else ''}")
        if len(v) > max_len:
            self.fail(key, f"has {len(v)} keys, more than {max_len}")
        return v

    def object(self, key: str, *, optional: bool = False, null: bool = False) -> "Fields | None":
        v = self._get(key, optional, _MISSING)
        if v is _MISSING or (v is None and null):
            return None
        if not isinstance(v, dict):
            self.fail(key, f"is {describe(v)}, not an object{' or null' if null else ''}")
        return self.child(key, v)

    def objects(self, key: str, *, max_len: int = MAX_LIST, optional: bool = False) -> "list[Fields]":
        """A list of objects, each as a :class:`Fields` (a missing optional list is empty)."""
        items = self.list(key, max_len=max_len, optional=optional, default=[])
        return [Fields(v, self.where, error=self.error, fix=self.fix, path=_index(self.path, key, i))
                for i, v in enumerate(items)]

    def ints(self, key: str, *, low: int | None = None, high: int = MAX_INT, max_len: int = MAX_LIST,
             min_len: int = 0, optional: bool = False, default: Any = None) -> Any:
        items = self.list(key, max_len=max_len, min_len=min_len, optional=optional, default=_MISSING)
        if items is _MISSING:
            return default
        return [self.check_int(f"{key}[{i}]", v, low=low, high=high) for i, v in enumerate(items)]

    def numbers(self, key: str, *, low: float | None = None, high: float | None = None, max_len: int = MAX_LIST,
                min_len: int = 0, optional: bool = False, default: Any = None, null_items: bool = False) -> Any:
        items = self.list(key, max_len=max_len, min_len=min_len, optional=optional, default=_MISSING)
        if items is _MISSING:
            return default
        return [None if (v is None and null_items) else
                self.check_number(f"{key}[{i}]", v, low=low, high=high, null=null_items) for i, v in enumerate(items)]

    def strings(self, key: str, *, max_len: int = MAX_LIST, min_len: int = 0, item_len: int = MAX_NAME,
                optional: bool = False, default: Any = None) -> Any:
        items = self.list(key, max_len=max_len, min_len=min_len, optional=optional, default=_MISSING)
        if items is _MISSING:
            return default
        return [self.check_string(f"{key}[{i}]", v, max_len=item_len) for i, v in enumerate(items)]


def _index(path: str, key: str, i: int) -> str:
    return f"{path}.{key}[{i}]" if path else f"{key}[{i}]"
