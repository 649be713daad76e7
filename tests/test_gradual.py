"""The default strategy (gradual pruning) against a host whose answers are known: what it measures, with which
statistics, how many guard decisions the release below the budget takes, and the evidence the learner gives it."""

from __future__ import annotations

import math

import pytest
import torch

import anpyc
from anpyc.configure import method_config
from anpyc.pruning import PRUNING
from anpyc.pruning.host import LearnerHost
from anpyc.pruning.plan import ladder

N_UNITS, BUDGET, NEED = 40, 20, 6  # the task keeps 20 of 40 units at its budget and needs 6 to stay right
N_VAL, N_TRAIN = 20, 480


class KnownHost:
    """A task of ``N_UNITS`` units in one group, unit ``i`` the ``i``-th most important. Every sample is right while
    the task keeps ``NEED`` units and its statistics describe the network it is; with stale statistics (after an
    epoch or a release, before ``recalibrate``) every prediction is wrong, as a BatchNorm network measured with the
    running averages of a fast-changing ramp can be near chance while it trains at 100%."""

    def __init__(self, need: int = NEED):
        self.need = need
        self.owned = torch.ones(N_UNITS, dtype=torch.bool)
        self.fresh = False  # the train phase just ran
        self.calls: list[tuple[str, bool]] = []
        self.events: list = []

    # what the strategy reads
    def epochs(self) -> int:
        return 10

    def claim(self) -> torch.Tensor:
        return self.owned.clone()

    def budget(self):
        return torch.tensor([N_UNITS]), BUDGET

    def needed(self) -> torch.Tensor:
        return torch.tensor([1])

    def unit_groups(self):
        return torch.zeros(N_UNITS, dtype=torch.long), 1

    def unit_scores(self) -> torch.Tensor:
        self.calls.append(("scores", self.fresh))
        return torch.arange(N_UNITS, 0, -1).float()

    def _right(self, n: int) -> torch.Tensor:
        return torch.full((n,), bool(self.fresh and int(self.owned.sum()) >= self.need))

    def val_correct(self) -> torch.Tensor:
        self.calls.append(("val", self.fresh))
        return self._right(N_VAL)

    def evidence_correct(self, val: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append(("evidence", self.fresh))
        if val is not None:
            assert torch.equal(val, self._right(N_VAL))  # the caller's validation part is this network's
            return torch.cat([val, self._right(N_TRAIN)])
        return self._right(N_VAL + N_TRAIN)

    # what the strategy does
    def train_epoch(self, epoch: int) -> None:
        self.fresh = False

    def release(self, units: torch.Tensor) -> None:
        self.owned &= ~units
        self.fresh = False

    def recalibrate(self) -> None:
        self.fresh = True

    def snapshot(self):
        return self.owned.clone(), self.fresh

    def restore(self, snap) -> None:
        self.owned, self.fresh = snap[0].clone(), snap[1]

    def checkpoint(self, state: dict) -> None:
        pass

    def log(self, event) -> None:
        self.events.append(event)


def _run(host: KnownHost) -> dict:
    cfg = method_config("anpyc").prune
    strategy = PRUNING.get("gradual")
    return strategy.run(host, host, cfg, strategy.start(host, 1.0), task_index=0)


def test_gradual_measures_every_network_with_its_own_statistics():
    """The reference before the ramp, every importance pass of the ramp, the verdict at the budget and every rung
    below it are taken after the statistics were re-estimated: measured with stale ones the task looked at chance
    at its budget, and the guard then released most of what it had kept (split digits, seed 1, task 0: 76%)."""
    host = KnownHost()
    state = _run(host)
    assert [kind for kind, _ in host.calls][:2] == ["val", "scores"]
    assert all(fresh for _, fresh in host.calls), host.calls
    budget = [s for s in state["steps"] if s["decision"] == "budget"]
    assert len(budget) == 1 and budget[0]["val_acc"] == 1.0 and budget[0]["guard_lost"] == 0


def test_release_below_the_budget_bisects_the_ladder():
    """The smallest rung that keeps ``NEED`` units is found with ceil(log2(rungs + 1)) guard decisions (each one is
    a chance to accept a loss the guard cannot see), and the host is left at it."""
    host = KnownHost()
    state = _run(host)
    rungs = ladder(BUDGET / N_UNITS * 0.7, 0.02, 0.7)
    want = min(f for f in rungs if round(f * N_UNITS) >= NEED)
    assert int(host.owned.sum()) == round(want * N_UNITS) == 7
    unused = [s for s in state["steps"] if s["decision"] == "unused"]
    assert len(unused) == 1 and unused[0]["keep"] == pytest.approx(want)
    assert unused[0]["released"] == BUDGET - 7
    assert (unused[0]["evidence_val"], unused[0]["evidence_train"]) == (N_VAL, N_TRAIN)
    decisions = [c for c in host.calls if c[0] == "evidence"][1:]  # the first one is the trained reference
    assert len(rungs) == 9 and len(decisions) <= math.ceil(math.log2(len(rungs) + 1)) + 1, decisions
    assert state["released"] == N_UNITS - 7 and host.events[-1].released_total == N_UNITS - 7


def test_no_rung_accepted_leaves_the_budget_as_it_was():
    host = KnownHost(need=BUDGET)  # every rung below the budget loses every sample
    state = _run(host)
    assert int(host.owned.sum()) == BUDGET and host.fresh  # restored to the recalibrated budget network
    assert [s["decision"] for s in state["steps"]] == ["budget"]


@pytest.fixture(scope="module")
def learned():
    from anpyc.adapters.data import synthetic_stream

    stream = synthetic_stream(num_tasks=1, samples_per_class=40, vector=True, dim=16, seed=5)  # 80 train, 20 val
    cfg = method_config("anpyc", **{"optim.epochs": 1, "optim.batch_size": 16, "importance.max_batches": 1,
                                    "prune.mode": "none", "threads": 1})
    learner = anpyc.ContinualLearner("mlp", input_spec=stream.input_spec, config=cfg, model_kwargs={"hidden": [8]})
    task = stream[0]
    learner.learn(task)
    return learner, task


@pytest.mark.parametrize("samples, want_train", [(500, 80), (50, 30), (20, 0), (0, 0)])
def test_evidence_tops_up_a_small_validation_set_with_training_samples(learned, samples, want_train):
    """The evidence for a release without retraining is the validation set, topped up to ``prune.guard_samples``
    with a fixed subset of the task's training samples (never more than it has)."""
    import dataclasses

    learner, task = learned
    cfg = learner.config
    learner.config = dataclasses.replace(cfg, prune=dataclasses.replace(
        cfg.prune, gradual=dataclasses.replace(cfg.prune.gradual, guard_samples=samples)))
    try:
        host = LearnerHost(learner, task, 0)
        evidence = host.evidence_correct()
        val = host.val_correct()
        assert len(task.val) == 20 and len(task.train) == 80
        assert evidence.shape == (20 + want_train,) and torch.equal(evidence[:20], val)
        if want_train:
            subset = host._evidence
            assert len(set(subset.indices)) == want_train and max(subset.indices) < len(task.train)
            assert torch.equal(evidence[20:], learner.runner.correct(0, subset))
            assert torch.equal(LearnerHost(learner, task, 0).evidence_correct(), evidence)  # the same subset
    finally:
        learner.config = cfg
