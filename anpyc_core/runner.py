"""One task index at a time, for the learner's phase loop and the pruning host: the masks and statistics it runs
with, one training epoch under its consolidation rule (with an optimizer of the task's own, which this object owns),
evaluation and per-sample correctness, BatchNorm recalibration, element importance.

:class:`TaskRunner` is composed into the :class:`~anpyc.learner.ContinualLearner` (``learner.runner``); it keeps no
run state of its own but the task's optimizer and the last epoch's timing, and reads the run through the narrow
:class:`RunContext` the learner provides. Which phase comes next and what is saved when stays in :mod:`anpyc.learner`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .config import LearnerConfig
from .consolidation import Consolidation, Stack, create_consolidation
from .dist import DistContext, wrap_ddp
from .errors import DataError
from .importance import Importance, task_importance
from .loading import Loaders
from .masks import MaskSpace
from .precision import Policy
from .runstate import RunState
from .structure.masked import MaskedModel
from .task import Task
from .training import (EpochResult, correctness, derive_seed, evaluate, make_loader, make_optimizer, tagged_concat,
                       take_batches, train_epoch)

__all__ = ["TaskRunner", "RunContext"]


class RunContext(Protocol):
    """What a :class:`TaskRunner` reads of the run (the learner provides it)."""

    config: LearnerConfig
    space: MaskSpace  # replaced when the backbone grows: read it anew on every call
    model: MaskedModel
    trunk: nn.Module
    state: RunState  # task records, statistics per task index, importance and anchors, history
    importance: Importance  # the importance measure of the task being trained (its training hooks accumulate)
    stat_names: list[str]
    policy: Policy
    loaders: Loaders
    ctx: DistContext
    device: torch.device
    callbacks: Iterable[Any]

    def task_data(self, task_id: int) -> Task | None: ...


class TaskRunner:
    """Masks, statistics, epochs, evaluation and importance of one task index of the run ``context`` describes."""

    def __init__(self, context: RunContext):
        self.context = context
        self.optimizer: torch.optim.Optimizer | None = None  # the training task's, made on its first epoch
        self._pending: dict | None = None  # optimizer state a checkpoint saved, loaded into the next optimizer
        self._ddp = None
        self._last_epoch: EpochResult | None = None

    def end_optimizer(self) -> None:
        """The task's optimizer ends here (after its dense epochs, a retrain, or the task); the next epoch makes a
        new one (growth replaces parameters; a task never trains with another task's momentum)."""
        self.optimizer, self._pending = None, None

    def resume_optimizer(self, state: dict) -> None:
        """The optimizer state a checkpoint saved mid-phase: the next epoch's optimizer starts from it."""
        self._pending = state

    def take_last_epoch(self) -> EpochResult | None:
        """The last epoch's result (its timing goes into the Epoch event logged for it), once."""
        res, self._last_epoch = self._last_epoch, None
        return res

    def params(self) -> dict[str, nn.Parameter]:
        """The trunk's trainable parameters by name."""
        return {n: p for n, p in self.context.trunk.named_parameters() if p.requires_grad}

    def use(self, k: int) -> None:
        """Masks, statistics of task index ``k`` (its subnetwork: units owned by tasks 0..k)."""
        space, dev = self.context.space, self.context.device
        active = space.active(self.mask_index(k))
        self.context.model.set_masks({n: m.to(dev) for n, m in space.tensor_masks(active).items()},
                                 {n: m.to(dev) for n, m in space.norm_masks(active).items()},
                                 None if (fm := space.feature_mask(active)) is None else fm.to(dev))
        self.context.model.use_stats(self.stats_of(k))

    def mask_index(self, k: int) -> int:
        """The task index whose mask task index ``k`` runs with: its own, or under ``inference = "shared"`` (the
        paper mode) the newest task's, the whole network as it is now."""
        return max(k, len(self.context.state.tasks) - 1) if self.context.config.inference == "shared" else k

    def stats_of(self, k: int) -> dict[str, torch.Tensor]:
        """The BatchNorm statistics task index ``k`` runs with. Under hard consolidation a task's parameters never
        change after it, so the statistics it ended with stay exact for it. Methods that keep changing shared
        parameters (fine-tuning, joint training, EWC/MAS/SI, the soft rules) run every task with the latest
        statistics, the ones that belong to the current weights: an earlier task's own statistics were measured on
        older weights and would add a drop of their own (joint training, the upper bound, lost up to 19 points)."""
        if self.context.config.consolidation.rule != "hard" and self.context.state.stats:
            k = max(self.context.state.stats)
        return self.context.state.stats.get(k, {})

    def old_masks(self, k: int) -> dict[str, torch.Tensor]:
        return {n: (self.context.space.element_owner(n, tuple(p.shape)) < k).to(p.device)
                for n, p in self.params().items()}

    def train_forward(self, k: int) -> Callable:
        """The training forward: through DDP under torchrun; per-sample heads when replaying all tasks."""
        model = self._ddp if self._ddp is not None else self.context.model
        if self.context.config.replay == "all":
            return lambda x, batch: model(x, batch[2].to(self.context.device))
        return lambda x, batch: model(x, k)

    def train_dataset(self, task: Task, k: int) -> Dataset:
        if self.context.config.replay == "all":
            data = [self.context.task_data(r["id"]) for r in self.context.state.tasks[: k + 1]]
            parts = [(j, d.train) for j, d in enumerate(data) if d is not None]
            if len(parts) != k + 1:
                raise DataError("joint training needs the data of every earlier task",
                                "call learn() for every task of the stream in order (learned ones are skipped)")
            return tagged_concat(parts)
        return task.train

    def run_epoch(self, task: Task, k: int, *, phase: str, step: int, epoch: int, cfg,
                  extra: Consolidation | None = None) -> EpochResult:
        """One epoch of task index ``k`` under its consolidation rule (plus ``extra``, e.g. a prune step's pull)."""
        run = self.context
        self.use(k)
        params = self.params()
        if self.optimizer is None:
            head_params = list(run.model.heads[str(k)].parameters())
            if run.config.replay == "all":
                head_params = [p for j in range(k + 1) for p in run.model.heads[str(j)].parameters()]
            self.optimizer = make_optimizer(list(params.values()) + head_params, cfg)
            self._ddp = wrap_ddp(run.model, run.ctx, run.device)
            if self._pending is not None:
                self.optimizer.load_state_dict(self._pending)
                self._pending = None
        cons = create_consolidation(run.config.consolidation if k > 0 else
                                    type(run.config.consolidation)(rule="none"))
        old = self.old_masks(k)
        cons.begin(params, run.state.omega, run.state.anchor, old)
        if extra is not None:
            cons = Stack([cons, extra])
        decay = {n: (~m).float() for n, m in old.items()}
        seed = derive_seed(run.config.seed, task.id, phase, step, epoch)
        torch.manual_seed(seed)
        run.policy.layout(run.trunk)  # a growth may have added weights in the default layout
        loader = run.loaders.feed(make_loader(self.train_dataset(task, k), cfg.batch_size, shuffle=True, seed=seed,
                                              ctx=run.ctx))
        run.model.train()
        total = len(loader)
        callbacks = list(run.callbacks)
        res = train_epoch(
            self.train_forward(k), loader, self.optimizer, params, cons, run.importance, cfg, decay_mask=decay,
            device=run.device, policy=run.policy,
            on_batch=(lambda b, loss: [c.on_batch(phase, b, total, loss) for c in callbacks]) if callbacks else None,
        )
        self._last_epoch = res  # its timing goes into the Epoch event logged for it
        for v in run.state.stats.get(k, {}).values():  # each rank saw its own shard: average the statistics
            if v.is_floating_point():
                run.ctx.all_reduce_mean_(v)
        return res

    def evaluate(self, k: int, dataset: Dataset | None) -> float | None:
        if dataset is None or len(dataset) == 0:
            return None
        run = self.context
        self.use(k)
        run.model.eval()
        return evaluate(run.policy.wrap(lambda x: run.model(x, k)), dataset, run.config.eval_batch_size, run.device,
                        run.loaders.feed)

    def correct(self, k: int, dataset: Dataset) -> torch.Tensor:
        """Per-sample correctness of task index ``k``'s subnetwork on ``dataset`` (eval mode)."""
        run = self.context
        self.use(k)
        run.model.eval()
        return correctness(run.policy.wrap(lambda x: run.model(x, k)), dataset, run.config.eval_batch_size, run.device,
                           run.loaders.feed)

    @torch.no_grad()
    def recalibrate(self, task: Task, k: int) -> None:
        """Re-estimate the BatchNorm statistics task index ``k`` runs with on ``prune.calibration_batches`` training
        batches (a cumulative average: after a prune step the old ones describe another network). The batches are
        those the task trains on (every task's under joint training)."""
        run = self.context
        stats, n = self.stats_of(k), run.config.prune.calibration_batches
        if not stats or n == 0:
            return
        modules = [run.trunk.get_submodule(m) for m in run.stat_names]
        momenta = [m.momentum for m in modules]
        for name, v in stats.items():
            v.copy_(torch.ones_like(v) if name.endswith("running_var") else torch.zeros_like(v))
        self.use(k)
        run.model.train()
        try:
            for m in modules:
                m.momentum = None  # cumulative average over the calibration batches
            seed = derive_seed(run.config.seed, task.id, "calibrate", len(run.state.history))
            for x, _ in take_batches(self.train_dataset(task, k), run.config.optim.batch_size, n, seed, run.device,
                                     run.ctx, run.loaders.feed):
                with run.policy.autocast():
                    run.model(run.policy.inputs(x), k)
        finally:
            for m, mom in zip(modules, momenta):
                m.momentum = mom
            run.model.eval()
        for v in stats.values():
            if v.is_floating_point():
                run.ctx.all_reduce_mean_(v)

    def val_accuracy(self, task: Task, k: int) -> float:
        ds = task.val if task.val is not None and len(task.val) > 0 else task.train
        return float(self.evaluate(k, ds))

    def importance(self, task: Task, k: int) -> dict[str, torch.Tensor]:
        """Element scores of the trunk on task ``k`` (its subnetwork, eval mode), averaged across ranks."""
        run = self.context
        self.use(k)
        run.model.eval()
        seed = derive_seed(run.config.seed, task.id, "importance", len(run.state.history))
        return task_importance(run.importance, run.policy.wrap(lambda x: run.model(x, k)), self.params(), task.train,
                               run.config.importance, seed, run.device, run.ctx, run.loaders.feed)
