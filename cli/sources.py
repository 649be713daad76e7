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
import json
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
        from anpyc.errors import RunDirError

        if not isinstance(doc, dict) or doc.get("format") != DATA_FORMAT:
            raise RunDirError(f"{where} is not an anpyc data record", "pass --data BENCHMARK|DIR to say what to use")
        if doc.get("version") != DATA_VERSION:
            raise RunDirError(f"{where} has version {doc.get('version')}, this anpyc reads {DATA_VERSION}",
                              "pass --data BENCHMARK|DIR to say what to use")
        kind, source, options, tasks = doc.get("kind"), doc.get("source"), doc.get("options") or {}, doc.get("tasks")
        if kind not in ("benchmark", *_GENERIC) or not isinstance(source, str) or not isinstance(options, dict) \
                or not (tasks is None or (isinstance(tasks, int) and tasks > 0)):
            raise RunDirError(f"{where} is malformed", "pass --data BENCHMARK|DIR to say what to use")
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

    path = Path(run) / DATA_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} is unreadable ({e})", "pass --data BENCHMARK|DIR to say what to use") from None
    return DataSource.from_dict(doc, str(path))


def write_source(run: Path, source: DataSource) -> Path:
    from anpyc.fileio import atomic_write_json

    path = Path(run) / DATA_FILE
    atomic_write_json(path, source.to_dict())
    return path
