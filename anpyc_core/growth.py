"""Growing a learner's backbone when its free capacity runs out (the tensor rules are :mod:`anpyc.structure.widening`).

Policy (``grow``, a :class:`~anpyc.config.GrowConfig`): when a task starts, every group that can be widened and
has fewer free units than ``grow.min_free`` of its width before any growth (its *base* width) is widened by the
shortfall, at least ``grow.step`` of its base width, up to ``grow.max_width`` times its base width. The new units
are free, so the task claims them with the rest, and its capacity budget (:mod:`anpyc.pruning.plan`) lets it keep
up to ``grow.min_free`` of every group's base width: a stream longer than the backbone can hold keeps learning with
what every task was given at the start. ``grow.enabled = false`` (``--no-grow``) keeps the size fixed.

Applying a growth keeps every earlier task exact: the new units are owned by the growing task or later ones, every
tensor a learner keeps beside the trunk (initial values, BatchNorm statistics of every task, anchors, importance,
the heads when the output features grow) gains the same entries, and what was recorded (:class:`GrowthEvent` and
the new entries' values) is replayed when the run is reopened, before its tensors are loaded. The functions here take
the parts they change (the run's :class:`~anpyc.runstate.RunState`, the trunk, the masked model) and return the
grown mask space: the learner decides what to keep.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .config import GrowConfig
from .structure.widening import check_growth, grow_group

if TYPE_CHECKING:
    from .masks import MaskSpace
    from .runstate import RunState
    from .structure.masked import MaskedModel

__all__ = ["GrowthEvent", "plan_growth", "growth_verdict", "apply_growth", "widen"]


@dataclass(frozen=True)
class GrowthEvent:
    """One widening: ``group`` gained ``units`` units at the start of task index ``index`` (id ``task``)."""

    index: int
    task: int
    group: str
    units: int
    width: int  # the group's width after it
    free: int  # its free units before it
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def plan_growth(cfg: GrowConfig, space: "MaskSpace", can_grow) -> dict[str, tuple[int, int]]:
    """``{group: (units to add, free units now)}`` under the ``grow`` policy ``cfg``; ``can_grow(name)`` says
    whether a group may be widened (:func:`growth_verdict`)."""
    if not cfg.enabled or space.structure is None:
        return {}
    out = {}
    for g in space.structure.groups:
        base = space.base_sizes.get(g.name, g.size)
        free = int((space.owners[g.offset: g.offset + g.size] == space.free).sum())
        want = int(math.ceil(cfg.min_free * base))
        if free >= want or not can_grow(g.name):
            continue
        m = min(max(want - free, int(math.ceil(cfg.step * base))), int(cfg.max_width * base) - g.size)
        if m > 0:
            out[g.name] = (m, free)
    return out


def growth_verdict(verdicts: dict[str, str | None], trunk: nn.Module, space: "MaskSpace", name: str,
                   example: torch.Tensor, seed: int) -> bool:
    """Whether group ``name`` may be widened: the tensor rules allow it and a trial widening of a copy keeps the
    trunk's function (:func:`~anpyc.structure.widening.check_growth`). Decided once per group and run (``verdicts``
    keeps the reasons); a group that cannot grow keeps its width."""
    if name not in verdicts:
        verdicts[name] = check_growth(trunk, space.structure, name, example, seed=seed)
    return verdicts[name] is None


def widen(old: torch.Tensor, fresh: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """A copy of ``old`` at the grown shape of ``fresh`` (the bool mask of the new entries): old entries keep their
    order (growth maps positions monotonically), new ones are ``fill``."""
    new = torch.empty(fresh.shape, dtype=old.dtype, device=old.device)
    m = fresh.to(old.device)
    new[~m] = old.reshape(-1)
    new[m] = fill.to(dtype=old.dtype, device=old.device)
    return new


def apply_growth(state: "RunState", trunk: nn.Module, space: "MaskSpace", model: "MaskedModel", k: int, task_id: int,
                 plan: dict[str, tuple[int, int]], *, seed: int, values: dict[str, torch.Tensor] | None = None,
                 reason: str = "") -> tuple["MaskSpace", list[GrowthEvent]]:
    """Widen the groups of ``plan`` in ``trunk`` (in place), everything ``state`` keeps beside it and, when the
    output features grow, the heads of ``model``. ``values`` (the recorded new entries, keyed ``<event
    number>/<tensor>``) replays a saved growth; otherwise new entries are drawn (seeded). Returns the grown mask
    space and the events."""
    from .training import derive_seed

    events = []
    for name, (m, free) in plan.items():
        n = len(state.growth)
        given = None if values is None else {t[len(f"{n}/"):]: v for t, v in values.items() if t.startswith(f"{n}/")}
        gen = torch.Generator().manual_seed(derive_seed(seed, "grow", k, name))
        old_features = space.structure.num_features
        structure, entries, masks = grow_group(trunk, space.structure, name, m, init=state.init.tensors(),
                                               generator=gen, values=given)
        _widen_state(state, entries, masks)
        space = space.grown(structure, name, m)
        if structure.num_features != old_features:
            _widen_heads(model, structure.num_features)
        width = next(g.size for g in structure.groups if g.name == name)
        event = GrowthEvent(k, task_id, name, m, width, free, reason)
        state.growth.append(event)
        state.growth_values.update({f"{n}/{t}": v for t, v in entries.items()})
        events.append(event)
    return space, events


def _widen_state(state: "RunState", entries: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    init = state.init
    for t, fresh in masks.items():
        fill = entries[t]
        for table in (init.params, init.stats, init.buffers, state.anchor, *state.stats.values()):
            if t in table:
                table[t] = widen(table[t], fresh, fill)
        if t in state.omega:
            state.omega[t] = widen(state.omega[t], fresh, torch.zeros_like(fill))


def _widen_heads(model: "MaskedModel", num_features: int) -> None:
    """Every head reads the grown features; the new columns are zero (no earlier task has those features)."""
    model.num_features = num_features
    for head in model.heads.values():
        w = head.weight.detach()
        pad = torch.zeros(w.shape[0], num_features - w.shape[1], dtype=w.dtype, device=w.device)
        head.weight = nn.Parameter(torch.cat([w, pad], dim=1))
        head.in_features = num_features
