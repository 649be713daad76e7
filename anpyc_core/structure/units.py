"""Units and coupled groups: our own types for what the structure walk finds.

A *unit* is one prunable structure element (a conv filter/channel, a linear neuron, an MLP hidden unit, an
attention head, a residual-stream channel). A *group* is the set of units that live in one coupled channel
space, with every tensor slice, normalisation and attention module they touch. Units are numbered globally:
group ``g`` owns unit ids ``offset .. offset + size - 1``.

This module is the data model only. :mod:`.build` refines raw traced groups into these records (channels and
stripes), :mod:`.attention` lays out the heads of attention modules.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable

import torch

__all__ = ["TensorSlice", "NormSite", "AttentionSite", "UnitGroup", "Structure", "Rejected", "unit_costs", "along"]


def along(v: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """The vector ``v`` shaped to broadcast along dimension ``dim`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[dim] = v.numel()
    return v.view(shape)


@dataclass(frozen=True)
class TensorSlice:
    """Positions ``positions`` along dimension ``dim`` of a tensor, and who owns each of them.

    The one slice record of the walk, at every stage: a layer rule names a tensor of its module (``tensor`` is the
    attribute, ``units[i]`` the index, in the channel list the rule was given, of the channel owning
    ``positions[i]``); a traced group qualifies the name and owns positions by traced root; a unit group owns them
    by local unit id. ``units=None`` means position i is owned by i.
    """

    tensor: str  # parameter/buffer name: qualified in the trunk, or a module attribute in a layer rule
    dim: int
    positions: tuple[int, ...]
    units: tuple[int, ...] | None = None

    def owners(self) -> tuple[int, ...]:
        return self.units if self.units is not None else tuple(range(len(self.positions)))


@dataclass(frozen=True)
class NormSite:
    """A module that normalises across channels of this group (its statistics must ignore removed units)."""

    module: str
    positions: tuple[int, ...]
    units: tuple[int, ...]
    size: int  # channel count of the norm


@dataclass(frozen=True)
class AttentionSite:
    """An attention module whose heads are this group's units; its static head attributes follow the kept heads."""

    module: str
    num_heads: int
    width_attrs: tuple[str, ...]  # attributes equal to num_heads * head_dim
    count_attrs: tuple[str, ...]  # attributes equal to num_heads
    shape_attrs: tuple[str, ...] = ()  # int tuples holding num_heads (``self.bias_shape = (area, area, heads)``)


def unit_costs(slices: Iterable[TensorSlice], shapes: dict, n_units: int) -> torch.Tensor:
    """Parameter elements each unit touches: every sliced position counts the elements of its hyperplane."""
    cost = torch.zeros(n_units)
    for s in slices:
        per_pos = 1
        for i, v in enumerate(shapes[s.tensor]):
            if i != s.dim:
                per_pos *= v
        cost.index_add_(0, torch.tensor(s.units, dtype=torch.long), torch.full((len(s.units),), float(per_pos)))
    return cost


@dataclass
class UnitGroup:
    index: int
    name: str
    kind: str  # "channels" | "stripes" | "heads"
    size: int
    offset: int = 0
    slices: list[TensorSlice] = field(default_factory=list)
    norms: list[NormSite] = field(default_factory=list)
    attention: list[AttentionSite] = field(default_factory=list)
    feature_positions: tuple[int, ...] = ()
    feature_units: tuple[int, ...] = ()
    unit_cost: torch.Tensor | None = None  # parameter elements touched by each unit
    sync_parents: bool = False  # parents of the sliced modules re-derive static widths too (kind ends "+parents")

    @property
    def members(self) -> list[str]:
        return sorted({s.tensor.rsplit(".", 1)[0] for s in self.slices})

    def describe(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "offset": self.offset,
            "tensors": sorted({s.tensor for s in self.slices}),
            "norms": [n.module for n in self.norms],
            "attention": [a.module for a in self.attention],
            "features": bool(self.feature_positions),
        }


@dataclass(frozen=True)
class Rejected:
    """A traced group that is not prunable, and why (it stays whole in every task). A group that failed parity
    also says where: the first ``tensor`` at which masked and sliced outputs differed, and the ``max_abs_diff``
    there (see :mod:`.explain`)."""

    name: str
    reason: str
    tensor: str = ""
    max_abs_diff: float | None = None


@dataclass
class Structure:
    """Everything the walk found: prunable unit groups, and what they touch."""

    groups: list[UnitGroup]
    rejected: list[Rejected]
    tensor_shapes: dict[str, tuple[int, ...]]
    num_features: int
    model_name: str

    def __post_init__(self) -> None:
        off = 0
        for i, g in enumerate(self.groups):
            g.index, g.offset = i, off
            off += g.size
        self.num_units = off
        self._index_tensors()

    # ------------------------------------------------------------------ derived indices
    def _index_tensors(self) -> None:
        """Per tensor and dim: the global unit id of every position (-1 = not part of any unit: always kept)."""
        dims: dict[str, dict[int, torch.Tensor]] = {}
        for g in self.groups:
            for s in g.slices:
                shape = self.tensor_shapes[s.tensor]
                ids = dims.setdefault(s.tensor, {}).setdefault(s.dim, torch.full((shape[s.dim],), -1, dtype=torch.long))
                ids[list(s.positions)] = torch.tensor(s.units, dtype=torch.long) + g.offset
        self.tensor_units = dims
        self.norm_units: dict[str, torch.Tensor] = {}
        for g in self.groups:
            for n in g.norms:
                ids = self.norm_units.setdefault(n.module, torch.full((n.size,), -1, dtype=torch.long))
                ids[list(n.positions)] = torch.tensor(n.units, dtype=torch.long) + g.offset
        feats = torch.full((self.num_features,), -1, dtype=torch.long)
        for g in self.groups:
            if g.feature_positions:
                feats[list(g.feature_positions)] = torch.tensor(g.feature_units, dtype=torch.long) + g.offset
        self.feature_unit_ids = feats
        self.unit_group = torch.zeros(self.num_units, dtype=torch.long)
        costs = []
        for g in self.groups:
            self.unit_group[g.offset: g.offset + g.size] = g.index
            costs.append(g.unit_cost if g.unit_cost is not None else torch.ones(g.size))
        self.unit_cost = torch.cat(costs) if costs else torch.zeros(0)

    def group_of(self, unit: int) -> UnitGroup:
        return self.groups[int(self.unit_group[unit])]

    # ------------------------------------------------------------------ masks of a set of active units
    def extend(self, values: torch.Tensor, fill) -> torch.Tensor:
        """``values`` (one per unit) plus ``fill`` for position id -1 (the parts of no unit), so ``extend(v)[ids]``
        maps any index vector of :attr:`tensor_units` to values."""
        return torch.cat([values, torch.tensor([fill], dtype=values.dtype)])

    def tensor_masks(self, active: torch.Tensor, params: set[str]) -> dict[str, torch.Tensor]:
        """Per parameter of ``params`` that has inactive positions: a 0/1 mask that broadcasts over it. Running
        statistics are not masked: their channels' weights are."""
        ext = self.extend(active.bool(), True)
        out = {}
        for name, dims in self.tensor_units.items():
            if name not in params:
                continue
            shape = self.tensor_shapes[name]
            mask = None
            for dim, ids in dims.items():
                m = ext[ids]
                if bool(m.all()):
                    continue
                m = along(m.float(), len(shape), dim)
                mask = m if mask is None else mask * m
            if mask is not None:
                out[name] = mask
        return out

    def norm_masks(self, active: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per normalisation over channels with inactive channels: which channels it normalises over."""
        ext = self.extend(active.bool(), True)
        out = {}
        for name, ids in self.norm_units.items():
            m = ext[ids]
            if not bool(m.all()):
                out[name] = m.float()
        return out

    def feature_mask(self, active: torch.Tensor) -> torch.Tensor | None:
        """The 0/1 mask of the output features, None when every feature is active."""
        m = self.extend(active.bool(), True)[self.feature_unit_ids]
        return None if bool(m.all()) else m.float()

    def fingerprint(self) -> str:
        """A hash of the trunk's tensor names/shapes and the unit layout: masks from another backbone differ."""
        payload = {
            "tensors": sorted((k, list(v)) for k, v in self.tensor_shapes.items()),
            "groups": [(g.name, g.kind, g.size) for g in self.groups],
            "slices": [[(s.tensor, s.dim, list(s.positions), list(s.units)) for s in g.slices] for g in self.groups],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def describe(self) -> dict:
        return {
            "model": self.model_name,
            "num_units": self.num_units,
            "num_features": self.num_features,
            "fingerprint": self.fingerprint(),
            "groups": [g.describe() for g in self.groups],
            "rejected": [{"name": r.name, "reason": r.reason} for r in self.rejected],
        }

    def without(self, reasons: dict[str, str | Rejected]) -> "Structure":
        """A copy with the groups named in ``reasons`` moved to ``rejected`` (a reason, or the whole record)."""
        keep = [g for g in self.groups if g.name not in reasons]
        rej = list(self.rejected) + [r if isinstance(r := reasons[g.name], Rejected) else Rejected(g.name, r)
                                     for g in self.groups if g.name in reasons]
        return Structure(keep, rej, self.tensor_shapes, self.num_features, self.model_name)
