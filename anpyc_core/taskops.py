"""The per-task operations of a :class:`~anpyc.learner.ContinualLearner` that its loop and the pruning host
(:mod:`anpyc.pruning.host`) call: which masks and statistics a task index runs with, one training epoch under its
consolidation rule, evaluation and per-sample correctness, BatchNorm recalibration, element importance.

``TaskOps`` is a mixin: it holds no state of its own and reads the learner's (``config``, ``space``, ``model``,
``trunk``, ``stats``, ``tasks``, ``_data``, ``omega``, ``anchor``, ``tracker``, ``policy``, ``loaders``, ``ctx``,
``device``, the optimizer it makes lazily). The loop itself -- which phase comes next, what is saved when -- stays in
:mod:`anpyc.learner`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from .consolidation import Consolidation, Stack, create_consolidation
from .dist import wrap_ddp
from .errors import DataError
from .importance import task_importance
from .task import Task
from .training import (correctness, derive_seed, evaluate, make_loader, make_optimizer, tagged_concat, take_batches,
                       train_epoch)

__all__ = ["TaskOps"]


class TaskOps:
    """Masks, statistics, epochs, evaluation and importance of one task index of the learner (a mixin)."""

    def _use_task(self, k: int) -> None:
        """Masks, statistics of task index ``k`` (its subnetwork: units owned by tasks 0..k)."""
        active = self.space.active(self._mask_index(k))
        dev = self.device
        self.model.set_masks({n: m.to(dev) for n, m in self.space.tensor_masks(active).items()},
                             {n: m.to(dev) for n, m in self.space.norm_masks(active).items()},
                             None if (fm := self.space.feature_mask(active)) is None else fm.to(dev))
        self.model.use_stats(self._stats_of(k))

    def _mask_index(self, k: int) -> int:
        """The task index whose mask task index ``k`` runs with: its own, or under ``inference = "shared"`` (the
        paper mode) the newest task's, the whole network as it is now."""
        return max(k, len(self.tasks) - 1) if self.config.inference == "shared" else k

    def _stats_of(self, k: int) -> dict[str, torch.Tensor]:
        """The BatchNorm statistics task index ``k`` runs with. Under hard consolidation a task's parameters never
        change after it, so the statistics it ended with stay exact for it. Methods that keep changing shared
        parameters (fine-tuning, joint training, EWC/MAS/SI, the soft rules) run every task with the latest
        statistics, the ones that belong to the current weights: an earlier task's own statistics were measured on
        older weights and would add a drop of their own (joint training, the upper bound, lost up to 19 points)."""
        if self.config.consolidation.rule != "hard" and self.stats:
            k = max(self.stats)
        return self.stats.get(k, {})

    def _old_masks(self, k: int) -> dict[str, torch.Tensor]:
        return {n: (self.space.element_owner(n, tuple(p.shape)) < k).to(p.device)
                for n, p in self._params().items()}

    def _forward_train(self, k: int) -> Callable:
        """The training forward: through DDP under torchrun; per-sample heads when replaying all tasks."""
        model = self._ddp if self._ddp is not None else self.model
        if self.config.replay == "all":
            return lambda x, batch: model(x, batch[2].to(self.device))
        return lambda x, batch: model(x, k)

    def _train_dataset(self, task: Task, k: int) -> Dataset:
        if self.config.replay == "all":
            parts = [(j, self._data[r["id"]].train) for j, r in enumerate(self.tasks[: k + 1]) if r["id"] in self._data]
            if len(parts) != k + 1:
                raise DataError("joint training needs the data of every earlier task",
                                "call learn() for every task of the stream in order (learned ones are skipped)")
            return tagged_concat(parts)
        return task.train

    def _run_epoch(self, task: Task, k: int, *, phase: str, step: int, epoch: int, cfg,
                   extra: Consolidation | None = None) -> Any:
        """One epoch of task index ``k`` under its consolidation rule (plus ``extra``, e.g. a prune step's pull)."""
        self._use_task(k)
        params = self._params()
        if self._optimizer is None:
            head_params = list(self.model.heads[str(k)].parameters())
            if self.config.replay == "all":
                head_params = [p for j in range(k + 1) for p in self.model.heads[str(j)].parameters()]
            self._optimizer = make_optimizer(list(params.values()) + head_params, cfg)
            self._ddp = wrap_ddp(self.model, self.ctx, self.device)
            if self._optim_state is not None:
                self._optimizer.load_state_dict(self._optim_state)
                self._optim_state = None
        cons = create_consolidation(self.config.consolidation if k > 0 else
                                    type(self.config.consolidation)(rule="none"))
        old = self._old_masks(k)
        cons.begin(params, self.omega, self.anchor, old)
        if extra is not None:
            cons = Stack([cons, extra])
        decay = {n: (~m).float() for n, m in old.items()}
        seed = derive_seed(self.config.seed, task.id, phase, step, epoch)
        torch.manual_seed(seed)
        self.policy.layout(self.trunk)  # a growth may have added weights in the default layout
        loader = self.loaders.feed(make_loader(self._train_dataset(task, k), cfg.batch_size, shuffle=True, seed=seed,
                                               ctx=self.ctx))
        self.model.train()
        ddp_forward = self._forward_train(k)
        total = len(loader)
        res = train_epoch(
            ddp_forward, loader, self._optimizer, params, cons, self.tracker, cfg, decay_mask=decay, device=self.device,
            on_batch=(lambda b, loss: [c.on_batch(phase, b, total, loss) for c in self.callbacks]) if self.callbacks
            else None, policy=self.policy,
        )
        self._last_epoch = res  # its timing goes into the Epoch event logged for it (_log)
        for v in self.stats.get(k, {}).values():  # each rank saw its own shard: average the statistics
            if v.is_floating_point():
                self.ctx.all_reduce_mean_(v)
        return res

    def _eval(self, k: int, dataset: Dataset | None) -> float | None:
        if dataset is None or len(dataset) == 0:
            return None
        self._use_task(k)
        self.model.eval()
        return evaluate(self.policy.wrap(lambda x: self.model(x, k)), dataset, self.config.eval_batch_size,
                        self.device, self.loaders.feed)

    def _correct(self, k: int, dataset: Dataset) -> torch.Tensor:
        """Per-sample correctness of task index ``k``'s subnetwork on ``dataset`` (eval mode)."""
        self._use_task(k)
        self.model.eval()
        return correctness(self.policy.wrap(lambda x: self.model(x, k)), dataset, self.config.eval_batch_size,
                           self.device, self.loaders.feed)

    @torch.no_grad()
    def _recalibrate(self, task: Task, k: int) -> None:
        """Re-estimate the BatchNorm statistics task index ``k`` runs with on ``prune.calibration_batches`` training
        batches (a cumulative average: after a prune step the old ones describe another network). The batches are
        those the task trains on (every task's under joint training)."""
        stats, n = self._stats_of(k), self.config.prune.calibration_batches
        if not stats or n == 0:
            return
        modules = [self.trunk.get_submodule(m) for m in self.stat_names]
        momenta = [m.momentum for m in modules]
        for name, v in stats.items():
            v.copy_(torch.ones_like(v) if name.endswith("running_var") else torch.zeros_like(v))
        self._use_task(k)
        self.model.train()
        try:
            for m in modules:
                m.momentum = None  # cumulative average over the calibration batches
            seed = derive_seed(self.config.seed, task.id, "calibrate", len(self.history))
            for x, _ in take_batches(self._train_dataset(task, k), self.config.optim.batch_size, n, seed, self.device,
                                     self.ctx, self.loaders.feed):
                with self.policy.autocast():
                    self.model(self.policy.inputs(x), k)
        finally:
            for m, mom in zip(modules, momenta):
                m.momentum = mom
            self.model.eval()
        for v in stats.values():
            if v.is_floating_point():
                self.ctx.all_reduce_mean_(v)

    def _val_accuracy(self, task: Task, k: int) -> float:
        ds = task.val if task.val is not None and len(task.val) > 0 else task.train
        return float(self._eval(k, ds))

    def _element_importance(self, task: Task, k: int) -> dict[str, torch.Tensor]:
        """Element scores of the trunk on task ``k`` (its subnetwork, eval mode), averaged across ranks."""
        self._use_task(k)
        self.model.eval()
        seed = derive_seed(self.config.seed, task.id, "importance", len(self.history))
        return task_importance(self.tracker, self.policy.wrap(lambda x: self.model(x, k)), self._params(), task.train,
                               self.config.importance, seed, self.device, self.ctx, self.loaders.feed)

    def _capacity_params(self) -> float:
        cost = self.space.unit_cost().double()
        total = float(cost.sum())
        return float(cost[self.space.owners != self.space.free].sum()) / total if total else 0.0
