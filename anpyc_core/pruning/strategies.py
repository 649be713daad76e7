"""The adversarial prune-retrain loop (METHOD.md section 3, generalised in section 4).

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
learner), so an interrupted loop resumes at the step it was on.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from .config import PruneConfig
from .registry import Registry

__all__ = ["PRUNING", "PruneHost", "select_release"]

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
    def log(self, event: dict) -> None: ...


def select_release(host: PruneHost, count: int) -> torch.Tensor:
    """The ``count`` least important units of the claim that may be released (group minimums respected)."""
    scores = host.unit_scores()
    claim = host.claim()
    order = torch.argsort(torch.where(claim, scores, torch.full_like(scores, math.inf)), stable=True)
    order = order[: int(claim.sum())]
    return host.releasable(order, count)


def _initial(state: dict, claim_size: int, a0: float) -> dict:
    if not state:
        state = {"claim": claim_size, "released": 0, "k": 0, "done": False, "a0": a0, "steps": []}
    return state


def tolerance(cfg: PruneConfig, val_size: int) -> float:
    """The allowed validation-accuracy drop: ``cfg.tolerance``, but never less than one validation sample (a
    tolerance finer than the validation set can measure would reject every step)."""
    return max(cfg.tolerance, 1.0 / max(val_size, 1) + 1e-9)


@PRUNING.register("none")
def prune_none(host: PruneHost, cfg: PruneConfig, state: dict, *, task_index: int, a0: float) -> dict:
    """No pruning: the task keeps every unit it claimed."""
    state = _initial(state, int(host.claim().sum()), a0)
    state["done"] = True
    return state


@PRUNING.register("guarded")
def prune_guarded(host: PruneHost, cfg: PruneConfig, state: dict, *, task_index: int, a0: float) -> dict:
    """Release ``step`` of the claim at a time while validation accuracy stays within ``tolerance``."""
    state = _initial(state, int(host.claim().sum()), a0)
    state.setdefault("step", cfg.step)
    while not state["done"]:
        claim = state["claim"]
        if claim == 0 or state["step"] < cfg.min_step - 1e-12 or state["released"] >= cfg.max_ratio * claim:
            state["done"] = True
            break
        base = claim - state["released"] if cfg.geometric else claim  # what the step is a fraction of
        want = max(1, int(round(state["step"] * base)))
        want = min(want, int(cfg.max_ratio * claim) - state["released"]) if cfg.max_ratio < 1 else want
        units = select_release(host, max(want, 0))
        if units.numel() == 0:
            state["done"] = True
            break
        snap = host.snapshot()
        host.release(units)
        host.retrain(state["k"])
        acc = host.val_accuracy()
        accepted = acc >= state["a0"] - tolerance(cfg, host.val_size())
        record = {"k": state["k"], "released": int(units.numel()), "val_acc": acc, "accepted": accepted,
                  "step": state["step"]}
        if accepted:
            state["released"] += int(units.numel())
        else:
            host.restore(snap)
            state["step"] = state["step"] / 2
        state["k"] += 1
        state["steps"].append(record)
        host.log({"event": "prune_step", **record, "claim": claim, "released_total": state["released"]})
        host.checkpoint(state)
    return state


@PRUNING.register("schedule")
def prune_schedule(host: PruneHost, cfg: PruneConfig, state: dict, *, task_index: int, a0: float) -> dict:
    """The original schedule: ratio ``first_ratio * decay**task_index`` reached in ``step`` increments."""
    state = _initial(state, int(host.claim().sum()), a0)
    target = cfg.first_ratio * (cfg.decay ** task_index)
    while not state["done"]:
        ratio = min(target, (state["k"] + 1) * cfg.step)
        want = int(round(ratio * state["claim"])) - state["released"]
        if ratio <= 0 or state["claim"] == 0:
            state["done"] = True
            break
        units = select_release(host, max(want, 0)) if want > 0 else torch.zeros(0, dtype=torch.long)
        host.release(units)
        host.retrain(state["k"])
        acc = host.val_accuracy()
        state["released"] += int(units.numel())
        record = {"k": state["k"], "released": int(units.numel()), "val_acc": acc, "accepted": True, "ratio": ratio}
        state["k"] += 1
        state["steps"].append(record)
        state["done"] = ratio >= target - 1e-12
        host.log({"event": "prune_step", **record, "claim": state["claim"], "released_total": state["released"]})
        host.checkpoint(state)
    return state
