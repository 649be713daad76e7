"""What a run has learned and recorded besides the trunk's weights, the heads and the unit owners: one object the
learner owns and the checkpoint writes and reads as a whole (:mod:`anpyc.checkpoint`).

* the task records in learned order (id, name, classes, index, final, done) and the cursor (where the current task
  stands: phase, epoch, the pruning strategy's state);
* the accuracy matrices (test and validation) and the history (one record per finished task);
* per-task BatchNorm statistics, the consolidated importance (``omega``) and the anchors it pulls toward;
* the trunk's initial values (what a claimed unit restarts from; the loaded weights when the run started from them);
* the growth record (every widening and the new entries it drew, replayed when the run is reopened);
* the probe record of the run-time invariant (:mod:`anpyc.invariant`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .growth import GrowthEvent
from .invariant import Probes

__all__ = ["RunState", "InitialValues", "STAT_BUFFERS"]

STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class InitialValues:
    """The trunk at initialisation: parameters, BatchNorm statistics and the other buffers, by name."""

    params: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    @classmethod
    def of(cls, trunk: nn.Module, stat_modules: list[str]) -> "InitialValues":
        params = {n: p.detach().clone() for n, p in trunk.named_parameters()}
        stats = {f"{m}.{b}": getattr(trunk.get_submodule(m), b).detach().clone()
                 for m in stat_modules for b in STAT_BUFFERS}
        buffers = {n: t.detach().clone() for n, t in trunk.state_dict().items() if n not in params}
        return cls(params, stats, buffers)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every initial value by tensor name (what new entries of a widened tensor are drawn to match)."""
        return {**self.buffers, **self.params, **self.stats}


@dataclass
class RunState:
    """Everything a run carries from task to task besides the trunk, the heads and the owners (module docstring)."""

    init: InitialValues
    probes: Probes
    tasks: list[dict[str, Any]] = field(default_factory=list)
    cursor: dict[str, Any] | None = None
    acc_test: list[list[float | None]] = field(default_factory=list)
    acc_val: list[list[float | None]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    omega: dict[str, torch.Tensor] = field(default_factory=dict)
    anchor: dict[str, torch.Tensor] = field(default_factory=dict)
    growth: list[GrowthEvent] = field(default_factory=list)
    growth_values: dict[str, torch.Tensor] = field(default_factory=dict)

    def record(self, task_id: int) -> dict[str, Any] | None:
        """The record of task ``task_id`` (None when the run has not started it)."""
        return next((r for r in self.tasks if r["id"] == task_id), None)

    def done(self) -> list[dict[str, Any]]:
        """The records of the finished tasks, in learned order."""
        return [r for r in self.tasks if r.get("done")]

    def progress(self) -> dict[str, Any]:
        """What ``state.json`` holds: the cursor, the task records, the accuracy matrices and the history."""
        return {"cursor": self.cursor, "tasks": self.tasks, "acc_test": self.acc_test, "acc_val": self.acc_val,
                "history": self.history}
