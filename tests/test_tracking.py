"""`anpyc train --tensorboard DIR`: the event files, read back with TensorBoard's own reader, hold the run's values
(events.jsonl, metrics.json) under the documented tags and steps; resume adds to them; a missing package is one line.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli_train import FAST, SYNTH, assert_user_error, invoke


def _scalars(log_dir) -> dict[str, dict[int, tuple[float, float]]]:
    """tag -> step -> (value, wall time), the last write winning (as TensorBoard shows it)."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: (e.value, e.wall_time) for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _events(run) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _expected(run, retrain_epochs: int) -> dict[str, dict[int, float]]:
    """What the event files must hold, computed from the run's own records."""
    want: dict[str, dict[int, float]] = {}

    def put(tag, step, value):
        want.setdefault(tag, {})[step] = float(value)

    for e in _events(run):
        t = f"task_{e.get('task')}"
        if e["event"] == "epoch":
            step = e["epoch"] + (e["step"] * retrain_epochs if e["phase"] == "retrain" else 0)
            put(f"{t}/{e['phase']}_loss", step, e["loss"])
            put(f"{t}/{e['phase']}_acc", step, e["train_acc"])
        elif e["event"] == "eval" and e["phase"] == "train_end":
            put(f"{t}/val_acc_trained", 0, e["val_acc"])
        elif e["event"] == "prune_step":
            put(f"{t}/prune_kept_share", e["k"], 1 - e["released_total"] / e["claim"])
            put(f"{t}/prune_val_acc", e["k"], e["val_acc"])
            put(f"{t}/prune_accepted", e["k"], 1.0 if e["accepted"] else 0.0)
    metrics = json.loads((run / "metrics.json").read_text())
    for i, row in enumerate(metrics["accuracy_matrix"]):
        for j, v in enumerate(row[: i + 1]):
            put(f"accuracy/task_{j}", i, v)
        put("accuracy/mean", i, sum(row[: i + 1]) / (i + 1))
        put("capacity/units", i, metrics["capacity"][i])
        put("subnetwork/params", i, metrics["task_params"][i])
        put("subnetwork/flops", i, metrics["task_flops"][i])
    return want


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for tag, steps in want.items():
        assert sorted(got[tag]) == sorted(steps), tag
        for step, value in steps.items():
            assert got[tag][step][0] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)


def test_tensorboard_holds_the_runs_values_and_resume_adds_to_them(tmp_path):
    run, tb = tmp_path / "run", tmp_path / "tb"
    r = invoke("train", "--model", "test_resnet", *SYNTH, "--tasks", "2", "--out", run, *FAST, "--no-plots",
               "--tensorboard", tb)
    assert r.exit_code == 0, r.output
    assert f"TensorBoard: tensorboard --logdir {tb}" in r.stdout
    got = _scalars(tb)
    want = _expected(run, retrain_epochs=1)
    assert {"task_0/train_loss", "task_1/retrain_acc", "task_0/prune_kept_share", "accuracy/task_1",
            "capacity/units"} <= set(want)
    _assert_same(got, want)
    times = {e["time"] for e in _events(run)}
    assert all(round(wall, 3) in times for steps in got.values() for _, wall in steps.values())  # the events' times
    assert len(got["accuracy/task_0"]) == 2 and len(got["accuracy/task_1"]) == 1  # R[0][0], R[1][0]; R[1][1]

    copy, tb2 = tmp_path / "copy", tmp_path / "tb2"
    shutil.copytree(run, copy)
    shutil.copytree(tb, tb2)
    r = invoke("train", "--resume", "--out", copy, "--tasks", "3", "--tensorboard", tb2, "--no-plots")
    assert r.exit_code == 0, r.output
    assert len(list(tb2.glob("events.out.tfevents.*"))) == 2  # the first run's file and the resumed one
    got = _scalars(tb2)
    _assert_same(got, _expected(copy, retrain_epochs=1))
    assert sorted(got["capacity/units"]) == [0, 1, 2] and "task_2/train_loss" in got


def test_missing_tensorboard_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import now raises ImportError
    run = tmp_path / "run"
    r = invoke("train", "--model", "test_resnet", *SYNTH, "--tasks", "1", "--out", run, *FAST, "--tensorboard",
               tmp_path / "tb")
    line = assert_user_error(r)
    assert line == ('error: TensorBoard logging needs the tensorboard package, which is not installed (pip install '
                    '"anpyc[tensorboard]")')
    assert not run.exists() and not (tmp_path / "tb").exists()


def test_tensorboard_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "tb").write_text("not a folder")
    r = invoke("train", "--model", "test_resnet", *SYNTH, "--tasks", "1", "--out", tmp_path / "run", *FAST,
               "--tensorboard", tmp_path / "tb")
    assert r.exit_code == 2 and not (tmp_path / "run").exists()
