"""The fuzz suite: every file format anpyc reads back (run.json, state.json, masks.safetensors, a sidecar, the
export manifest, a config file, data.json) and every HTTP endpoint, mutated by hypothesis and fed to what reads them
(tests/fuzz_worker.py says how). Every case must end in a valid answer or a one-line error (exit 2, an AnpycError,
a 4xx/503 JSON error), never a traceback or an HTTP 500, never an open outside its folder, within 30 s, in a worker
process whose address space is limited (RLIMIT_AS) so that a memory bomb is a finding, not a dead machine.

200 cases per format by default (about two minutes); ``ANPYC_FUZZ_EXAMPLES=5000`` runs more, ``ANPYC_FUZZ_SEED=N``
draws a fresh random set instead of the fixed one (a failure prints its case and traceback).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_bad_inputs import FAST, SYNTH, invoke

HERE = Path(__file__).resolve().parent
EXAMPLES = int(os.environ.get("ANPYC_FUZZ_EXAMPLES", "200"))
SEED = os.environ.get("ANPYC_FUZZ_SEED")
FORMATS = ("run", "state", "masks", "sidecar", "manifest", "config", "data", "http")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """A trained two-task run (with its data.json) and its export, side by side."""
    root = tmp_path_factory.mktemp("fuzz-fixtures")
    r = invoke("train", "--model", "cnn", "--model-opt", "width=4", *SYNTH, "--tasks", "2", "--out", root / "run",
               *FAST)
    assert r.exit_code == 0, r.output
    r = invoke("export", root / "run", "--out", root / "export")
    assert r.exit_code == 0, r.output
    (root / "run" / "run.lock").unlink(missing_ok=True)
    (root / "run" / "export.log").unlink(missing_ok=True)
    (root / "outside").mkdir()
    (root / "outside" / "secret.txt").write_text("not anpyc's to read")  # what '../outside/secret.txt' names
    return root


def run_worker(fixtures: Path, work: Path, *, examples: int, formats=FORMATS, env: dict | None = None,
               seed: str | None = None) -> dict:
    out = work / "report.json"
    cmd = [sys.executable, str(HERE / "fuzz_worker.py"), "--fixtures", str(fixtures), "--work", str(work / "cases"),
           "--out", str(out), "--examples", str(examples), "--formats", ",".join(formats)]
    if seed is not None:
        cmd += ["--seed", seed]
    full_env = {**os.environ, "MALLOC_ARENA_MAX": "2", "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("ANPYC_SERVE_TOKEN", None)
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600 + examples * len(formats))
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(fixtures, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("fuzz-work")
    try:
        return run_worker(fixtures, work, examples=EXAMPLES, seed=SEED)
    finally:
        shutil.rmtree(work / "cases", ignore_errors=True)


def _show(failures: list[dict]) -> str:
    return "\n\n".join(f"case: {f['case']}\n{f['traceback']}" for f in failures[:3])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_mutation_ends_in_an_answer_or_a_one_line_error(report, fmt):
    r = report["formats"][fmt]
    assert r["failures"] == [], f"{len(r['failures'])} of {r['cases']} cases failed:\n{_show(r['failures'])}"
    assert r["outside"] == [], r["outside"][:3]
    assert r["cases"] >= EXAMPLES * 0.9, r  # hypothesis drew (nearly) every case asked for
    assert r["ok"] + r["error"] == r["cases"] and r["error"] >= r["cases"] // 4, r  # most mutations are refused


@pytest.mark.slow
def test_fuzzing_stays_bounded(report):
    """No case raised the worker's memory past its limit (it would have been a MemoryError failure above), all the
    cases together added less than 512 MB to the peak the imports and the warm-up reached, and /metrics did not grow
    a series per made-up request."""
    assert report["max_rss_mb"] - report["rss_before_mb"] < 512, (report["rss_before_mb"], report["max_rss_mb"])
    assert 0 < report["metrics_series"] <= 400, report["metrics_series"]
    answered = {fmt: r["ok"] for fmt, r in report["formats"].items()}
    assert sum(answered.values()) >= 20, answered  # mutations the readers may ignore (extra keys) still answer
    statuses = {int(k) for k in report["http_statuses"]}
    assert 500 not in statuses and {200, 400, 401, 404, 405, 422} <= statuses, statuses


@pytest.mark.slow
def test_the_fuzz_suite_notices_a_missing_defence(fixtures, tmp_path):
    """With three defences undone (run.json unchecked, task ids read with int(), input specs unbounded) the same
    suite reports tracebacks and 500s: it can fail."""
    r = run_worker(fixtures, tmp_path, examples=60, formats=("run", "http"), env={"ANPYC_FUZZ_SABOTAGE": "1"})
    run, http = r["formats"]["run"], r["formats"]["http"]
    assert len(run["failures"]) > 0 and len(http["failures"]) > 0, (run, http)
    assert any("500" in f["error"] for f in http["failures"]), http["failures"][:2]
