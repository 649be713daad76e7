"""The prune-retrain loop's contract: the strategy registry and what a strategy needs from the learner.

After a task trains, its claim (the units it took from the free pool) is shrunk in steps: importance is
recomputed on the task, the least important part of the claim is released back to the free pool, and the
network retrains under consolidation. Strategies (a registry):

* ``guarded`` (default): keep releasing ``step`` of the claim (``geometric``: of what the task still keeps) while
  validation accuracy stays within ``tolerance`` of the unpruned accuracy; a step that breaks it is rolled back and
  the step halved, until it is smaller than ``min_step`` or ``max_ratio`` of the claim is released;
* ``schedule``: the original fixed schedule, ``first_ratio`` for the first task, times ``decay`` for each next,
  in increments of ``step``; no rollback;
* ``none``: no pruning.

A strategy is a pure function of a small *state* dict (kept in the checkpoint) and a :class:`PruneHost` (the
learner, seen through :class:`anpyc.pruning.host.LearnerHost`), so an interrupted loop resumes at the step it was
on. The strategies themselves are in :mod:`anpyc.pruning.strategies`.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from ..config import PruneConfig
from ..events import PruneStep
from ..registry import Registry

__all__ = ["PRUNING", "PruneHost", "select_release", "tolerance", "initial_state"]

PRUNING: Registry = Registry("pruning mode")


class PruneHost(Protocol):
    """What a pruning strategy needs from the learner."""

    def unit_scores(self) -> torch.Tensor: ...
    def claim(self) -> torch.Tensor: ...                       # bool mask of the units the task owns now
    def releasable(self, order: torch.Tensor, count: int) -> torch.Tensor: ...  # pick units, group minimums kept
    def release(self, units: torch.Tensor) -> None: ...
    def retrain(self, step: int) -> None: ...
    def val_accuracy(self) -> float: ...
    def val_size(self) -> int: ...
    def snapshot(self) -> object: ...
    def restore(self, snap: object) -> None: ...
    def checkpoint(self, state: dict) -> None: ...
    def log(self, event: PruneStep) -> None: ...          # the host fills in the task id
    # used by the search strategy (anpyc.pruning.search)
    def unit_groups(self) -> tuple[torch.Tensor, int]: ...   # group index of every unit, number of groups
    def budget(self) -> tuple[torch.Tensor, int]: ...        # units the task may keep per group and in total
    def needed(self) -> torch.Tensor: ...                    # units it must keep per group (group minimums)
    def val_correct(self) -> torch.Tensor: ...               # per-sample correctness on the validation set
    def evidence_correct(self, val: torch.Tensor | None = None) -> torch.Tensor: ...  # plus training samples
    def recalibrate(self) -> None: ...                       # re-estimate the task's BatchNorm statistics
    def retrain_until(self, step: int, stop, pull_from: object) -> int: ...  # epochs run (stops once stop())


def select_release(host: PruneHost, count: int) -> torch.Tensor:
    """The ``count`` least important units of the claim that may be released (group minimums respected)."""
    scores = host.unit_scores()
    claim = host.claim()
    order = torch.argsort(torch.where(claim, scores, torch.full_like(scores, math.inf)), stable=True)
    order = order[: int(claim.sum())]
    return host.releasable(order, count)


def initial_state(state: dict, claim_size: int, a0: float) -> dict:
    if not state:
        state = {"claim": claim_size, "released": 0, "k": 0, "done": False, "a0": a0, "steps": []}
    return state


def tolerance(cfg: PruneConfig, val_size: int) -> float:
    """The allowed validation-accuracy drop: ``cfg.tolerance``, but never less than one validation sample (a
    tolerance finer than the validation set can measure would reject every step)."""
    return max(cfg.tolerance, 1.0 / max(val_size, 1) + 1e-9)
