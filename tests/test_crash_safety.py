"""SIGKILL a training run at random moments, resume each time: same result as an uninterrupted run, no torn file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anpyc.fileio import read_jsonl
from anpyc.rundir import RunDir

WORKER = str(Path(__file__).with_name("crash_worker.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


def _start(run: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, str(run), *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "READY", (line, proc.stderr.read()[-2000:] if proc.poll() is not None else "")


def reference_run(ref: Path, *args: str) -> float:
    """An uninterrupted run of the worker into ``ref``; returns its training time (READY to DONE)."""
    proc = _start(ref, *args)
    _wait_ready(proc)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0 and "DONE" in out, err[-3000:]
    return time.monotonic() - t0


def kill_and_resume(run: Path, *args: str, kills: int, low: float, high: float, seed: int) -> int:
    """Start (or resume) the worker into ``run``, SIGKILL it after a random ``[low, high]`` seconds, until ``kills``
    kills, then let it finish; every kill leaves no torn file. Returns the kills made (fewer when a run finished
    before its kill)."""
    rng, made = random.Random(seed), 0
    while True:
        proc = _start(run, *args)
        _wait_ready(proc)
        if made >= kills:
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0 and "DONE" in out, err[-3000:]
            return made
        time.sleep(rng.uniform(low, high))
        if proc.poll() is not None:  # finished before the kill: the run is complete
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            return made
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        made += 1
        _check_not_torn(run)


def _check_not_torn(run: Path) -> None:
    """Every committed file is present and matches its checksum; every JSON file parses."""
    if not (run / "run.json").exists():
        return
    manifest = json.loads((run / "run.json").read_text())
    if manifest.get("generation") is None:
        return
    if manifest.get("generation") is not None:
        RunDir(run, lock=False).state_dir()  # raises on a missing or corrupt file
        json.loads((RunDir(run, lock=False).state_dir() / "state.json").read_text())
    for name in ("metrics.json", "config.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())
    read_jsonl(run / "events.jsonl")  # a torn last line is tolerated by design, never a torn middle line
    # a kill can leave temporary files, a renamed generation whose manifest update did not happen yet, or the
    # previous generation not yet deleted: nothing references them, and the next open of the run removes them.
    for p in (run / "state").iterdir() if (run / "state").exists() else []:
        assert p.name.startswith(".") or p.name.isdigit(), p


@pytest.mark.slow
def test_sigkill_and_resume_reaches_the_uninterrupted_result(tmp_path):
    ref = tmp_path / "ref"
    proc = _start(ref)
    _wait_ready(proc)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=900)
    t_run = time.monotonic() - t0  # training time of the whole run, READY to DONE
    assert proc.returncode == 0 and "DONE" in out, err[-3000:]

    run = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    phases_hit = set()
    while True:
        proc = _start(run)
        _wait_ready(proc)
        if kills >= 12:
            out = proc.stdout.read()
            proc.wait(timeout=900)
            assert proc.returncode == 0 and "DONE" in out, proc.stderr.read()[-3000:]
            break
        # Kill times scale with this machine's speed: each attempt runs at most a tenth of the whole run, so
        # 12 attempts cannot finish it (their total is 0.6x the run on average, 1.2x at the very most).
        time.sleep(rng.uniform(0.01, t_run / 10))
        if proc.poll() is not None:  # finished before the kill: the run is complete
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        events = read_jsonl(run / "events.jsonl")
        if events:
            phases_hit.add(events[-1].get("phase") or events[-1]["event"])
        _check_not_torn(run)
    assert kills >= 10, f"only {kills} kills before the run finished"
    assert not list(run.rglob("*.tmp"))
    gen = json.loads((run / "run.json").read_text())["generation"]
    assert [p.name for p in (run / "state").iterdir()] == [f"{gen:06d}"]
    assert len(phases_hit) >= 2, phases_hit  # kills landed in different parts of the loop
    _check_not_torn(run)
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert b["accuracy_matrix"] == a["accuracy_matrix"]
    assert b["capacity"] == a["capacity"]
