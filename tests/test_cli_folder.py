"""Your own data through the CLI: a folder tree in the documented layout and a CSV manifest train, eval and export;
a wrong layout is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from anpyc.cli.app import app

FAST = ["--epochs", "1", "--batch-size", "8", "--set", "importance.max_batches=1", "--set", "importance.batch_size=8",
        "--set", "prune.mode=schedule", "--set", "prune.first_ratio=0.5", "--set", "prune.step=0.5",
        "--set", "prune.retrain_epochs=1", "--set", "checkpoint_epochs=false", "--no-plots"]


def invoke(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(a) for a in args])


def _png(path: Path, value: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(value, 20, size=(12, 12, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def make_tree(root: Path, per_class: int = 6) -> Path:
    """root/<task>/train/<class>/*.png, two tasks of two classes; "[v2]" would be eaten by unescaped rich markup."""
    seed = 0
    for task, classes in (("animals", {"cat": 200, "dog": 50}), ("vehicles [v2]", {"bus": 180, "car": 70})):
        for cls, value in classes.items():
            for i in range(per_class):
                seed += 1
                _png(root / task / "train" / cls / f"{cls}{i}.png", value, seed)
    return root


def test_folder_dataset_trains_evaluates_and_exports(tmp_path):
    root = make_tree(tmp_path / "images")
    run = tmp_path / "run"
    r = invoke("train", "--model", "test_resnet", "--data", root, "--img-size", "32", "--out", run, *FAST)
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    assert "on folder" in out and "task 0 animals done" in out and "task 1 vehicles [v2] done" in out
    data = json.loads((run / "data.json").read_text())
    assert data["kind"] == "folder" and data["source"] == str(root.resolve()) and data["options"] == {"img_size": 32}
    metrics = json.loads((run / "metrics.json").read_text())
    assert [(t["name"], t["classes"]) for t in metrics["tasks"]] == [("animals", ["cat", "dog"]),
                                                                     ("vehicles [v2]", ["bus", "car"])]
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["input_spec"]["shape"] == [3, 32, 32]
    r = invoke("eval", run, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [t["name"] for t in doc["tasks"]] == ["animals", "vehicles [v2]"]
    assert doc["max_diff_to_recorded"] == 0.0
    # the run's recorded input spec wins over a different image size: evaluation sees what training saw
    r = invoke("eval", run, "--json", "--data", root, "--data-opt", "img_size=16")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["max_diff_to_recorded"] == 0.0
    from anpyc.cli.sources import resolve_source
    from anpyc.task import InputSpec

    spec = InputSpec.from_dict(manifest["input_spec"])
    src = resolve_source(str(root), options={"img_size": 16})
    assert src.open().input_spec.shape == (3, 16, 16)
    assert src.open(input_spec=spec).input_spec == spec
    r = invoke("inspect", run)
    assert r.exit_code == 0, r.output
    assert "1:vehicles [v2]" in r.stdout
    r = invoke("export", run)
    assert r.exit_code == 0, r.output
    r = invoke("predict", run / "export", "--task", "1", root / "vehicles [v2]" / "train" / "bus" / "bus0.png")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["predictions"][0]["label"] in ("bus", "car")


def test_manifest_dataset_trains(tmp_path):
    root = make_tree(tmp_path / "images", per_class=4)
    rows = ["task,split,path,label"]
    for png in sorted(root.rglob("*.png")):
        task, split, label = png.relative_to(root).parts[:3]
        rows.append(f"{task},{split},{png.relative_to(root)},{label}")
    manifest = root / "data.csv"
    manifest.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    r = invoke("train", "--model", "cnn", "--model-opt", "width=8", "--data", manifest, "--tasks", "1", "--out", run,
               *FAST)
    assert r.exit_code == 0, r.output
    assert json.loads((run / "data.json").read_text())["kind"] == "manifest"
    assert json.loads((run / "run.json").read_text())["backbone"]["kwargs"] == {"width": 8}


def test_wrong_layouts_are_one_line_errors(tmp_path):
    root = make_tree(tmp_path / "images", per_class=3)
    (root / "broken" / "pictures").mkdir(parents=True)  # a task folder without train/
    r = invoke("train", "--model", "cnn", "--data", root, "--out", tmp_path / "run")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "has no train/ folder" in r.stderr and "add " in r.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    r = invoke("train", "--model", "cnn", "--data", notes, "--out", tmp_path / "run")
    assert r.exit_code == 2 and "not a .csv/.json manifest" in r.stderr
    r = invoke("train", "--model", "cnn", "--data", "folder", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "needs the folder path itself" in r.stderr
    assert not (tmp_path / "run" / "run.json").exists()
