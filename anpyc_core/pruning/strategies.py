"""The pruning strategies (a registry, :data:`anpyc.pruning.PRUNING`).

* ``guarded`` (default): keep releasing ``step`` of the claim (``geometric``: of what the task still keeps) while
  validation accuracy stays within ``tolerance`` of the unpruned accuracy; a step that breaks it is rolled back and
  the step halved, until it is smaller than ``min_step`` or ``max_ratio`` of the claim is released;
* ``schedule``: the original fixed schedule, ``first_ratio`` for the first task, times ``decay`` for each next,
  in increments of ``step``; no rollback;
* ``none``: no pruning.
"""

from __future__ import annotations

import torch

from ..config import PruneConfig  # noqa: F401  (the strategies' cfg)
from ..events import PruneStep
from .base import PRUNING, PruneHost, initial_state, select_release, tolerance

__all__ = ["prune_none", "prune_guarded", "prune_schedule"]


@PRUNING.register("none")
def prune_none(host: PruneHost, cfg: PruneConfig, state: dict, *, task_index: int, a0: float) -> dict:
    """No pruning: the task keeps every unit it claimed."""
    state = initial_state(state, int(host.claim().sum()), a0)
    state["done"] = True
    return state


@PRUNING.register("guarded")
def prune_guarded(host: PruneHost, cfg: PruneConfig, state: dict, *, task_index: int, a0: float) -> dict:
    """Release ``step`` of the claim at a time while validation accuracy stays within ``tolerance``."""
    state = initial_state(state, int(host.claim().sum()), a0)
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
        host.log(PruneStep(k=record["k"], released=record["released"], val_acc=acc,
                           accepted=accepted, claim=claim, released_total=state["released"],
                           extra={"step": record["step"]}))
        host.checkpoint(state)
    return state


@PRUNING.register("schedule")
def prune_schedule(host: PruneHost, cfg: PruneConfig, state: dict, *, task_index: int, a0: float) -> dict:
    """The original schedule: ratio ``first_ratio * decay**task_index`` reached in ``step`` increments."""
    state = initial_state(state, int(host.claim().sum()), a0)
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
        host.log(PruneStep(k=record["k"], released=record["released"], val_acc=acc, accepted=True,
                           claim=state["claim"], released_total=state["released"], extra={"ratio": ratio}))
        host.checkpoint(state)
    return state
