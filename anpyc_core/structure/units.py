"""Units and coupled groups: our own types for what the structure walk finds.

A *unit* is one prunable structure element (a conv filter/channel, a linear neuron, an MLP hidden unit, an
attention head, a residual-stream channel). A *group* is the set of units that live in one coupled channel
space, with every tensor slice, normalisation and attention module they touch. Units are numbered globally:
group ``g`` owns unit ids ``offset .. offset + size - 1``.

Raw traced groups are refined here by *constraints* that merge channels into coarser units, so that removing a
unit is always a valid physical edit: grouped convolutions and GroupNorm take channel *stripes* (the j-th channel
of every group, so groups stay equal-sized) and attention modules take whole *heads* (q, k, v and output
slices of one head together).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from .layers import HEAD_COUNT_ATTRS, HEAD_WIDTH_ATTRS, Touch, norm_kind, slices_for
from .trace import PROBE, RawGroup

__all__ = ["TensorSlice", "NormSite", "AttentionSite", "UnitGroup", "Structure", "build_structure", "Rejected"]


@dataclass(frozen=True)
class TensorSlice:
    """Positions of one tensor dimension that belong to units of a group (``units`` are local unit ids)."""

    tensor: str  # qualified parameter/buffer name in the trunk
    dim: int
    positions: tuple[int, ...]
    units: tuple[int, ...]


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
    """A traced group that is not prunable, and why (it stays whole in every task)."""

    name: str
    reason: str


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

    def fingerprint(self) -> str:
        """A hash of the trunk's tensor names/shapes and the unit layout: masks from another backbone differ."""
        payload = {
            "tensors": sorted((k, list(v)) for k, v in self.tensor_shapes.items()),
            "groups": [(g.name, g.kind, g.size) for g in self.groups],
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

    def without(self, reasons: dict[str, str]) -> "Structure":
        """A copy with the groups named in ``reasons`` moved to ``rejected`` (with their reason)."""
        keep = [g for g in self.groups if g.name not in reasons]
        rej = list(self.rejected) + [Rejected(g.name, reasons[g.name]) for g in self.groups if g.name in reasons]
        return Structure(keep, rej, self.tensor_shapes, self.num_features, self.model_name)


# ================================================================================================ building

class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _union_by_key(uf: _UnionFind, roots: list[int], keys: list[int]) -> None:
    first: dict[int, int] = {}
    for r, k in zip(roots, keys):
        if k in first:
            uf.union(first[k], r)
        else:
            first[k] = r


def _attention_modules(trunk: nn.Module) -> dict[str, tuple[int, tuple[str, ...], tuple[str, ...], int | None]]:
    """Modules carrying a static head count: name -> (heads, width attrs, count attrs, head_dim or None)."""
    found = {}
    for name, m in trunk.named_modules():
        counts = tuple(a for a in HEAD_COUNT_ATTRS if isinstance(getattr(m, a, None), int) and getattr(m, a) > 1)
        if not counts:
            continue
        heads = getattr(m, counts[0])
        head_dim = next((getattr(m, a) for a in ("head_dim", "dim_head", "head_channels")
                         if isinstance(getattr(m, a, None), int)), None)
        widths = tuple(a for a in HEAD_WIDTH_ATTRS
                       if head_dim is not None and getattr(m, a, None) == heads * head_dim)
        found[name] = (heads, widths, tuple(a for a in counts if getattr(m, a) == heads), head_dim)
    return found


def _owner(name: str, candidates: Iterable[str]) -> str | None:
    """The deepest candidate module that contains ``name``."""
    best = None
    for c in candidates:
        if c and (name == c or name.startswith(c + ".")) and (best is None or len(c) > len(best)):
            best = c
    return best


def _head_of(position: int, size: int, heads: int, head_dim: int | None) -> int | None:
    if size % heads:
        return None
    if head_dim and size % (heads * head_dim) == 0:  # (k, heads, head_dim) layout, e.g. fused qkv
        return (position % (heads * head_dim)) // head_dim
    return position // (size // heads)  # head-major layout


def build_structure(
    trunk: nn.Module, raw: list[RawGroup], num_features: int, model_name: str, *, no_heads: frozenset[str] = frozenset()
) -> Structure:
    """Refine traced groups into unit groups (applying stripe/head constraints); unusable groups are rejected.

    Groups named in ``no_heads`` are not split into attention heads even when they sit inside an attention module
    (the walk retries a group that failed verification as heads this way).
    """
    modules = dict(trunk.named_modules())
    shapes = {n: tuple(t.shape) for n, t in list(trunk.named_parameters()) + list(trunk.named_buffers())}
    attn = _attention_modules(trunk)
    groups: list[UnitGroup] = []
    rejected: list[Rejected] = []
    claimed: dict[tuple[str, int, int], str] = {}
    conflicts: set[str] = set()

    for rg in raw:
        name = rg.root
        uf = _UnionFind(rg.size)
        touches: list[tuple[str, int, list[int], list[int]]] = []  # tensor, dim, positions, roots
        norms: list[tuple[str, list[int], list[int], int]] = []
        feature: tuple[list[int], list[int]] = ([], [])
        reason = None
        for item in rg.items:
            if item.target == PROBE:
                feature = (item.positions, item.roots)
                continue
            if item.kind == "param":
                if item.dim is None:
                    reason = f"parameter {item.target} has no channel dimension"
                    break
                touches.append((item.target, item.dim, item.positions, item.roots))
                owner, attr = item.target.rsplit(".", 1) if "." in item.target else ("", item.target)
                mod = modules.get(owner)
                if attr == "weight" and mod is not None and norm_kind(mod) == "channel":
                    norms.append((owner, item.positions, item.roots, shapes[item.target][item.dim]))
                continue
            mod = modules[item.target]
            rule_touches = slices_for(mod, item.direction, item.positions)
            if rule_touches is None:
                reason = f"no slicing rule for {type(mod).__name__} ({item.target})"
                break
            for t in rule_touches:
                src = t.sources()
                touches.append((f"{item.target}.{t.attr}" if item.target else t.attr, t.dim, list(t.positions),
                                [item.roots[i] for i in src]))
            if norm_kind(mod) == "channel":
                size = getattr(mod, "num_channels", None) or int(mod.normalized_shape[-1])
                norms.append((item.target, item.positions, item.roots, size))
            _stripe_constraint(uf, mod, item.direction, item.positions, item.roots)
        if reason is None and not touches:
            reason = "touches no parameters"
        if reason is None:
            for tensor, dim, pos, _ in touches:
                if tensor not in shapes or dim >= len(shapes[tensor]) or any(
                        p < 0 or p >= shapes[tensor][dim] for p in pos):
                    reason = f"traced channels outside {tensor} (dim {dim})"
                    break
            for mod_name, pos, _, size in norms:
                if any(p < 0 or p >= size for p in pos):
                    reason = f"traced channels outside norm {mod_name}"
        if reason is not None:
            rejected.append(Rejected(name, reason))
            continue

        # positions reached through several roots move together
        for tensor, dim, pos, roots in touches:
            _union_by_key(uf, roots, pos)

        # attention heads: a group entirely inside one attention module is pruned head by head
        kind = "channels"
        sites: list[AttentionSite] = []
        owners = {_owner(t[0].rsplit(".", 1)[0], attn) for t in touches} | {_owner(n[0], attn) for n in norms}
        if len(owners) == 1 and None not in owners and not feature[0] and name not in no_heads:
            a_name = owners.pop()
            heads, widths, counts, head_dim = attn[a_name]
            entries = [(pos, roots, shapes[t][d]) for t, d, pos, roots in touches] + [(p, r, n) for _, p, r, n in norms]
            keys = [[_head_of(p, size, heads, head_dim) for p in pos] for pos, _, size in entries]
            if any(k is None for ks in keys for k in ks):
                rejected.append(Rejected(name, f"attention {a_name}: channels do not split into {heads} heads"))
                continue
            for (pos, roots, _), ks in zip(entries, keys):
                _union_by_key(uf, roots, ks)
            kind = "heads"
            sites.append(AttentionSite(a_name, heads, widths, counts))
        elif any(_is_grouped(modules.get(t[0].rsplit(".", 1)[0])) for t in touches) or any(
            isinstance(modules.get(n[0]), nn.GroupNorm) for n in norms
        ):
            kind = "stripes"

        comp = [uf.find(r) for r in range(rg.size)]
        order = {c: i for i, c in enumerate(sorted(set(comp)))}
        unit_of_root = [order[c] for c in comp]
        n_units = len(order)
        if kind == "heads" and n_units != sites[0].num_heads:
            rejected.append(Rejected(name, f"attention {sites[0].module}: {n_units} units for "
                                           f"{sites[0].num_heads} heads"))
            continue

        # merge touches per (tensor, dim) and check no other group claims the same tensor dimension
        merged: dict[tuple[str, int], dict[int, int]] = {}
        for tensor, dim, pos, roots in touches:
            slot = merged.setdefault((tensor, dim), {})
            for p, r in zip(pos, roots):
                slot[p] = unit_of_root[r]
        for (tensor, dim), slot in merged.items():
            for p in slot:  # concatenations share a tensor dimension; a shared *position* is a conflict
                other = claimed.get((tensor, dim, p))
                if other is not None and other != name:
                    conflicts.update({other, name})
                claimed[(tensor, dim, p)] = name

        slices = [TensorSlice(t, d, tuple(sorted(m)), tuple(m[p] for p in sorted(m))) for (t, d), m in merged.items()]
        cost = torch.zeros(n_units)
        for s in slices:
            shape = shapes[s.tensor]
            per_pos = 1
            for i, v in enumerate(shape):
                if i != s.dim:
                    per_pos *= v
            cost.index_add_(0, torch.tensor(s.units, dtype=torch.long), torch.full((len(s.units),), float(per_pos)))
        norm_sites = []
        for mod_name, pos, roots, size in norms:
            uniq = {}
            for p, r in zip(pos, roots):
                uniq[p] = unit_of_root[r]
            ps = tuple(sorted(uniq))
            norm_sites.append(NormSite(mod_name, ps, tuple(uniq[p] for p in ps), size))
        fpos, froots = feature
        fmap = {p: unit_of_root[r] for p, r in zip(fpos, froots)}
        fps = tuple(sorted(fmap))
        groups.append(UnitGroup(
            index=len(groups), name=name, kind=kind, size=n_units, slices=slices, norms=norm_sites,
            attention=sites, feature_positions=fps, feature_units=tuple(fmap[p] for p in fps), unit_cost=cost,
        ))

    if conflicts:
        groups = [g for g in groups if g.name not in conflicts]
        rejected += [Rejected(n, "shares a tensor dimension with another group") for n in sorted(conflicts)]
    return Structure(groups, rejected, shapes, num_features, model_name)


def _is_grouped(m: nn.Module | None) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels


def _stripe_constraint(uf: _UnionFind, m: nn.Module, direction: str, pos: list[int], roots: list[int]) -> None:
    """Grouped convs and GroupNorm keep equal-sized groups: channel j of every group forms one unit."""
    if _is_grouped(m):
        per_group = (m.in_channels if direction == "in" else m.out_channels) // m.groups
        _union_by_key(uf, roots, [p % per_group for p in pos])
    elif isinstance(m, nn.GroupNorm) and 1 < m.num_groups < m.num_channels:
        _union_by_key(uf, roots, [p % (m.num_channels // m.num_groups) for p in pos])
