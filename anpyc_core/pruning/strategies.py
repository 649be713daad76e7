"""The step-wise and scheduled pruning strategies (registered in :data:`anpyc.pruning.PRUNING`).

* ``guarded``: keep releasing ``step`` of the claim (``geometric``: of what the task still keeps) while validation
  accuracy stays within ``tolerance`` of the unpruned accuracy; a step that breaks it is rolled back and the step
  halved, until it is smaller than ``min_step`` or ``max_ratio`` of the claim is released;
* ``schedule``: the original fixed schedule, ``first_ratio`` for the first task, times ``decay`` for each next,
  in increments of ``step``; no rollback;
* ``none``: no pruning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import PruneConfig
from .base import Ownership, PruneState, Strategy, Training, register, select_release, tolerance

__all__ = ["NoPruning", "Guarded", "Schedule", "GuardedState"]


@register
class NoPruning(Strategy):
    """No pruning: the task keeps every unit it claimed."""

    name = "none"

    def run(self, own: Ownership, training: Training, cfg: PruneConfig, state: PruneState, *,
            task_index: int) -> PruneState:
        state.done = True
        return state


@dataclass
class GuardedState(PruneState):
    step_size: float | None = None  # the share of the claim the next step releases (halved after a rollback)

    LEGACY = ("step",)

    @classmethod
    def legacy(cls, d: dict[str, Any]) -> dict[str, Any]:
        if "step" in d:  # written before states were versioned
            d["step_size"] = d.pop("step")
        return d


@register
class Guarded(Strategy):
    """Release ``step`` of the claim at a time while validation accuracy stays within ``tolerance``."""

    name = "guarded"
    state_type = GuardedState

    def run(self, own: Ownership, training: Training, cfg: PruneConfig, state: GuardedState, *,
            task_index: int) -> GuardedState:
        if state.step_size is None:
            state.step_size = cfg.steps.step
        while not state.done:
            claim = state.claim
            steps = cfg.steps
            if claim == 0 or state.step_size < steps.min_step - 1e-12 or state.released >= steps.max_ratio * claim:
                state.done = True
                break
            base = claim - state.released if cfg.steps.geometric else claim  # what the step is a fraction of
            want = max(1, int(round(state.step_size * base)))
            want = min(want, int(cfg.steps.max_ratio * claim) - state.released) if cfg.steps.max_ratio < 1 else want
            units = select_release(own, max(want, 0))
            if units.numel() == 0:
                state.done = True
                break
            snap = own.snapshot()
            own.release(units)
            training.retrain(state.taken)
            acc = training.val_accuracy()
            accepted = acc >= state.a0 - tolerance(cfg, training.val_size())
            record = {"released": int(units.numel()), "val_acc": acc, "accepted": accepted, "step": state.step_size}
            if accepted:
                state.released += int(units.numel())
            else:
                own.restore(snap)
                state.step_size = state.step_size / 2
            state.record(training, record, val_acc=acc, accepted=accepted)
            training.checkpoint(state)
        return state


@register
class Schedule(Strategy):
    """The original schedule: ratio ``first_ratio * decay**task_index`` reached in ``step`` increments."""

    name = "schedule"

    def run(self, own: Ownership, training: Training, cfg: PruneConfig, state: PruneState, *,
            task_index: int) -> PruneState:
        target = cfg.steps.first_ratio * (cfg.steps.decay ** task_index)
        while not state.done:
            ratio = min(target, (state.taken + 1) * cfg.steps.step)
            want = int(round(ratio * state.claim)) - state.released
            if ratio <= 0 or state.claim == 0:
                state.done = True
                break
            units = select_release(own, max(want, 0)) if want > 0 else torch.zeros(0, dtype=torch.long)
            own.release(units)
            training.retrain(state.taken)
            acc = training.val_accuracy()
            state.released += int(units.numel())
            state.done = ratio >= target - 1e-12
            state.record(training, {"released": int(units.numel()), "val_acc": acc, "accepted": True, "ratio": ratio},
                         val_acc=acc, accepted=True)
            training.checkpoint(state)
        return state
