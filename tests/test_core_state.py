"""Run directories: safetensors state with versioned metadata, atomic generations, resume == uninterrupted."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import anpyc
from anpyc.errors import RunDirError, StateFileError
from anpyc.learner import Callback

from conftest import fast_config, tiny_stream

GUARDED = {"prune.mode": "guarded", "prune.step": 0.3, "prune.min_step": 0.1, "prune.tolerance": 0.2,
           "optim.epochs": 2}


class Crash(Callback):
    """Raises (as a SIGKILL would stop the process) at the n-th event of a kind."""

    def __init__(self, kind: str, n: int, **match):
        self.kind, self.n, self.match, self.seen = kind, n, match, 0

    def on_event(self, event):
        if event["event"] == self.kind and all(event.get(k) == v for k, v in self.match.items()):
            self.seen += 1
            if self.seen == self.n:
                raise KeyboardInterrupt(f"crash at {event}")


def _run(path, model="test_resnet", callbacks=(), num_tasks=3):
    stream = tiny_stream(model, num_tasks=num_tasks)
    learner = anpyc.ContinualLearner(model, input_spec=stream.input_spec, out_dir=path,
                                     config=fast_config(**GUARDED), callbacks=callbacks)
    return learner, stream


def _finish(learner, stream):
    for task in stream:
        learner.learn(task)
    return learner


def _assert_same(a, b):
    ma, mb = a.metrics(), b.metrics()
    assert ma["accuracy_matrix"] == mb["accuracy_matrix"]
    assert ma["val_accuracy_matrix"] == mb["val_accuracy_matrix"]
    assert ma["capacity"] == mb["capacity"]
    assert torch.equal(a.space.owners, b.space.owners)
    for (n, p), (_, q) in zip(a.trunk.named_parameters(), b.trunk.named_parameters()):
        assert torch.equal(p, q), n


def test_masks_file_is_readable_with_safetensors_alone(tmp_path):
    learner, stream = _run(tmp_path / "run", num_tasks=2)
    _finish(learner, stream)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["format"] == "anpyc.run" and run["version"] == 3
    state = tmp_path / "run" / "state" / f"{run['generation']:06d}"
    with safe_open(state / "masks.safetensors", framework="pt") as f:
        meta = f.metadata()
        owners = f.get_tensor("owners")
    assert meta["format"] == "anpyc.masks" and meta["version"] == "3"
    schema = json.loads(meta["schema"])
    assert schema["granularity"] == "unit" and schema["free"] == 255 and schema["num_tasks"] == 2
    assert owners.dtype == torch.uint8 and owners.numel() == schema["num_units"] == learner.space.num_units
    assert sum(g["size"] for g in schema["groups"]) == owners.numel()
    assert torch.equal(owners, learner.space.owners)
    assert set(owners.unique().tolist()) <= {0, 1, 255}
    for name, fmt in [("trunk", "anpyc.trunk"), ("heads", "anpyc.heads"), ("stats", "anpyc.stats"),
                      ("consolidation", "anpyc.consolidation")]:
        with safe_open(state / f"{name}.safetensors", framework="pt") as f:
            assert f.metadata()["format"] == fmt
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_tasks"] == 2 and len(metrics["accuracy_matrix"]) == 2
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert {"task_start", "epoch", "prune_step", "task_end"} <= {e["event"] for e in events}


@pytest.mark.parametrize("crash", [
    ("epoch", 1, {"task": 1, "phase": "train"}),   # between epochs: resumes with the optimizer state
    ("prune_step", 2, {}),                          # inside the prune loop, before the step is saved
    ("task_end", 2, {}),                            # after evaluation, before the task's final save
])
def test_resume_equals_uninterrupted(tmp_path, crash):
    ref, stream = _run(tmp_path / "ref")
    _finish(ref, stream)
    kind, n, match = crash
    learner, stream = _run(tmp_path / "run", callbacks=[Crash(kind, n, **match)])
    with pytest.raises(KeyboardInterrupt):
        _finish(learner, stream)
    learner.run.close()
    resumed = anpyc.ContinualLearner.resume(tmp_path / "run")
    _finish(resumed, stream)
    _assert_same(ref, resumed)


def test_run_dir_errors(tmp_path):
    learner, stream = _run(tmp_path / "run", num_tasks=1)
    _finish(learner, stream)
    learner.run.close()
    with pytest.raises(RunDirError, match="already holds a run"):
        _run(tmp_path / "run")
    with pytest.raises(RunDirError, match="does not exist"):
        anpyc.ContinualLearner.load(tmp_path / "nope")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    masks = tmp_path / "run" / "state" / f"{run['generation']:06d}" / "masks.safetensors"
    data = masks.read_bytes()
    masks.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match="corrupt"):
        anpyc.ContinualLearner.load(tmp_path / "run")
    masks.unlink()
    with pytest.raises(RunDirError, match="missing state/.*masks.safetensors"):
        anpyc.ContinualLearner.load(tmp_path / "run")


def test_load_masks_rejects_another_backbone(tmp_path):
    from anpyc.masks import load_masks

    learner, stream = _run(tmp_path / "a", num_tasks=1)
    _finish(learner, stream)
    other, _ = _run(tmp_path / "b", model="test_efficientnet", num_tasks=1)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    path = tmp_path / "a" / "state" / f"{run['generation']:06d}" / "masks.safetensors"
    with pytest.raises(StateFileError, match="another backbone"):
        load_masks(path, other.space)
    tensors, schema = load_masks(path, learner.space)
    assert schema["fingerprint"] == learner.space.layout_key()


def test_mask_file_v2_counts_tasks_and_reads_v1(tmp_path):
    """v2 stores the task count (v1's index list cost ~4 bytes a task); a v1 file still loads, tasks included."""
    from anpyc.tensorio import save_tensors
    from anpyc.masks import load_masks, save_masks, schema_tasks

    learner, _ = _run(tmp_path / "run", num_tasks=1)
    space = learner.space
    space.owners[:3] = torch.tensor([0, 1, 2], dtype=torch.uint8)
    sizes = {}
    for n in (3, 200):
        save_masks(tmp_path / f"m{n}.safetensors", space, tasks=list(range(n)))
        sizes[n] = (tmp_path / f"m{n}.safetensors").stat().st_size
    assert sizes[200] - sizes[3] <= 8  # the task count's digits, not a list of 200 indices
    _, schema = load_masks(tmp_path / "m3.safetensors", space)
    assert schema["num_tasks"] == 3 and schema_tasks(schema) == [0, 1, 2]
    with pytest.raises(ValueError, match="0..2 in order"):
        save_masks(tmp_path / "bad.safetensors", space, tasks=[0, 2, 3])
    v1 = {**space.schema(), "tasks": [0, 1, 2]}
    save_tensors(tmp_path / "v1.safetensors", space.tensors(), fmt="anpyc.masks", version=1, schema=v1)
    space.owners.fill_(255)
    tensors, schema = load_masks(tmp_path / "v1.safetensors", space)
    assert schema_tasks(schema) == [0, 1, 2] and space.owners[:3].tolist() == [0, 1, 2]
