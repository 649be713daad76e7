"""`anpyc train`, `eval`, `inspect` end to end through CliRunner: files written, key output, exit codes.

One small run (test_resnet on the synthetic stream, 2 tasks, 1 epoch) is trained once per module and shared; tests
that change a run work on a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from anpyc.cli.app import app

# One epoch, one schedule prune step of half the claim, small importance batches: seconds per task.
FAST = ["--epochs", "1", "--batch-size", "16", "--set", "importance.max_batches=2", "--set", "importance.batch_size=16",
        "--set", "prune.mode=schedule", "--set", "prune.first_ratio=0.5", "--set", "prune.step=0.5",
        "--set", "prune.retrain_epochs=1", "--set", "eval_batch_size=64", "--set", "checkpoint_epochs=false"]
SYNTH = ["--data", "synthetic", "--data-opt", "samples_per_class=12"]


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def assert_user_error(r, *needles: str) -> str:
    """Exit code 2, one line on stderr starting with 'error:', no traceback; returns the line."""
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    run = tmp_path_factory.mktemp("cli") / "run"
    r = invoke("train", "--model", "test_resnet", *SYNTH, "--tasks", "2", "--out", run, *FAST)
    return run, r


def test_train_writes_the_run_and_prints_the_summary(trained):
    run, r = trained
    assert r.exit_code == 0, r.output
    out = flat(r.stdout)
    assert "anpyc train: test_resnet / anpyc on benchmark synthetic" in out
    assert "task 0 synthetic 0 done: test acc" in out and "task 1 synthetic 1 done" in out
    assert "ACC " in out and "BWT " in out and "capacity used" in out and "per task" in out
    for name in ("run.json", "config.json", "data.json", "metrics.json", "events.jsonl"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["optim"]["epochs"] == 1 and config["prune"]["mode"] == "schedule"
    assert config["checkpoint_epochs"] is False and config["method"] == "anpyc"
    data = json.loads((run / "data.json").read_text())
    assert data == {"format": "anpyc.cli.data", "version": 1, "kind": "benchmark", "source": "synthetic",
                    "options": {"samples_per_class": 12}, "tasks": 2}
    metrics = json.loads((run / "metrics.json").read_text())
    assert [t["id"] for t in metrics["tasks"]] == [0, 1] and len(metrics["accuracy_matrix"]) == 2
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("task_end") == 2
    for name in ("accuracy_matrix.png", "capacity.png", "accuracy_over_time.png"):
        png = (run / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name


def test_eval_reproduces_the_recorded_last_row(trained):
    run, _ = trained
    r = invoke("eval", run)
    assert r.exit_code == 0, r.output
    out = flat(r.stdout)
    assert "test accuracy of" in out and "acc now" in out and "acc learned" in out and "ACC " in out
    assert "max difference to the recorded last row 0.00 pts" in out
    r = invoke("eval", run, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [t["task"] for t in doc["tasks"]] == [0, 1]
    assert doc["max_diff_to_recorded"] == pytest.approx(0.0, abs=1e-9)
    assert doc["acc"] == pytest.approx(metrics["acc"], abs=1e-9)
    r = invoke("eval", run, "--task", "1", "--split", "val", "--json")
    assert r.exit_code == 0, r.output
    assert [t["task"] for t in json.loads(r.stdout)["tasks"]] == [1]


def test_eval_user_errors(trained, tmp_path):
    run, _ = trained
    assert_user_error(invoke("eval", run, "--task", "7"), "task 7 is not a learned task", "[0, 1]")
    assert_user_error(invoke("eval", run, "--data", "digits-split"), "classes")
    assert_user_error(invoke("eval", tmp_path), "not an anpyc run directory")
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "data.json").unlink()
    assert_user_error(invoke("eval", bare), "does not record its data", "--data")
    r = invoke("eval", bare, *SYNTH)
    assert r.exit_code == 0, r.output
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    next((broken / "state").glob("*/heads.safetensors")).unlink()
    assert_user_error(invoke("eval", broken), "is missing", "heads.safetensors")
    r = invoke("eval", tmp_path / "nowhere")
    assert r.exit_code == 2 and "does not exist" in flat(r.output)


def test_inspect_tables_json_and_plots(trained, tmp_path):
    run, _ = trained
    r = invoke("inspect", run)
    assert r.exit_code == 0, r.output
    out = flat(r.stdout)
    assert "backbone test_resnet" in out and "unit granularity" in out and "2 task(s) finished" in out
    assert "units owned per group" in out and "mask file" in out and "(verified)" in out and "FLOPs" in out
    r = invoke("inspect", run, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert sum(doc["owned_units"].values()) + doc["free_units"] == doc["masks"]["units"]
    assert sum(g["size"] for g in doc["groups"]) == doc["masks"]["units"]
    assert all(sum(g["owned"].values()) + g["free"] == g["size"] for g in doc["groups"])
    assert doc["masks"]["format"] == "anpyc.masks" and doc["masks"]["dtype"] == "torch.uint8"
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "plots")
    r = invoke("inspect", copy, "--plots", "--no-groups")
    assert r.exit_code == 0, r.output
    assert "units owned per group" not in flat(r.stdout)
    assert sorted(p.name for p in (copy / "plots").iterdir()) == ["accuracy_matrix.png", "accuracy_over_time.png",
                                                                 "capacity.png"]
    assert_user_error(invoke("inspect", tmp_path), "not an anpyc run directory")


def test_resume_skips_learned_tasks_and_adds_new_ones(trained, tmp_path):
    run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    r = invoke("train", "--resume", "--out", copy)
    assert r.exit_code == 0, r.output
    assert "resuming: 2 of 2 tasks already learned" in flat(r.stdout)
    assert "training" not in r.stdout  # nothing left to train
    r = invoke("train", "--resume", "--out", copy, "--tasks", "3")
    assert r.exit_code == 0, r.output
    assert "resuming: 2 of 3" in flat(r.stdout) and "task 2 synthetic 2 done" in flat(r.stdout)
    metrics = json.loads((copy / "metrics.json").read_text())
    assert [t["id"] for t in metrics["tasks"]] == [0, 1, 2]
    assert json.loads((copy / "data.json").read_text())["tasks"] == 3
    before = json.loads((run / "metrics.json").read_text())["accuracy_matrix"]
    assert metrics["accuracy_matrix"][:2] == before  # the history is kept, not retrained


def test_train_user_errors(trained, tmp_path):
    run, _ = trained
    out = tmp_path / "new"
    assert_user_error(invoke("train", "--model", "test_resnet", *SYNTH, "--out", run), "already holds a run",
                      "--resume")
    assert_user_error(invoke("train", "--model", "resnet1000", *SYNTH, "--out", out), "unknown model 'resnet1000'",
                      "did you mean")
    assert_user_error(invoke("train", "--model", "mlp", "--data", "digit-split", "--out", out),
                      "neither a benchmark nor an existing path", "did you mean digits-split")
    assert_user_error(invoke("train", "--model", "mlp", "--data", str(tmp_path / "none"), "--out", out),
                      "neither a benchmark nor an existing path")
    assert_user_error(invoke("train", "--model", "mlp", *SYNTH, "--out", out, "--set", "optim.lrr=0.1"),
                      "unknown config key 'optim.lrr'", "valid keys here")
    assert_user_error(invoke("train", "--model", "mlp", *SYNTH, "--out", out, "--set", "optim.epochs=many"),
                      "'optim.epochs' must be an integer")
    assert_user_error(invoke("train", "--model", "mlp", *SYNTH, "--out", out, "--data-opt", "colour=1"),
                      "does not take colour")
    assert_user_error(invoke("train", "--model", "test_resnet", *SYNTH, "--tasks", "9", "--out", out),
                      "--tasks 9", "1..3")
    assert_user_error(invoke("train", "--model", "mlp", *SYNTH, "--out", out, "--device", "gpu"),
                      "unknown device 'gpu'")
    import torch

    if not torch.cuda.is_available():
        assert_user_error(invoke("train", "--model", "mlp", *SYNTH, "--out", out, "--device", "cuda"),
                          "torch sees no CUDA GPU", "--device cpu")
    assert_user_error(invoke("train", "--resume", "--out", out), "no run to resume")
    assert not out.exists() or not (out / "run.json").exists()
    r = invoke("train", "--resume", "--out", run, "--epochs", "3")
    assert r.exit_code == 2 and "keeps the configuration" in flat(r.output)
    r = invoke("train", "--model", "mlp", "--out", out)
    assert r.exit_code == 2 and "which data?" in flat(r.output)
    r = invoke("train", "--model", "mlp", *SYNTH, "--out", out, "--tasks", "0")
    assert r.exit_code == 2 and "must be >= 1" in flat(r.output)
    r = invoke("train", "--model", "mlp", *SYNTH, "--out", out, "--method", "sgd")
    assert r.exit_code == 2 and "anpyc-soft" in flat(r.output)


def test_config_file_toml_with_flags_overriding(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        'model = "mlp"\n'
        "tasks = 1\n"
        'method = "ewc"\n'
        "seed = 3\n"
        "[data]\n"
        'source = "synthetic"\n'
        "vector = true\n"
        "dim = 16\n"
        "samples_per_class = 8\n"
        "[optim]\n"
        "epochs = 1\n"
        "lr = 0.01\n"
        "batch_size = 8\n"
        "[importance]\n"
        "max_batches = 1\n"
    )
    out = tmp_path / "run"
    r = invoke("train", "--config", cfg, "--out", out, "--lr", "0.02", "--set", "seed=4", "--no-plots")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "ewc" and config["importance"]["measure"] == "fisher"  # the preset
    assert config["optim"]["epochs"] == 1 and config["optim"]["batch_size"] == 8  # the file
    assert config["optim"]["lr"] == 0.02 and config["seed"] == 4  # the flags win
    data = json.loads((out / "data.json").read_text())
    assert data["options"] == {"vector": True, "dim": 16, "samples_per_class": 8} and data["tasks"] == 1
    assert not (out / "plots").exists()
    # the saved config.json is itself a valid config file
    again = tmp_path / "again"
    r = invoke("train", "--config", out / "config.json", "--model", "mlp", "--data", "synthetic", "--data-opt",
               "vector=true", "--data-opt", "samples_per_class=8", "--tasks", "1", "--out", again, "--no-plots")
    assert r.exit_code == 0, r.output
    assert json.loads((again / "config.json").read_text()) == config


def test_config_file_yaml_and_bad_files(tmp_path):
    good = tmp_path / "exp.yaml"
    good.write_text("model:\n  name: mlp\n  hidden: [32]\ndata:\n  source: synthetic\n  vector: true\n"
                    "  samples_per_class: 8\ntasks: 1\noptim:\n  epochs: 1\n")
    out = tmp_path / "run"
    r = invoke("train", "--config", good, "--out", out, "--no-plots")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["backbone"]["name"] == "mlp" and manifest["backbone"]["kwargs"] == {"hidden": [32]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [epochs: 1\n")
    assert_user_error(invoke("train", "--config", bad, "--out", tmp_path / "x"), "is not valid YAML")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[optim\nepochs = 1\n")
    assert_user_error(invoke("train", "--config", bad_toml, "--out", tmp_path / "x"), "is not valid TOML")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('model = "mlp"\ndata = "synthetic"\n[optim]\nepochs = "ten"\n')
    assert_user_error(invoke("train", "--config", wrong, "--out", tmp_path / "x"), "'optim.epochs' must be an integer")
    other = tmp_path / "exp.ini"
    other.write_text("x=1")
    assert_user_error(invoke("train", "--config", other, "--out", tmp_path / "x"), "unknown extension")
    r = invoke("train", "--config", tmp_path / "missing.toml", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "does not exist" in flat(r.output)


def test_inspect_element_granularity_run(tmp_path):
    """PackNet masks single weights: inspect lists weight tensors instead of unit groups."""
    run = tmp_path / "run"
    r = invoke("train", "--model", "mlp", "--model-opt", "hidden=[16]", "--data", "synthetic", "--data-opt",
               "vector=true", "--data-opt", "dim=8", "--data-opt", "samples_per_class=8", "--tasks", "2",
               "--method", "packnet", "--epochs", "1", "--out", run, "--no-plots")
    assert r.exit_code == 0, r.output
    r = invoke("inspect", run, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["masks"]["granularity"] == "element"
    assert {g["name"] for g in doc["groups"]} == {"layers.1.weight"}
    assert doc["groups"][0]["kind"] == "16x8" and doc["groups"][0]["size"] == 128
    assert all(sum(g["owned"].values()) + g["free"] == g["size"] for g in doc["groups"])
    r = invoke("inspect", run)
    assert r.exit_code == 0 and "units owned per tensor" in flat(r.stdout) and "element granularity" in flat(r.stdout)
