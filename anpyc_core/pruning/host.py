"""The learner as a pruning strategy sees it (:class:`anpyc.pruning.PruneHost`), for one task."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import torch

from ..events import Epoch, PruneStep

if TYPE_CHECKING:
    from ..learner import ContinualLearner
    from ..task import Task

__all__ = ["LearnerHost"]


class LearnerHost:
    """Scores, releases, retrains and checkpoints task ``task`` (index ``k``) of ``learner``."""

    def __init__(self, learner: "ContinualLearner", task: "Task", k: int):
        self.l, self.task, self.k = learner, task, k

    def unit_scores(self) -> torch.Tensor:
        return self.l.space.unit_scores({n: s.cpu() for n, s in self.l._element_importance(self.task, self.k).items()})

    def claim(self) -> torch.Tensor:
        return self.l.space.owners == self.k

    def releasable(self, order: torch.Tensor, count: int) -> torch.Tensor:
        return self.l.space.releasable(order, count, self.k, self.l.config.prune.min_units_per_group)

    def release(self, units: torch.Tensor) -> None:
        if units.numel() == 0:
            return
        mask = torch.zeros(self.l.space.num_units, dtype=torch.bool)
        mask[units] = True
        self.l.space.release(mask)
        self.l.space.on_release(self.l._params(), mask)

    def retrain(self, step: int) -> None:
        cfg = self.l.config.optim
        self.l._optimizer = None
        for epoch in range(self.l.config.prune.retrain_epochs):
            res = self.l._run_epoch(self.task, self.k, phase="retrain", step=step, epoch=epoch, cfg=cfg)
            self.l._log(Epoch(task=self.task.id, phase="retrain", step=step, epoch=epoch, loss=res.loss,
                              train_acc=res.accuracy, penalty=res.penalty))
        self.l._optimizer = None

    def val_accuracy(self) -> float:
        return self.l._val_accuracy(self.task, self.k)

    def val_size(self) -> int:
        ds = self.task.val if self.task.val is not None and len(self.task.val) > 0 else self.task.train
        return len(ds)

    def snapshot(self) -> object:
        l = self.l
        return (
            {n: t.detach().clone() for n, t in l.trunk.state_dict().items()},
            l.space.owners.clone(),
            copy.deepcopy(l.model.heads[str(self.k)].state_dict()),
            {n: v.clone() for n, v in l.stats[self.k].items()},
        )

    def restore(self, snap: object) -> None:
        trunk, owners, head, stats = snap
        l = self.l
        l.trunk.load_state_dict(trunk)
        l.space.owners = owners
        l.model.heads[str(self.k)].load_state_dict(head)
        for n, v in stats.items():
            l.stats[self.k][n].copy_(v)

    def checkpoint(self, state: dict) -> None:
        self.l.cursor["prune"] = state
        self.l.save()

    def log(self, event: PruneStep) -> None:
        self.l._log(dataclasses.replace(event, task=self.task.id))
