"""Watch a run in TensorBoard: a learner :class:`~anpyc.learner.Callback` that writes its events as scalars.

    from anpyc.adapters.tracking import TensorBoardLogger
    with TensorBoardLogger("runs/tb", retrain_epochs=learner.config.prune.retrain_epochs) as tb:
        learner.callbacks.append(tb)
        learner.fit(stream)
    # tensorboard --logdir runs/tb

Tags (``t`` = task id; every value is the one in ``RUN/events.jsonl``, at the event's wall time):

=================================  ==========================================  ===================================
tag                                value                                       step
=================================  ==========================================  ===================================
``task_t/train_loss``, ``_acc``    mean training loss / accuracy of the epoch  training epoch
``task_t/retrain_loss``, ``_acc``  the same in the retrain epochs of pruning    prune step x retrain epochs + epoch
``task_t/val_acc_trained``         validation accuracy before pruning          0
``task_t/prune_kept_share``        share of the task's claimed units it keeps   prune step
``task_t/prune_val_acc``           validation accuracy after the prune step    prune step
``task_t/prune_accepted``          1 kept, 0 rolled back                       prune step
``accuracy/task_j``                test accuracy of the ``j``-th task learned  position of the task just learned
                                   (accuracy matrix R[i][j]; a curve a task)   in the stream (``i``)
``accuracy/mean``                  mean of that row (ACC so far)               ``i``
``capacity/units``                 share of all units owned by some task       ``i``
``subnetwork/params``, ``flops``   the learned task's subnetwork               ``i``
=================================  ==========================================  ===================================

The package is an optional extra (``pip install "anpyc[tensorboard]"``); the core never imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anpyc.errors import ConfigError
from anpyc.events import Epoch, Eval, Event, PruneStep, TaskEnd
from anpyc.learner import Callback

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger(Callback):
    """Writes learner events to TensorBoard event files in ``log_dir`` (opened at the first event).

    ``retrain_epochs`` (``config.prune.retrain_epochs``) lays the retrain epochs of successive prune steps one after
    another on the x-axis. Resuming a run into the same ``log_dir`` adds a new event file; TensorBoard shows both.
    """

    def __init__(self, log_dir: str | os.PathLike, *, retrain_epochs: int = 1, flush_secs: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises ImportError when the tensorboard package is missing
            raise ConfigError("TensorBoard logging needs the tensorboard package, which is not installed",
                              'pip install "anpyc[tensorboard]"') from None
        self.log_dir = Path(log_dir)
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise ConfigError(f"TensorBoard folder {self.log_dir} is a file", "pass a folder to --tensorboard")
        if not os.access(self._existing_parent(), os.W_OK):
            raise ConfigError(f"cannot write TensorBoard logs to {self.log_dir}", "pass a writable folder")
        self.retrain_epochs = max(1, int(retrain_epochs))
        self._writer_class = SummaryWriter
        self._flush_secs = int(flush_secs)
        self._writer: Any = None

    def _existing_parent(self) -> Path:
        path = self.log_dir.resolve()
        while not path.exists():
            path = path.parent
        return path

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir), flush_secs=self._flush_secs)
        return self._writer

    def _scalar(self, tag: str, value: Any, step: int, event: Event) -> None:
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)):
            self.writer.add_scalar(tag, float(value), global_step=int(step), walltime=event.time)

    def on_event(self, event: Event) -> None:
        t = f"task_{event.task}"
        if isinstance(event, Epoch):
            step = event.epoch + (event.step or 0) * self.retrain_epochs if event.phase == "retrain" else event.epoch
            self._scalar(f"{t}/{event.phase}_loss", event.loss, step, event)
            self._scalar(f"{t}/{event.phase}_acc", event.train_acc, step, event)
        elif isinstance(event, Eval) and event.phase == "train_end":
            self._scalar(f"{t}/val_acc_trained", event.val_acc, 0, event)
        elif isinstance(event, PruneStep):
            if event.claim:
                self._scalar(f"{t}/prune_kept_share", 1.0 - event.released_total / event.claim, event.k, event)
            self._scalar(f"{t}/prune_val_acc", event.val_acc, event.k, event)
            self._scalar(f"{t}/prune_accepted", bool(event.accepted), event.k, event)
        elif isinstance(event, TaskEnd):
            row = event.acc_row or []
            i = len(row) - 1
            for j, v in enumerate(row):
                self._scalar(f"accuracy/task_{j}", v, i, event)
            known = [v for v in row if isinstance(v, (int, float))]
            if known:
                self._scalar("accuracy/mean", sum(known) / len(known), i, event)
            self._scalar("capacity/units", event.capacity, i, event)
            self._scalar("subnetwork/params", event.params, i, event)
            self._scalar("subnetwork/flops", event.flops, i, event)
            self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
