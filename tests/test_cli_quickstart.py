"""`anpyc quickstart`: the README's first command, run for real in a subprocess on the offline digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from test_cli_width import assert_fits, assert_matrix, assert_task_rows
from typer.testing import CliRunner

from anpyc.cli.app import app

# The default recipe reaches ACC 0.97 (seeds 0-2, mobilenetv3_small_050); the bound leaves room for other CPUs'
# numerics while still failing a run that forgets or does not learn (chance is 0.5 on every task).
ACC_BOUND = 0.90


def test_quickstart_refuses_to_overwrite(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    r = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "already holds a quickstart run" in r.stderr and "another --out" in r.stderr


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "COLUMNS": "80"}  # a pipe's width: every table must fit it (test_cli_width.py)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "anpyc.cli", "quickstart", "--out", str(out)], capture_output=True,
                       text=True, timeout=900, env=env)
    seconds = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert len(metrics["tasks"]) == 5
    assert metrics["acc"] >= ACC_BOUND, metrics["accuracy_matrix"]
    assert metrics["bwt"] >= -0.02  # earlier tasks keep their accuracy
    assert metrics["capacity"][-1] < 1.0  # pruning left room
    text = " ".join(r.stdout.split())
    assert "ACC " in text and "BWT " in text and "capacity used" in text
    assert "test digits classified correctly by the exported models" in text
    correct, total = (int(v) for v in text.split(" test digits classified")[0].rsplit(" ", 1)[-1].split("/"))
    assert total == 10 and correct >= 8
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert [t["id"] for t in manifest["tasks"]] == [0, 1, 2, 3, 4]
    assert len(list((out / "export").glob("task-00?.onnx"))) == 5
    assert len(list((out / "images").glob("*.png"))) == 10
    for name in ("accuracy_matrix.png", "capacity.png", "accuracy_over_time.png"):
        assert (out / "run" / "plots" / name).stat().st_size > 10_000
    assert json.loads((out / "run" / "data.json").read_text())["source"] == "digits-split"
    assert_fits(r.stdout)
    assert_matrix(r.stdout, metrics["accuracy_matrix"], [t["id"] for t in metrics["tasks"]])
    assert_task_rows(r.stdout, metrics)
    assert "tasks: 0 = classes 0,1 · 1 = classes 2,3" in r.stdout
    print(f"quickstart: ACC {metrics['acc']:.3f} in {seconds:.0f}s wall")
