"""Contracts over whole registries, not hand-picked members: every method preset builds, round-trips, learns and keeps
its promise (exact earlier tasks under a hard freeze, reported drift otherwise, masked = sliced); every pruning
strategy resumes from every checkpoint it writes to the same result as an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import anpyc
from anpyc.config import LearnerConfig, from_dict, to_dict
from anpyc.presets import METHODS
from anpyc.pruning import PRUNING
from anpyc.structure.walk import close

from conftest import tiny_stream

FAST = {"optim.epochs": 2, "optim.batch_size": 16, "prune.retrain_epochs": 1, "importance.max_batches": 2,
        "importance.batch_size": 16, "eval_batch_size": 64, "threads": 1}


def _mlp(cfg, stream, out_dir=None):
    return anpyc.ContinualLearner("mlp", input_spec=stream.input_spec, config=cfg, model_kwargs={"hidden": [16, 16]},
                                  out_dir=out_dir)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_preset_learns_and_keeps_its_promise(method):
    cfg = anpyc.method_config(method, **{**FAST, "optim.epochs": 8})  # Adam at lr 1e-3 (EWC) needs a few epochs
    assert from_dict(LearnerConfig, to_dict(cfg)) == cfg  # what run.json records rebuilds the same config
    assert METHODS.describe(method), f"preset {method!r} has no help text"
    stream = tiny_stream("mlp", num_tasks=3, samples_per_class=16)
    learner = _mlp(cfg, stream)
    metrics = learner.fit(stream)
    diagonal = [metrics["accuracy_matrix"][j][j] for j in range(3)]
    assert sum(diagonal) / 3 > 0.6, (method, diagonal)  # two classes per task: above chance
    x = torch.randn(4, *stream.input_spec.shape, generator=torch.Generator().manual_seed(3))
    for t in learner.task_ids():  # the exactness invariant: masked dense = physically pruned
        with torch.no_grad():
            ok, diff = close(learner.subnetwork(t)(x), learner.reference_forward(t, x).cpu())
        assert ok, (method, t, diff)
    drift = [v for h in learner.state.history for v in h["drift"].values()]
    assert len(drift) == 3  # tasks 0 (after task 1), 0 and 1 (after task 2)
    if cfg.consolidation.rule == "hard" and cfg.inference != "shared":
        assert metrics["bwt"] == 0.0 and drift == [0.0, 0.0, 0.0], (method, metrics["bwt"], drift)
    else:
        assert all(v >= 0 for v in drift) and any(v > 0 for v in drift), (method, drift)


class _Stop(Exception):
    pass


def _saves(cfg, stream, tmp: Path) -> tuple[int, dict]:
    """How many times an uninterrupted run saves, and what it ends with."""
    learner = _mlp(cfg, stream, tmp / "reference")
    count = 0
    real = learner.save

    def save(**kw):
        nonlocal count
        count += 1
        real(**kw)

    learner.save = save
    learner.fit(stream)
    learner.close()
    return count, _result(learner)


def _result(learner) -> dict:
    return {"acc": learner.state.acc_test, "owners": learner.space.owners.tolist(),
            "trunk": [p.detach().clone() for p in learner.trunk.parameters()],
            "prune": [h["prune"] for h in learner.state.history]}


@pytest.mark.parametrize("mode", PRUNING.names())
def test_every_strategy_resumes_from_every_checkpoint(mode, tmp_path):
    """Stop the run right after its n-th save (each one a checkpoint in some phase: an epoch of the train phase, a
    step of the prune phase, the end of a task), resume it from the directory, and finish: the result is the
    uninterrupted run's, for every n."""
    cfg = anpyc.method_config("anpyc", **{**FAST, "prune.mode": mode, "checkpoint_epochs": True,
                                          "optim.epochs": 3, "grow.min_free": 0.5})
    stream = tiny_stream("mlp", num_tasks=2, samples_per_class=16)
    total, want = _saves(cfg, stream, tmp_path)
    assert total >= 4, total
    phases = set()
    for n in range(1, total):
        run = tmp_path / f"stop{n}"
        learner = _mlp(cfg, stream, run)
        count, real = 0, learner.save

        def save(**kw):
            nonlocal count
            real(**kw)
            count += 1
            if count == n:
                raise _Stop

        learner.save = save
        with pytest.raises(_Stop):
            learner.fit(stream)
        phases.add(learner.state.cursor["phase"])
        learner.close()
        resumed = anpyc.ContinualLearner.resume(run)
        resumed.fit(stream)
        got = _result(resumed)
        resumed.close()
        assert got["acc"] == want["acc"] and got["owners"] == want["owners"] and got["prune"] == want["prune"], n
        assert all(torch.equal(a, b) for a, b in zip(got["trunk"], want["trunk"])), n
    assert {"prune", "done"} <= phases, phases  # the end of the dense epochs, the end of a task
    if PRUNING.get(mode).dense_epochs(cfg.prune, cfg.optim.epochs) > 1:
        assert "train" in phases, phases  # a checkpoint between dense epochs
