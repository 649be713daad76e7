"""The bad-input catalogue (README, Troubleshooting): one test per case.

Each case checks the three promises: a one-line error naming the problem and the fix, a non-zero exit (2 for the
CLI, an AnpycError for the Python API), and every file that existed before is byte-for-byte intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import anpyc
from anpyc.cli.app import app
from anpyc.errors import AnpycError, DataError, RunDirError, StateFileError, TrainingDiverged

from conftest import fast_config, tiny_stream

FAST = ["--epochs", "1", "--batch-size", "16", "--set", "importance.max_batches=2", "--set", "prune.mode=schedule",
        "--set", "prune.first_ratio=0.5", "--set", "prune.step=0.5", "--set", "prune.retrain_epochs=1",
        "--no-progress", "--no-plots"]
SYNTH = ["--data", "synthetic", "--data-opt", "samples_per_class=8", "--data-opt", "img_size=16"]


def invoke(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(a) for a in args])


def snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        elif root.exists():
            for p in sorted(root.rglob("*")):
                if p.is_file() and p.name != "run.lock":
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def intact(before: dict[str, str]) -> None:
    for path, digest in before.items():
        assert Path(path).exists(), f"{path} was removed"
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest, f"{path} was changed"


def user_error(r, *needles: str) -> str:
    """Exit 2, exactly one stderr line 'error: problem (fix)', no traceback."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output and "(" in lines[0], lines[0]  # the fix is in parentheses
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


def api_error(exc: AnpycError, *needles: str) -> None:
    line = exc.one_line
    assert "\n" not in line and exc.fix, line
    for n in needles:
        assert n.lower() in line.lower(), line




def _state(run: Path) -> Path:
    gen = json.loads((run / "run.json").read_text())["generation"]
    return run / "state" / f"{gen:06d}"


def _png(path: Path, size=(16, 16), mode="RGB") -> Path:
    Image.new(mode, size, color=(120, 30, 200)[: len(mode)] if mode != "L" else 100).save(path)
    return path


def _folder(root: Path, tasks=(("t0", ("a", "b")), ("t1", ("c", "d"))), n=4) -> Path:
    for task, classes in tasks:
        for c in classes:
            d = root / task / "train" / c
            d.mkdir(parents=True)
            for i in range(n):
                _png(d / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------------ state files

def test_01_truncated_safetensors(run_copy):
    masks = _state(run_copy) / "masks.safetensors"
    masks.write_bytes(masks.read_bytes()[:40])
    before = snapshot(run_copy)
    user_error(invoke("inspect", run_copy), "corrupt")
    intact(before)


def test_02_corrupt_safetensors_header():
    from anpyc.tensorio import load_tensors

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "masks.safetensors"
        p.write_bytes((200).to_bytes(8, "little") + b"{not json" + b"\0" * 300)
        before = snapshot(p)
        with pytest.raises(StateFileError) as e:
            load_tensors(p, fmt="anpyc.masks")
        api_error(e.value, "corrupt")
        intact(before)


def test_03_mask_file_from_another_backbone(run_copy, tmp_path):
    from anpyc.masks import load_masks

    stream = tiny_stream("test_resnet", num_tasks=1)
    other = anpyc.ContinualLearner("test_resnet", input_spec=stream.input_spec, config=fast_config())
    path = _state(run_copy) / "masks.safetensors"
    before = snapshot(path)
    with pytest.raises(StateFileError) as e:
        load_masks(path, other.space)
    api_error(e.value, "another backbone")
    intact(before)


def test_04_mask_file_of_another_schema_version(tmp_path):
    from anpyc.tensorio import save_tensors
    from anpyc.masks import load_masks

    p = tmp_path / "masks.safetensors"
    save_tensors(p, {"owners": torch.zeros(3, dtype=torch.uint8)}, fmt="anpyc.masks", version=99, schema={})
    before = snapshot(p)
    with pytest.raises(StateFileError) as e:
        load_masks(p)
    api_error(e.value, "schema version 99")
    intact(before)


def test_05_run_directory_with_a_file_missing(run_copy):
    (_state(run_copy) / "heads.safetensors").unlink()
    before = snapshot(run_copy)
    user_error(invoke("export", run_copy, "--out", run_copy.parent / "exp"), "missing", "heads.safetensors")
    intact(before)
    assert not (run_copy.parent / "exp").exists()


def test_06_run_manifest_not_json(run_copy):
    (run_copy / "run.json").write_text("{ half a manifest")
    before = snapshot(run_copy)
    user_error(invoke("eval", run_copy), "not valid JSON")
    intact(before)


def test_07_not_a_run_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    before = snapshot(tmp_path)
    user_error(invoke("inspect", tmp_path), "not an anpyc run directory")
    intact(before)


# ------------------------------------------------------------------------------------------------ tasks / inputs

def test_08_unknown_task_id_predict(export_dir, tmp_path):
    img = _png(tmp_path / "x.png")
    before = snapshot(export_dir, img)
    user_error(invoke("predict", export_dir, img, "--task", "7"), "unknown task 7")
    intact(before)


def test_09_unknown_task_id_export(run_copy):
    before = snapshot(run_copy)
    user_error(invoke("export", run_copy, "--task", "9", "--out", run_copy.parent / "e"), "task 9")
    intact(before)


def test_10_tensor_of_the_wrong_shape(export_dir):
    from anpyc.export.errors import InputShapeError
    from anpyc.export.runtime import load_export

    models = load_export(export_dir)
    with pytest.raises(InputShapeError) as e:
        models.predict(0, np.zeros((2, 3, 5, 5), dtype=np.float32))
    api_error(e.value, "shape")


def test_11_tensor_with_the_wrong_channels(export_dir):
    from anpyc.export.errors import InputShapeError
    from anpyc.export.runtime import load_export

    shape = load_export(export_dir).input_spec(0).shape
    with pytest.raises(InputShapeError) as e:
        load_export(export_dir).predict(0, np.zeros((1, shape[0] + 2, *shape[1:]), dtype=np.float32))
    api_error(e.value, "shape")


def test_12_tensor_of_the_wrong_dtype(export_dir):
    from anpyc.export.errors import InputShapeError
    from anpyc.export.runtime import load_export

    models = load_export(export_dir)
    shape = models.input_spec(0).shape
    with pytest.raises(InputShapeError) as e:
        models.predict(0, np.zeros((1, *shape), dtype=np.int64))
    api_error(e.value, "float")


def test_13_non_image_file_to_predict(export_dir, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    before = snapshot(export_dir, bad)
    user_error(invoke("predict", export_dir, bad, "--task", "0"), "notes.png")
    intact(before)


def test_14_onnx_file_does_not_match_its_sidecar(export_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    onnx_file = copy / "task-000.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    img = _png(tmp_path / "x.png")
    before = snapshot(copy)
    user_error(invoke("predict", copy, img, "--task", "0"), "does not match")
    intact(before)


# ------------------------------------------------------------------------------------------------ data folders

def test_15_non_image_file_in_a_data_folder(tmp_path):
    data = _folder(tmp_path / "data")
    (data / "t0" / "train" / "a" / "readme.txt").write_text("oops")
    before = snapshot(data)
    user_error(invoke("train", "--model", "cnn", "--data", data, "--out", tmp_path / "run", *FAST), "readme.txt")
    intact(before)
    assert not (tmp_path / "run" / "run.json").exists()


def test_16_empty_class_folder(tmp_path):
    data = _folder(tmp_path / "data")
    (data / "t1" / "train" / "e").mkdir()
    before = snapshot(data)
    user_error(invoke("train", "--model", "cnn", "--data", data, "--out", tmp_path / "run", *FAST), "empty")
    intact(before)


def test_17_empty_task(tmp_path):
    data = _folder(tmp_path / "data")
    (data / "t2" / "train").mkdir(parents=True)
    before = snapshot(data)
    user_error(invoke("train", "--model", "cnn", "--data", data, "--out", tmp_path / "run", *FAST), "t2")
    intact(before)


def test_18_unreadable_image_in_a_data_folder(tmp_path):
    data = _folder(tmp_path / "data")
    (data / "t0" / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    user_error(invoke("train", "--model", "cnn", "--data", data, "--out", tmp_path / "run", *FAST), "broken.png")


def test_19_class_count_changed_between_train_and_resume(tmp_path):
    data = _folder(tmp_path / "data")
    run = tmp_path / "run"
    r = invoke("train", "--model", "cnn", "--model-opt", "width=4", "--data", data, "--img-size", "16",
               "--out", run, "--tasks", "1", *FAST)
    assert r.exit_code == 0, r.output
    for i in range(4):
        (data / "t0" / "train" / "z").mkdir(exist_ok=True)
        _png(data / "t0" / "train" / "z" / f"{i}.png")
    before = snapshot(run)
    user_error(invoke("train", "--out", run, "--resume", "--no-progress", "--no-plots"), "classes")
    intact(before)


def test_20_manifest_missing_columns(tmp_path):
    m = tmp_path / "data.csv"
    m.write_text("task,path\nt0,a.png\n")
    user_error(invoke("train", "--model", "cnn", "--data", m, "--out", tmp_path / "run", *FAST), "column")


# ------------------------------------------------------------------------------------------------ training

def test_21_nan_loss_stops_cleanly(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('model = "cnn"\n')
    before = snapshot(cfg)
    r = invoke("train", "--config", cfg, *SYNTH, "--tasks", "1", "--out", tmp_path / "run", "--lr", "1e30", *FAST)
    user_error(r, "not finite", "lower the learning rate")
    intact(before)


def test_22_unknown_model_name(tmp_path):
    user_error(invoke("train", "--model", "resnet181", *SYNTH, "--out", tmp_path / "run", *FAST),
               "unknown model 'resnet181'", "resnet18")
    assert not (tmp_path / "run").exists()


def test_23_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    before = snapshot(blocker)
    user_error(invoke("train", "--model", "cnn", *SYNTH, "--out", blocker / "run", *FAST), "cannot write")
    intact(before)


def test_24_disk_full_while_saving(tmp_path, monkeypatch):
    import anpyc.rundir as rundir

    stream = tiny_stream("mlp", num_tasks=2)
    learner = anpyc.ContinualLearner("mlp", input_spec=stream.input_spec, out_dir=tmp_path / "run",
                                     config=fast_config(), model_kwargs={"hidden": [8]})
    learner.learn(stream[0])
    before = snapshot(tmp_path / "run" / "state", tmp_path / "run" / "run.json")
    real = rundir.os.replace

    def full(src, dst):
        if "state" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(rundir.os, "replace", full)
    with pytest.raises(RunDirError) as e:
        learner.learn(stream[1])
    api_error(e.value, "disk full", "previous state is intact")
    monkeypatch.setattr(rundir.os, "replace", real)
    intact(before)
    committed = [p.name for p in (tmp_path / "run" / "state").iterdir() if p.name.isdigit()]
    assert committed == [f"{json.loads((tmp_path / 'run' / 'run.json').read_text())['generation']:06d}"]
    assert not [p for p in (tmp_path / "run" / "state").iterdir() if p.name.startswith(".")]  # temp removed
    learner.run.close()
    assert anpyc.ContinualLearner.load(tmp_path / "run").task_ids() == [0]


def test_25_config_with_an_unknown_key(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('model = "cnn"\n[optim]\nlearning_rate = 0.1\n')
    before = snapshot(cfg)
    user_error(invoke("train", "--config", cfg, *SYNTH, "--out", tmp_path / "run", *FAST),
               "unknown config key 'optim.learning_rate'", "lr")
    intact(before)


def test_26_config_with_a_wrong_type(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: cnn\noptim:\n  epochs: three\n")
    user_error(invoke("train", "--config", cfg, *SYNTH, "--out", tmp_path / "run"), "epochs", "integer")


def test_27_run_directory_already_holds_a_run(run_copy):
    before = snapshot(run_copy)
    user_error(invoke("train", "--model", "cnn", *SYNTH, "--out", run_copy, *FAST), "already holds a run", "resume")
    intact(before)


def test_28_run_directory_in_use(run_copy):
    from anpyc.rundir import RunDir

    holder = RunDir(run_copy, create=True)  # another process (here: a handle) holds the lock
    try:
        before = snapshot(run_copy)
        user_error(invoke("train", "--out", run_copy, "--resume", "--no-progress", "--no-plots"), "in use")
        intact(before)
    finally:
        holder.close()


def test_29_inputs_of_another_size_between_tasks(tmp_path):
    from anpyc.task import Task

    stream = tiny_stream("mlp", num_tasks=1)
    learner = anpyc.ContinualLearner("mlp", input_spec=stream.input_spec, config=fast_config(),
                                     model_kwargs={"hidden": [8]})
    ds = torch.utils.data.TensorDataset(torch.zeros(4, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DataError) as e:
        learner.learn(Task(0, "odd", ("a", "b"), ds))
    api_error(e.value, "shape (7,)", "same input size")


def test_30_labels_outside_the_task_classes(tmp_path):
    from anpyc.task import Task

    stream = tiny_stream("mlp", num_tasks=1)
    learner = anpyc.ContinualLearner("mlp", input_spec=stream.input_spec, config=fast_config(),
                                     model_kwargs={"hidden": [8]})
    x = torch.stack([stream[0].train[i][0] for i in range(8)])
    ds = torch.utils.data.TensorDataset(x, torch.tensor([0, 1, 2, 0, 1, 5, 0, 1]))
    with pytest.raises(DataError) as e:
        learner.learn(Task(0, "labels", ("a", "b"), ds))
    api_error(e.value, "label", "range")


def test_31_bad_flag_value(tmp_path):
    r = invoke("train", "--model", "cnn", *SYNTH, "--out", tmp_path / "run", "--epochs", "0")
    assert r.exit_code == 2 and "epochs" in r.output and "Traceback" not in r.output


def test_32_device_this_machine_does_not_have(tmp_path):
    """A GPU index past the ones this machine has (no GPU at all, or fewer than asked for) is a one-line error."""
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    user_error(invoke("train", "--model", "cnn", *SYNTH, "--out", tmp_path / "run", "--device", missing, *FAST),
               missing)
    assert not (tmp_path / "run").exists()


def test_33_nan_loss_keeps_the_last_good_state(tmp_path):
    stream = tiny_stream("mlp", num_tasks=2)
    learner = anpyc.ContinualLearner("mlp", input_spec=stream.input_spec, out_dir=tmp_path / "run",
                                     config=fast_config(), model_kwargs={"hidden": [8]})
    learner.learn(stream[0])
    before = snapshot(tmp_path / "run" / "state", tmp_path / "run" / "run.json", tmp_path / "run" / "metrics.json")
    learner.config = learner.config.replace(optim=learner.config.optim.__class__(lr=1e30, epochs=2, batch_size=8))
    with pytest.raises(TrainingDiverged) as e:
        learner.learn(stream[1])
    api_error(e.value, "not finite", "last good state")
    intact(before)
    learner.run.close()
    assert anpyc.ContinualLearner.load(tmp_path / "run").task_ids() == [0]
