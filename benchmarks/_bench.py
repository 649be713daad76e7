"""The one helper module of the benchmark scripts: run specs, one cached run, summaries, BENCHMARKS.md sections,
the reproducing command, the machine line.

A benchmark run is fully described by a :class:`RunSpec` (stream, backbone, method preset and overrides, seed);
its result is a JSON-ready dict (the learner's metrics plus wall time). Results are optionally cached as JSON
under a key that hashes the whole spec and the resolved config, so an interrupted benchmark resumes where it
stopped and a changed preset is never served from a stale cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = ["RunSpec", "run", "spec_stream", "new_learner", "common_args", "setup_torch", "mean_std", "fmt_pm",
           "acc_curve", "write_section", "command_line", "median", "git_commit", "machine", "ROOT"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunSpec:
    """One continual-learning run: ``method`` is the row label, ``preset`` the registered method it starts from."""

    suite: str
    method: str
    preset: str
    stream: str
    backbone: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)
    stream_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # the trunk's initial weights (a file; its name carries its content's hash)

    def config(self, *, device: str, threads: int):
        from anpyc.configure import method_config

        base = {"seed": self.seed, "device": device, "threads": threads, "checkpoint_epochs": False}
        return method_config(self.preset, **{**base, **self.overrides})

    def key(self, cfg_dict: dict) -> str:
        spec = {k: v for k, v in asdict(self).items() if k != "weights" or v is not None}  # older keys stay valid
        doc = json.dumps({"spec": spec, "config": {k: v for k, v in cfg_dict.items()
                                                           if k not in ("device", "threads")}},
                         sort_keys=True, default=str)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]


def setup_torch(threads: int) -> None:
    """Set torch's CPU threads explicitly (benchmarks on shared CPUs must say how many they used)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before the first parallel work; harmless if already set
            pass


def spec_stream(spec: RunSpec):
    from anpyc.adapters.data import make_stream

    return make_stream(spec.stream, seed=spec.seed, **spec.stream_kwargs)


def new_learner(spec: RunSpec, cfg, stream):
    """A fresh learner for ``spec`` on ``stream`` (no run directory), ready for ``learner.fit(stream)``."""
    import anpyc

    return anpyc.ContinualLearner(spec.backbone, input_spec=stream.input_spec, config=cfg,
                                  model_kwargs=dict(spec.backbone_kwargs), weights=spec.weights)


def run(spec: RunSpec, *, device: str = "cpu", threads: int = 1, cache: Path | None = None, fresh: bool = False,
        log: Callable[[str], None] = print) -> dict:
    """Train ``spec`` on its stream (or read the cached result) and return metrics plus wall time."""
    from anpyc.config import to_dict

    cfg = spec.config(device=device, threads=threads)
    cfg_dict = to_dict(cfg)
    key = spec.key(cfg_dict)
    path = cache / spec.suite / f"{spec.method}-s{spec.seed}-{key}.json" if cache is not None else None
    if path is not None and path.exists() and not fresh:
        return json.loads(path.read_text())
    from anpyc.errors import TrainingDiverged

    stream = spec_stream(spec)
    t0 = time.perf_counter()
    learner = new_learner(spec, cfg, stream)
    diverged = None
    try:
        metrics = learner.fit(stream)
    except TrainingDiverged as e:  # a search point that diverges is a result (it loses), not a crash
        diverged = f"task {len(learner.state.acc_test)}: {e}"
        metrics = learner.metrics()
        log(f"  {spec.suite} {spec.method} seed {spec.seed}: DIVERGED at {diverged}")
    wall = time.perf_counter() - t0
    val = metrics["val_accuracy_matrix"]
    result = {
        "spec": asdict(spec), "config": cfg_dict, "key": key, "device": device, "threads": threads,
        "wall_seconds": wall, "val_acc": _mean_last(val), "val_acc_curve": acc_curve(val),
        "test_acc_curve": acc_curve(metrics["accuracy_matrix"]), "diverged": diverged,
        **{k: metrics.get(k) for k in ("accuracy_matrix", "val_accuracy_matrix", "acc", "bwt", "forgetting",
                                       "mean_forgetting", "capacity", "capacity_params", "task_params",
                                       "dense_params", "task_flops", "dense_flops", "prune", "seconds", "num_units",
                                       "num_tasks")},
    }
    if diverged:  # the stream was not finished: no final ACC to report
        result.update(acc=math.nan, bwt=math.nan, mean_forgetting=math.nan, val_acc=math.nan)
    from anpyc.fileio import finite

    result = finite(result)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
    cap = result["capacity"][-1] if result["capacity"] else math.nan
    log(f"  {spec.suite} {spec.method} seed {spec.seed} {spec.overrides or ''}: ACC {_pct(result['acc'])} "
        f"BWT {_pct(result['bwt'])} val {_pct(result['val_acc'])} cap {cap:.3f} {wall:.0f}s")
    return result


def _pct(v: float | None) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{100 * v:.2f}"


def _mean_last(matrix: Sequence[Sequence[float | None]]) -> float:
    row = [v for v in (matrix[-1] if matrix else []) if v is not None]
    return sum(row) / len(row) if row else math.nan


def acc_curve(matrix: Sequence[Sequence[float | None]]) -> list[float]:
    """ACC after each task: the mean of row ``i`` of the accuracy matrix over the tasks learned so far."""
    return [_mean_last([row]) for row in matrix]


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_pm(values: Iterable[float | None], scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``mean ± std`` of ``values`` times ``scale`` (percentage points by default); one value shows no ±."""
    vals = list(values)
    m, s = mean_std(vals)
    if math.isnan(m):
        return "–"
    sign = "+" if signed else ""
    text = f"{m * scale:{sign}.{digits}f}"
    return text + (f" ± {s * scale:.{digits}f}" if len([v for v in vals if v is not None]) > 1 else "")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# ================================================================================================ markdown

def write_section(path: Path, name: str, body: str, *, title: str | None = None) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path`` (other sections
    are left untouched); a missing file or section is created (the section appended at the end)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + (f"## {title}\n\n" if title else "") + block + "\n"
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")  # unique: benchmarks may write sections side by side
    tmp.write_text(text)
    os.replace(tmp, path)


def kept_row_commits(old: dict, fresh: dict[str, str]) -> dict[str, str]:
    """The commit that measured each row after a partial run: ``old`` (the results file it merges into) keeps its
    rows' commits (its own commit for files written before rows recorded theirs), ``fresh`` (row -> this commit)
    wins for the rows re-run."""
    return {**{m: old.get("row_commits", {}).get(m, old["commit"]) for m in old["rows"]}, **fresh}


def command_line(script: str, args: Sequence[str]) -> str:
    """The command that reproduces a table, as a user would type it from the repository root (shell-quoted)."""
    return " ".join(["python", f"benchmarks/{script}", *(shlex.quote(a) for a in args)])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, python {sys.version.split()[0]}"


# ================================================================================================ CLI

def common_args(parser: argparse.ArgumentParser, *, default_seeds: str = "0,1,2") -> argparse.ArgumentParser:
    """The options every benchmark script takes."""
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds): for smoke tests")
    parser.add_argument("--seeds", default=default_seeds, help="comma-separated seeds (default %(default)s)")
    parser.add_argument("--methods", default=None, help="comma-separated method rows to run (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="markdown file whose section is (re)written (default BENCHMARKS.md)")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder for plots and JSON results (default benchmarks/results next to --out's repo)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, set explicitly (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return parser


def parse_list(text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    return [cast(v.strip()) for v in text.split(",") if v.strip()]
