"""The prune-retrain strategies against a host whose validation accuracy is a known function of what is kept."""

from __future__ import annotations

import torch

from anpyc.config import PruneConfig, StepsConfig
from anpyc.pruning import PRUNING


class _Host:
    """``n`` units, unit ``i`` scored ``i`` (low scores go first); accuracy 0.9 while at least ``need`` are kept."""

    def __init__(self, n: int = 1000, need: int = 30):
        self.kept = torch.ones(n, dtype=torch.bool)
        self.need = need
        self.retrains = 0
        self.events: list[dict] = []

    def unit_scores(self):
        return torch.arange(len(self.kept), dtype=torch.float32)

    def claim(self):
        return self.kept.clone()

    def releasable(self, order, count):
        return order[:count]

    def release(self, units):
        self.kept[units] = False

    def retrain(self, step):
        self.retrains += 1

    def val_accuracy(self):
        return 0.9 if int(self.kept.sum()) >= self.need else 0.5

    def val_size(self):
        return 1000

    def snapshot(self):
        return self.kept.clone()

    def restore(self, snap):
        self.kept = snap.clone()

    def checkpoint(self, state):
        pass

    def log(self, event):
        self.events.append(event)


def _run(**cfg):
    host = _Host()
    strategy = PRUNING.get("guarded")
    steps = StepsConfig(max_ratio=0.99, min_step=0.05, **cfg)
    state = strategy.run(host, host, PruneConfig(tolerance=0.02, steps=steps), strategy.start(host, 0.9), task_index=0)
    return host, state


def test_guarded_linear_steps_are_fractions_of_the_claim():
    host, state = _run(step=0.2)
    # 200, 400, 600, 800 released; 990 fails; 10% -> 900; 990 fails; 5% -> 950; 990 fails; 2.5% < min_step
    assert int(host.kept.sum()) == 50 and state["released"] == 950 and state["done"]
    assert [e["accepted"] for e in host.events] == [True] * 4 + [False, True, False, True, False]
    assert host.kept[-50:].all()  # the most important units stay


def test_guarded_geometric_steps_are_fractions_of_what_is_kept():
    host, state = _run(step=0.5, geometric=True)
    # kept 500, 250, 125, 63, 31 (each step halves what is kept); then 50%, 25%, 12.5%, 6.25% of 31 all go below
    # 30 and are rolled back; 3.1% < min_step. Linear steps of the same claim stop at 50 (test above).
    assert int(host.kept.sum()) == 31 and state["released"] == 969 and state["done"]
    assert [(e["released"], e["accepted"]) for e in host.events] == [
        (500, True), (250, True), (125, True), (62, True), (32, True),
        (16, False), (8, False), (4, False), (2, False)]
    assert host.retrains == 9 and host.kept[-31:].all()
