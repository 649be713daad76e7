"""The learner as a pruning strategy sees it, for one task: both views of :mod:`anpyc.pruning.base`
(:class:`~anpyc.pruning.base.Ownership` and :class:`~anpyc.pruning.base.Training`) in one adapter."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import TYPE_CHECKING, Callable

import torch
from torch.utils.data import Subset

from ..consolidation import pull_toward
from ..events import Epoch, PruneStep
from .base import PruneState
from ..training import derive_seed
from .plan import group_budget

if TYPE_CHECKING:
    from ..learner import ContinualLearner
    from ..task import Task

__all__ = ["LearnerHost"]


class LearnerHost:
    """Scores, releases, retrains and checkpoints task ``task`` (index ``k``) of ``learner``."""

    def __init__(self, learner: "ContinualLearner", task: "Task", k: int):
        self.learner, self.task, self.index = learner, task, k
        self.runner = learner.runner
        self._element_scores: dict[str, torch.Tensor] = {}  # of the last unit_scores(): what the pull weights by
        self._evidence: Subset | None = None  # the training samples evidence_correct() adds (built on first use)

    def unit_scores(self) -> torch.Tensor:
        self._element_scores = self.runner.importance(self.task, self.index)
        return self.learner.space.unit_scores({n: s.cpu() for n, s in self._element_scores.items()})

    def claim(self) -> torch.Tensor:
        return self.learner.space.owners == self.index

    def releasable(self, order: torch.Tensor, count: int) -> torch.Tensor:
        return self.learner.space.releasable(order, count, self.index, self.learner.config.prune.min_units_per_group)

    def release(self, units: torch.Tensor) -> None:
        if units.numel() == 0:
            return
        mask = torch.zeros(self.learner.space.num_units, dtype=torch.bool)
        mask[units] = True
        self.learner.space.release(mask)
        self.learner.space.on_release(self.runner.params(), mask)

    def retrain(self, step: int) -> None:
        cfg = self.learner.config.optim
        self.runner.end_optimizer()
        for epoch in range(self.learner.config.prune.retrain_epochs):
            res = self.runner.run_epoch(self.task, self.index, phase="retrain", step=step, epoch=epoch, cfg=cfg)
            self.learner.emit(Epoch(task=self.task.id, phase="retrain", step=step, epoch=epoch, loss=res.loss,
                                    train_acc=res.accuracy, penalty=res.penalty))
        self.runner.end_optimizer()

    def retrain_until(self, step: int, stop: Callable[[], bool], pull_from: object) -> int:
        """Retrain for at most ``prune.retrain_epochs``, stopping after the first epoch at which ``stop()`` holds;
        with ``consolidation.pull`` the kept weights are pulled toward ``pull_from`` (a :meth:`snapshot`) by the
        importance of the last :meth:`unit_scores`. Returns the epochs run."""
        learner = self.learner
        cfg = learner.config
        extra = None
        if cfg.consolidation.pull > 0 and self._element_scores:
            params = self.runner.params()
            anchor = {n: pull_from[0][n].to(p.device) for n, p in params.items()}
            own = {n: (learner.space.element_owner(n, tuple(p.shape)) == self.index).to(p.device)
                   for n, p in params.items()}
            extra = pull_toward(params, anchor, self._element_scores, own, cfg.consolidation.pull)
        self.runner.end_optimizer()
        epochs = 0
        for epoch in range(cfg.prune.retrain_epochs):
            res = self.runner.run_epoch(self.task, self.index, phase="retrain", step=step, epoch=epoch, cfg=cfg.optim,
                                        extra=extra)
            learner.emit(Epoch(task=self.task.id, phase="retrain", step=step, epoch=epoch, loss=res.loss,
                               train_acc=res.accuracy, penalty=res.penalty))
            epochs += 1
            if stop():
                break
        self.runner.end_optimizer()
        return epochs

    def epochs(self) -> int:
        """The task's training epochs (``optim.epochs``)."""
        return self.learner.config.optim.epochs

    def train_epoch(self, epoch: int) -> None:
        """Training epoch ``epoch`` of the task (the same batches as in the train phase), under the task's masks."""
        res = self.runner.run_epoch(self.task, self.index, phase="train", step=0, epoch=epoch,
                                    cfg=self.learner.config.optim)
        self.learner.emit(Epoch(task=self.task.id, phase="train", epoch=epoch, loss=res.loss, train_acc=res.accuracy,
                                penalty=res.penalty))

    def val_accuracy(self) -> float:
        return self.runner.val_accuracy(self.task, self.index)

    def _val_set(self):
        return self.task.val if self.task.val is not None and len(self.task.val) > 0 else self.task.train

    def val_size(self) -> int:
        return len(self._val_set())

    def val_correct(self) -> torch.Tensor:
        return self.runner.correct(self.index, self._val_set())

    def evidence_correct(self, val: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample correctness on the validation set, then, where it holds fewer than
        ``prune.gradual.guard_samples``, on enough training samples (a subset fixed per task) to make up the
        difference: the evidence for a release made without retraining. Such a release has not been fitted to the
        training samples, so how many of them it gets wrong is evidence of what it changed, and the 72 validation images of a split-digits task alone
        cannot show any drop below 1.4% (:mod:`~anpyc.pruning.guard`). They fit the trained model with a wider
        margin than unseen samples do, so validation comes first. ``val``: the validation part, where the caller
        has just measured this network on it."""
        correct = self.val_correct() if val is None else val
        n = min(self.learner.config.prune.gradual.guard_samples - len(correct), len(self.task.train))
        if n <= 0 or self._val_set() is self.task.train:  # no validation set: the training set already is the evidence
            return correct
        if self._evidence is None:
            g = torch.Generator().manual_seed(derive_seed(self.learner.config.seed, self.task.id, "guard-evidence"))
            self._evidence = Subset(self.task.train, torch.randperm(len(self.task.train), generator=g)[:n].tolist())
        return torch.cat([correct, self.runner.correct(self.index, self._evidence)])

    def recalibrate(self) -> None:
        self.runner.recalibrate(self.task, self.index)

    def unit_groups(self) -> tuple[torch.Tensor, int]:
        return self.learner.space.unit_groups()

    def budget(self) -> tuple[torch.Tensor, int]:
        groups, num_groups = self.unit_groups()
        floor = None
        space, grow = self.learner.space, self.learner.config.grow
        if grow.enabled and space.structure is not None:
            floor = torch.tensor([math.ceil(grow.min_free * space.base_sizes.get(g.name, g.size))
                                  for g in space.structure.groups], dtype=torch.long)
        cap, total = group_budget(space.owners, groups, num_groups, self.index, self.learner.config.prune, floor)
        need = self.needed()
        return torch.maximum(cap, need), max(total, int(need.sum()))

    def needed(self) -> torch.Tensor:
        """Per group, the task's own units its subnetwork needs to keep ``prune.min_units_per_group`` active."""
        groups, num_groups = self.unit_groups()
        owners = self.learner.space.owners
        older = torch.bincount(groups[owners.long() < self.index], minlength=num_groups)
        own = torch.bincount(groups[owners == self.index], minlength=num_groups)
        return (self.learner.config.prune.min_units_per_group - older).clamp_min(0).minimum(own)

    def snapshot(self) -> object:
        learner = self.learner
        return (
            {n: t.detach().clone() for n, t in learner.trunk.state_dict().items()},
            learner.space.owners.clone(),
            copy.deepcopy(learner.model.heads[str(self.index)].state_dict()),
            {n: v.clone() for n, v in learner.state.stats[self.index].items()},
        )

    def restore(self, snap: object) -> None:
        trunk, owners, head, stats = snap
        learner = self.learner
        learner.trunk.load_state_dict(trunk)
        learner.space.owners = owners.clone()  # a snapshot may be restored more than once
        learner.model.heads[str(self.index)].load_state_dict(head)
        for n, v in stats.items():
            learner.state.stats[self.index][n].copy_(v)

    def checkpoint(self, state: PruneState) -> None:
        """Commit the learner with the strategy's ``state``; an optimizer still training (the gradual strategy's
        epochs) is saved with it, so a resumed run takes the same steps as an uninterrupted one."""
        self.learner.state.cursor["prune"] = state.to_dict()
        self.learner.save(optimizer=self.runner.optimizer is not None)

    def log(self, event: PruneStep) -> None:
        self.learner.emit(dataclasses.replace(event, task=self.task.id))
