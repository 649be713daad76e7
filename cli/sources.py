"""Where a run's data comes from, for ``anpyc train`` and ``anpyc eval``: a benchmark stream, a folder or a manifest.

``--data`` is a benchmark name (``anpyc.adapters.data.list_streams()``), a folder in the layout
``root/<task>/{train,val,test}/<class>/<images>``, or a ``.csv``/``.json`` manifest of ``task,split,path,label``
records. ``anpyc train`` records the choice as ``RUN/data.json`` so that ``anpyc eval RUN`` and
``anpyc train --resume`` rebuild the same stream::

    {"format": "anpyc.cli.data", "version": 1,
     "kind": "benchmark" | "folder" | "manifest",
     "source": "digits-split" | "/absolute/path",
     "options": {...keyword arguments of the stream builder...},
     "tasks": 3 | null}                      # the first N tasks of the stream, or all

The core never reads this file; a run trained from Python has none, and ``anpyc eval`` then needs ``--data``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataSource", "resolve_source", "read_source", "write_source", "DATA_FILE", "DATA_FORMAT", "DATA_VERSION"]

DATA_FILE = "data.json"
DATA_FORMAT = "anpyc.cli.data"
DATA_VERSION = 1
MANIFEST_SUFFIXES = (".csv", ".json")
_GENERIC = ("folder", "manifest")  # registered streams that take a path: users pass the path itself
LAYOUT = "a folder root/<task>/train/<class>/<images>, or a .csv/.json manifest of task,split,path,label"


@dataclass(frozen=True)
class DataSource:
    """A resolved ``--data``: what to build, with which builder options, and how many of its tasks."""

    kind: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    tasks: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": DATA_FORMAT, "version": DATA_VERSION, "kind": self.kind, "source": self.source,
                "options": dict(self.options), "tasks": self.tasks}

    @classmethod
    def from_dict(cls, doc: Any, where: str) -> "DataSource":
        """The record in ``doc`` with every field checked: kind, a source name or path (at most 4,096 characters),
        at most 64 options of plain JSON values (names of at most 64 characters), a task count or null."""
        from anpyc.errors import RunDirError, clip
        from anpyc.validate import MAX_TASKS, Fields

        fix = "pass --data BENCHMARK|DIR to say what to use"
        if not isinstance(doc, dict) or doc.get("format") != DATA_FORMAT:
            raise RunDirError(f"{where} is not an anpyc data record", fix)
        version = doc.get("version")
        if isinstance(version, bool) or version != DATA_VERSION:
            raise RunDirError(f"{where} has version {clip(version, 30)}, this anpyc reads {DATA_VERSION}", fix)
        f = Fields(doc, where, error=RunDirError, fix=fix)
        kind = f.string("kind", choices=("benchmark", *_GENERIC))
        source = f.string("source", max_len=4096)
        options = f.mapping("options", max_len=64, optional=True, null=True, default={}) or {}
        for key, value in options.items():
            f.check_string("options", key, max_len=64)
            if not _plain_value(value):
                f.fail(f"options.{key}", "is not a plain value (a string, number, true/false, null or a short list "
                                         "of them)")
        tasks = f.int("tasks", low=1, high=MAX_TASKS, optional=True, null=True)
        return cls(kind, source, dict(options), tasks)

    def describe(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in self.options.items())
        first = f", first {self.tasks} tasks" if self.tasks else ""
        return f"{self.kind} {self.source}{' (' + opts + ')' if opts else ''}{first}"

    def replace(self, **changes: Any) -> "DataSource":
        doc = {"kind": self.kind, "source": self.source, "options": self.options, "tasks": self.tasks, **changes}
        return DataSource(**doc)

    def open(self, input_spec=None):
        """Build the :class:`~anpyc.task.TaskStream` (bad options raise ConfigError, bad folders DataError).

        ``input_spec`` (a run's recorded one) is passed, for images, to builders that take it, so a re-built stream
        encodes images exactly as the run was trained on, whatever ``img_size`` the options say.
        """
        import inspect

        from anpyc.adapters.data import STREAMS, make_stream
        from anpyc.errors import ConfigError, DataError

        options = dict(self.options)
        builder = self.source if self.kind == "benchmark" else self.kind
        if input_spec is not None and input_spec.kind == "image" and builder in STREAMS \
                and "input_spec" in inspect.signature(STREAMS.get(builder)).parameters:
            options["input_spec"] = input_spec
        if self.kind == "benchmark":
            stream = make_stream(self.source, **options)
        else:
            key = "root" if self.kind == "folder" else "path"
            if key in options:
                raise ConfigError(f"data option {key!r} conflicts with --data", f"drop --data-opt {key}=...")
            stream = make_stream(self.kind, **{key: self.source}, **options)
        if self.tasks is not None:
            if self.tasks > len(stream):
                raise DataError(f"--tasks {self.tasks} asks for more tasks than {self.source} has ({len(stream)})",
                                f"pass --tasks 1..{len(stream)}")
            stream = stream.take(self.tasks)
        return stream


def _plain_value(value: Any, depth: int = 0) -> bool:
    """A JSON scalar (finite numbers, strings of at most 4,096 characters), or a list of at most 64 of them."""
    import math

    if value is None or isinstance(value, bool) or isinstance(value, int) and abs(value) <= 2 ** 53:
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= 4096
    if isinstance(value, list) and depth == 0:
        return len(value) <= 64 and all(_plain_value(v, 1) for v in value)
    return False


def resolve_source(data: str, *, options: dict[str, Any] | None = None, tasks: int | None = None,
                   base: Path | None = None) -> DataSource:
    """Turn ``--data`` into a :class:`DataSource`; relative paths are taken from ``base`` (default: the cwd)."""
    from anpyc.adapters.data import list_streams
    from anpyc.errors import DataError

    names = [n for n in list_streams() if n not in _GENERIC]
    options = dict(options or {})
    if data in names:
        return DataSource("benchmark", data, options, tasks)
    path = Path(data).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_dir():
        return DataSource("folder", str(path.resolve()), options, tasks)
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise DataError(f"--data {data} is a file but not a .csv/.json manifest", f"pass {LAYOUT}")
        return DataSource("manifest", str(path.resolve()), options, tasks)
    if data in _GENERIC:
        raise DataError(f"--data {data} needs the {'folder' if data == 'folder' else 'manifest'} path itself",
                        f"pass --data PATH: {LAYOUT}")
    close = difflib.get_close_matches(data, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise DataError(f"--data {data!r} is neither a benchmark nor an existing path",
                    f"{hint}benchmarks: {', '.join(names)}; or {LAYOUT}")


def read_source(run: Path) -> DataSource | None:
    """The data record of run ``run``, or None when the run has none (it was trained from Python)."""
    from anpyc.errors import RunDirError

    from anpyc.fileio import read_json

    path = Path(run) / DATA_FILE
    if not path.exists() and not path.is_symlink():
        return None
    doc = read_json(path, what="data record", error=RunDirError, invalid_fix="pass --data BENCHMARK|DIR to say what "
                    "to use", max_bytes=1 << 20)
    return DataSource.from_dict(doc, str(path))


def write_source(run: Path, source: DataSource) -> Path:
    from anpyc.fileio import atomic_write_json

    path = Path(run) / DATA_FILE
    atomic_write_json(path, source.to_dict())
    return path
