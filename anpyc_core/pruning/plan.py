"""Capacity planning: how much of every group a task may keep, and which of its units it keeps.

A task claims every free unit when it starts; what it keeps after pruning is taken from every later task. The plan
gives each group its own budget, so no task can empty a group that later tasks need to adapt an early feature with
(a task that keeps every unit of the first layers and releases only the last ones leaves nothing to learn with):

* with the stream length stated (``prune.plan.expected_tasks`` = T), task ``k`` may keep ``1 / (T - k)`` of the units it
  claimed in each group: the free units are shared evenly among the tasks still to come, and the last planned task
  may keep all of them;
* without it (or past it), ``1 / prune.plan.horizon`` of them: a rolling horizon that leaves ``(1 - 1/H)^k`` of every
  group free after ``k`` tasks;
* ``prune.plan.reserve`` of every group's units is held back from the plan entirely (for tasks nobody planned for);
* where growth is enabled (:mod:`anpyc.growth`), a task may keep up to ``grow.min_free`` of every group's base
  width whatever the shares above say: growth keeps that much free for it.

The budget is a cap: the prune search (:class:`anpyc.pruning.search.Search`) keeps the least the guard
allows, never more than the budget. Within the caps, units are kept by importance, globally across groups.
"""

from __future__ import annotations

import math

import torch

from ..config import PruneConfig

__all__ = ["group_budget", "keep_set", "ladder"]


def _per_group(mask: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.bincount(groups[mask], minlength=num_groups)


def group_budget(owners: torch.Tensor, groups: torch.Tensor, num_groups: int, k: int, cfg: PruneConfig,
                 floor: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """What task index ``k`` may keep: per group (``cap``) and in total (``owners``: every unit's owner; ``groups``:
    its group). The total is the task's share of the free units; a group may hold up to ``prune.plan.group_slack`` times
    its own share, so the importance ranking can put more of the total where the task needs it (a new first layer
    for a new input permutation, say) without emptying any group."""
    plan = cfg.plan
    claim = _per_group(owners == k, groups, num_groups)
    size = torch.bincount(groups, minlength=num_groups)
    available = (claim - torch.floor(plan.reserve * size).long()).clamp_min(0)
    remaining = plan.expected_tasks - k if 0 < plan.expected_tasks and k < plan.expected_tasks else plan.horizon
    remaining = max(int(remaining), 1)
    total = int(math.ceil(float(available.sum()) / remaining))
    cap = torch.ceil(available.double() * plan.group_slack / remaining).long().minimum(claim)
    if floor is not None:  # growth refills the pool: a task may keep up to ``floor`` units of every group
        low = floor.minimum(available)
        cap = torch.maximum(cap, low)
        total = max(total, int(low.sum()))
    return cap, total


def keep_set(scores: torch.Tensor, claim: torch.Tensor, groups: torch.Tensor, num_groups: int,
             budget: torch.Tensor, count: int, need: torch.Tensor) -> torch.Tensor:
    """The ``count`` most important claimed units (bool mask) with at most ``budget[g]`` in group ``g``; the
    ``need[g]`` most important claimed units of every group are kept whatever the caps and the count (a group a
    task's subnetwork would otherwise leave empty)."""
    keep = torch.zeros_like(claim, dtype=torch.bool)
    units = claim.nonzero().squeeze(1)
    if units.numel() == 0:
        return keep
    order = units[torch.argsort(-scores[units].double(), stable=True)]  # most important first
    g = groups[order]
    # rank of each unit within its group, in importance order
    by_group = torch.argsort(g, stable=True)
    counts = torch.bincount(g, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(g)
    rank[by_group] = torch.arange(g.numel()) - starts[g[by_group]]
    forced = rank < need[g]
    eligible = ~forced & (rank < budget[g])
    room = max(int(count) - int(forced.sum()), 0)
    chosen = forced | (eligible & (torch.cumsum(eligible.long(), 0) <= room))
    keep[order[chosen]] = True
    return keep


def ladder(top: float, bottom: float, ratio: float) -> list[float]:
    """Keep fractions from ``top`` down by ``ratio`` per rung to ``bottom``, in ascending order."""
    out = [top]
    while out[-1] * ratio >= bottom - 1e-12 and len(out) < 64:
        out.append(out[-1] * ratio)
    return sorted(set(round(f, 6) for f in out))
