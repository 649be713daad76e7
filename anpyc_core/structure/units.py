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

from .layers import HEAD_COUNT_ATTRS, HEAD_WIDTH_ATTRS, norm_kind, slices_for
from .trace import PROBE, RawGroup

__all__ = ["TensorSlice", "NormSite", "AttentionSite", "UnitGroup", "Structure", "build_structure", "Rejected",
           "HEAD_MODES", "PARENTS_SUFFIX", "attention_owners"]


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


# ================================================================================================ building

# How an attention module's heads are formed, tried in this order: every traced group inside the module as heads
# (standard then head-major layout), then only its core (the groups feeding the projection out of the module, plus
# groups that index heads themselves, e.g. talking-heads mixers), then "off": plain channels.
HEAD_MODES = ("heads", "heads-major", "heads-core", "heads-core-major", "off")
PARENTS_SUFFIX = "+parents"


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
    for r, k in zip(roots, keys, strict=True):
        if k in first:
            uf.union(first[k], r)
        else:
            first[k] = r


@dataclass(frozen=True)
class _Attention:
    heads: int
    widths: tuple[str, ...]  # attributes equal to heads x (a per-head size)
    counts: tuple[str, ...]
    head_dim: int | None


def _int_attrs(m: nn.Module) -> dict[str, int]:
    return {k: v for k, v in vars(m).items()
            if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_")}


def _attention_modules(trunk: nn.Module) -> dict[str, _Attention]:
    """Modules carrying a static head count (``num_heads``-like attribute > 1)."""
    found = {}
    for name, m in trunk.named_modules():
        counts = tuple(a for a in HEAD_COUNT_ATTRS if isinstance(getattr(m, a, None), int) and getattr(m, a) > 1)
        if not counts:
            continue
        heads = getattr(m, counts[0])
        head_dim = next((getattr(m, a) for a in ("head_dim", "dim_head", "head_channels")
                         if isinstance(getattr(m, a, None), int)), None)
        widths = tuple(a for a in HEAD_WIDTH_ATTRS if head_dim is not None and getattr(m, a, None) == heads * head_dim)
        found[name] = _Attention(heads, widths, tuple(a for a in counts if getattr(m, a) == heads), head_dim)
    return found


def _owner(name: str, candidates: Iterable[str]) -> str | None:
    """The deepest candidate module that contains ``name``."""
    best = None
    for c in candidates:
        if c and (name == c or name.startswith(c + ".")) and (best is None or len(c) > len(best)):
            best = c
    return best


def _head_of(position: int, size: int, heads: int, head_dim: int | None, major: bool = False) -> int | None:
    if size % heads:
        return None
    if not major and head_dim and size != heads * head_dim and size % (heads * head_dim) == 0:
        return (position % (heads * head_dim)) // head_dim  # (k, heads, head_dim) layout, e.g. fused qkv
    return position // (size // heads)  # head-major layout


@dataclass
class _Touch:
    tensor: str
    dim: int
    positions: list[int]
    roots: list[int]
    origin: str  # the module the slice belongs to
    bare: bool  # a bare parameter traced by Torch-Pruning (its channel dim is a guess)
    norm: bool  # a parameter of a module that normalises across channels
    direction: str = "param"  # "out"/"in" side of the module (modules), "param" for bare parameters


@dataclass
class _Prepared:
    raw: RawGroup
    touches: list[_Touch] = field(default_factory=list)
    norms: list[tuple[str, list[int], list[int], int]] = field(default_factory=list)
    grouped: list[tuple[nn.Module, str, list[int], list[int]]] = field(default_factory=list)
    feature: tuple[list[int], list[int]] = ((), ())
    reason: str | None = None  # not prunable at all (no slicing rule, ...)
    trace_reason: str | None = None  # the traced positions cannot be trusted (fine for layout-derived heads)


def _prepare(rg: RawGroup, modules: dict, shapes: dict, stat_modules: frozenset[str]) -> _Prepared:
    p = _Prepared(rg)
    for item in rg.items:
        if item.target == PROBE:
            p.feature = (item.positions, item.roots)
            continue
        if item.kind == "param":
            if item.dim is None:
                p.reason = f"parameter {item.target} has no channel dimension"
                return p
            owner, attr = item.target.rsplit(".", 1) if "." in item.target else ("", item.target)
            mod = modules.get(owner)
            is_norm = attr == "weight" and mod is not None and (norm_kind(mod) == "channel" or owner in stat_modules)
            p.touches.append(_Touch(item.target, item.dim, item.positions, item.roots, owner, True, is_norm))
            if is_norm:
                p.norms.append((owner, item.positions, item.roots, shapes[item.target][item.dim]))
            continue
        mod = modules[item.target]
        rule_touches = slices_for(mod, item.direction, item.positions)
        if rule_touches is None:
            p.reason = f"no slicing rule for {type(mod).__name__} ({item.target})"
            return p
        is_norm = norm_kind(mod) == "channel" or item.target in stat_modules
        for t in rule_touches:
            p.touches.append(_Touch(f"{item.target}.{t.attr}" if item.target else t.attr, t.dim, list(t.positions),
                                    [item.roots[i] for i in t.sources()], item.target, False, is_norm,
                                    item.direction))
        if is_norm:
            size = getattr(mod, "num_channels", None) or _norm_size(mod, shapes, item.target)
            p.norms.append((item.target, item.positions, item.roots, size))
        p.grouped.append((mod, item.direction, item.positions, item.roots))
    if not p.touches:
        p.reason = "touches no parameters"
        return p
    if rg.problem:
        p.trace_reason = rg.problem
    for t in p.touches:
        shape = shapes.get(t.tensor)
        if shape is None or t.dim >= len(shape) or any(q < 0 or q >= shape[t.dim] for q in t.positions):
            p.trace_reason = p.trace_reason or f"traced channels outside {t.tensor} (dim {t.dim})"
    for mod_name, pos, _, size in p.norms:
        if size is None or any(q < 0 or q >= size for q in pos):
            p.trace_reason = p.trace_reason or f"traced channels outside norm {mod_name}"
    return p


def _norm_size(mod: nn.Module, shapes: dict, name: str) -> int | None:
    shape = getattr(mod, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1])
    w = shapes.get(f"{name}.weight" if name else "weight")
    return int(w[0]) if w else None


def build_structure(
    trunk: nn.Module, raw: list[RawGroup], num_features: int, model_name: str, *,
    no_heads: frozenset[str] = frozenset(), head_modes: dict[str, str] | None = None,
    stat_modules: frozenset[str] = frozenset(), parent_sync: frozenset[str] = frozenset(),
) -> Structure:
    """Refine traced groups into unit groups (applying stripe/head constraints); unusable groups are rejected.

    Inside an attention module (a module with a static head count), the traced groups are merged into one group
    of *heads* laid out from the module's tensors: every tensor dimension the groups touch that splits into the
    head count is cut into heads, and per-head tensors of the module (a dimension equal to the head count, e.g. a
    relative position bias table) follow their head. ``head_modes`` picks the layout per attention module
    (:data:`HEAD_MODES`; "off" keeps plain channels); groups named in ``no_heads`` never become heads.
    ``stat_modules`` are modules found to compute statistics across channels (they get masked statistics).
    Channel groups named in ``parent_sync`` also update static widths stored on the parents of the modules they
    slice (``self.in_channels`` used in ``x[:, :self.in_channels]``); the walk turns this on for a group that
    fails without it, since a parent's attribute may as well hold an unrelated size that happens to be equal.
    """
    modules = dict(trunk.named_modules())
    shapes = {n: tuple(t.shape) for n, t in list(trunk.named_parameters()) + list(trunk.named_buffers())}
    attn = _attention_modules(trunk)
    modes = dict(head_modes or {})
    groups: list[UnitGroup] = []
    rejected: list[Rejected] = []

    prepared: list[_Prepared] = []
    for rg in raw:
        try:
            prepared.append(_prepare(rg, modules, shapes, stat_modules))
        except Exception as e:  # a rule that breaks on an odd module rejects that group only
            rejected.append(Rejected(rg.root, f"cannot read the group ({type(e).__name__}: {e})"[:300]))

    # ------------------------------------------------------------ heads: traced groups inside attention modules
    by_module: dict[str, list[_Prepared]] = {}
    for p in prepared:
        if p.reason is not None or p.feature[0] or p.raw.root in no_heads:
            continue
        owners = {_owner(t.origin, attn) for t in p.touches} | {_owner(n[0], attn) for n in p.norms}
        if len(owners) != 1 or None in owners:
            continue
        a_name = owners.pop()
        if modes.get(a_name, "heads") == "off" or not _heads_fit(p, attn[a_name], shapes):
            continue
        by_module.setdefault(a_name, []).append(p)
    for a_name, members in list(by_module.items()):
        if modes.get(a_name, "heads").startswith("heads-core"):
            by_module[a_name] = _core_members(a_name, members, prepared, attn, modules, shapes)
    as_heads = {id(p) for members in by_module.values() for p in members}
    for a_name, members in by_module.items():
        if not members:
            continue
        try:
            g = _heads_group(trunk, a_name, attn[a_name], members, shapes, modes.get(a_name, "heads"),
                             {id(q) for q in prepared} - {id(m) for m in members}, prepared)
        except Exception as e:
            g = f"cannot lay out heads ({type(e).__name__}: {e})"[:300]
        if isinstance(g, str):
            rejected.append(Rejected(members[0].raw.root, g))
        else:
            groups.append(g)

    # ------------------------------------------------------------ channels (and stripes)
    for p in prepared:
        if id(p) in as_heads:
            continue
        name = p.raw.root
        if p.reason or p.trace_reason:
            rejected.append(Rejected(name, p.reason or p.trace_reason))
            continue
        try:
            for g in _split_by_tensors(_channel_group(p, modules, shapes)):
                if g.name in parent_sync:
                    g.kind, g.sync_parents = f"{g.kind}{PARENTS_SUFFIX}", True
                groups.append(g)
        except Exception as e:
            rejected.append(Rejected(name, f"cannot build the group ({type(e).__name__}: {e})"[:300]))

    # ------------------------------------------------------------ no tensor position may belong to two groups
    claimed: dict[tuple[str, int, int], str] = {}
    conflicts: set[str] = set()
    for g in groups:
        for s in g.slices:
            for q in s.positions:  # concatenations share a tensor dimension; a shared *position* is a conflict
                other = claimed.get((s.tensor, s.dim, q))
                if other is not None and other != g.name:
                    conflicts.update({other, g.name})
                claimed[(s.tensor, s.dim, q)] = g.name
    if conflicts:
        groups = [g for g in groups if g.name not in conflicts]
        rejected += [Rejected(n, "shares a tensor dimension with another group") for n in sorted(conflicts)]
    return Structure(groups, rejected, shapes, num_features, model_name)


def attention_owners(trunk: nn.Module, raw: list[RawGroup]) -> dict[str, str]:
    """Root name -> the attention module a traced group lies in (for groups that could become heads)."""
    modules = dict(trunk.named_modules())
    shapes = {n: tuple(t.shape) for n, t in list(trunk.named_parameters()) + list(trunk.named_buffers())}
    attn = _attention_modules(trunk)
    out = {}
    for rg in raw:
        try:
            p = _prepare(rg, modules, shapes, frozenset())
        except Exception:
            continue
        owners = {_owner(t.origin, attn) for t in p.touches} | {_owner(n[0], attn) for n in p.norms}
        if len(owners) == 1 and None not in owners:
            out[rg.root] = owners.pop()
    return out


def _core_members(a_name: str, members: list[_Prepared], prepared: list[_Prepared], attn: dict, modules: dict,
                  shapes: dict) -> list[_Prepared]:
    """The groups that must be cut by head: those feeding a layer whose output leaves the attention module (the
    output projection reads every head), and those whose tensors are indexed by head only (talking-heads
    mixers); other groups inside the module (a spatial-reduction conv, ...) stay channels."""
    linear_like = (nn.modules.conv._ConvNd, nn.Linear)
    heads = attn[a_name].heads
    exits = set()
    for q in prepared:
        if not any(_owner(t.origin, attn) != a_name for t in q.touches):
            continue
        for t in q.touches:
            if t.direction == "out" and _owner(t.origin, attn) == a_name and isinstance(modules.get(t.origin),
                                                                                      linear_like):
                exits.add(t.origin)
    return [p for p in members
            if any(t.direction == "in" and t.origin in exits for t in p.touches)
            or all(shapes[t.tensor][t.dim] == heads for t in p.touches if not t.norm)]


def _heads_fit(p: _Prepared, a: _Attention, shapes: dict) -> bool:
    """Every non-norm tensor dimension of the group splits into the heads (bare parameters: some dim does)."""
    for t in p.touches:
        shape = shapes.get(t.tensor)
        if shape is None or t.dim >= len(shape):
            return False
        if t.bare:
            if shape[t.dim] % a.heads and a.heads not in shape:
                return False
        elif not t.norm and shape[t.dim] % a.heads:
            return False
    return True


def _heads_group(trunk: nn.Module, a_name: str, a: _Attention, members: list[_Prepared], shapes: dict, mode: str,
                 others: set[int], prepared: list[_Prepared]) -> UnitGroup | str:
    """One group of ``a.heads`` units from the tensors the member groups touch, laid out by head."""
    heads = a.heads
    dims: dict[tuple[str, int], int] = {}
    norm_dims: dict[str, int] = {}
    widths: set[int] = set()
    for p in members:
        for t in p.touches:
            shape = shapes[t.tensor]
            dim = t.dim
            if t.bare and heads in shape:  # TP guesses the last dim for bare parameters; per-head ones lead with it
                dim = shape.index(heads)
            if t.norm:
                norm_dims[t.origin] = shape[dim]
            elif shape[dim] > heads:
                widths.add(shape[dim])
            dims[(t.tensor, dim)] = shape[dim]
    # norms over one head's channels (q/k norms) are shared by every head: not sliced
    for origin, size in norm_dims.items():
        if size not in widths and size != heads:
            for key in [k for k in dims if k[0].rsplit(".", 1)[0] == origin]:
                dims.pop(key)
    # per-head tensors of the module that no traced group reached (bias tables, temperatures, ...)
    claimed_elsewhere = {t.tensor for q in prepared if id(q) in others for t in q.touches}
    linear_like = (nn.modules.conv._ConvNd, nn.Linear)
    module = trunk.get_submodule(a_name)
    prefix = f"{a_name}." if a_name else ""
    for sub_name, sub in module.named_modules():
        if isinstance(sub, linear_like):
            continue
        for attr, tensor in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False)):
            if not tensor.is_floating_point():
                continue
            full = f"{prefix}{sub_name}.{attr}" if sub_name else f"{prefix}{attr}"
            if full in claimed_elsewhere or any(k[0] == full for k in dims):
                continue
            hits = [d for d, v in enumerate(tensor.shape) if v == heads]
            if len(hits) == 1:
                dims[(full, hits[0])] = heads
    if not widths:
        return f"attention {a_name}: no tensor splits into its {heads} heads"
    # without a head_dim attribute, the narrowest width is one slice per head (fused qkv is a multiple of it)
    head_dim = a.head_dim or min(widths) // heads
    slices, cost = [], torch.zeros(heads)
    for (tensor, dim), size in sorted(dims.items()):
        units = tuple(_head_of(q, size, heads, head_dim, major=mode.endswith("major")) for q in range(size))
        slices.append(TensorSlice(tensor, dim, tuple(range(size)), units))
        per_pos = 1
        for i, v in enumerate(shapes[tensor]):
            if i != dim:
                per_pos *= v
        cost.index_add_(0, torch.tensor(units, dtype=torch.long), torch.full((size,), float(per_pos)))
    norm_sites = []
    for origin, size in norm_dims.items():
        if size in widths:
            units = tuple(_head_of(q, size, heads, head_dim, major=mode.endswith("major")) for q in range(size))
            norm_sites.append(NormSite(origin, tuple(range(size)), units, size))
    kind = mode
    # static widths of the heads (``self.val_attn_dim = num_heads * val_dim``): int attributes equal to a width
    ints = _int_attrs(trunk.get_submodule(a_name))
    width_attrs = tuple(sorted(set(a.widths) | {k for k, v in ints.items() if k not in a.counts and v in widths
                                                and v % heads == 0}))
    site = AttentionSite(a_name, heads, width_attrs, a.counts)
    return UnitGroup(index=0, name=members[0].raw.root, kind=kind, size=heads, slices=slices, norms=norm_sites,
                     attention=[site], unit_cost=cost)


def _channel_group(p: _Prepared, modules: dict, shapes: dict) -> UnitGroup:
    rg = p.raw
    uf = _UnionFind(rg.size)
    for mod, direction, pos, roots in p.grouped:
        _stripe_constraint(uf, mod, direction, pos, roots)
    # positions reached through several roots move together
    for t in p.touches:
        _union_by_key(uf, t.roots, t.positions)
    kind = "channels"
    if any(_is_grouped(modules.get(t.origin)) for t in p.touches) or any(
            isinstance(modules.get(n[0]), nn.GroupNorm) for n in p.norms):
        kind = "stripes"
    comp = [uf.find(r) for r in range(rg.size)]
    order = {c: i for i, c in enumerate(sorted(set(comp)))}
    unit_of_root = [order[c] for c in comp]
    n_units = len(order)
    merged: dict[tuple[str, int], dict[int, int]] = {}
    for t in p.touches:
        slot = merged.setdefault((t.tensor, t.dim), {})
        for q, r in zip(t.positions, t.roots, strict=True):
            slot[q] = unit_of_root[r]
    slices = [TensorSlice(t, d, tuple(sorted(m)), tuple(m[q] for q in sorted(m))) for (t, d), m in merged.items()]
    cost = torch.zeros(n_units)
    for s in slices:
        per_pos = 1
        for i, v in enumerate(shapes[s.tensor]):
            if i != s.dim:
                per_pos *= v
        cost.index_add_(0, torch.tensor(s.units, dtype=torch.long), torch.full((len(s.units),), float(per_pos)))
    norm_sites = []
    for mod_name, pos, roots, size in p.norms:
        uniq = {q: unit_of_root[r] for q, r in zip(pos, roots, strict=True)}
        ps = tuple(sorted(uniq))
        norm_sites.append(NormSite(mod_name, ps, tuple(uniq[q] for q in ps), size))
    fpos, froots = p.feature
    fmap = {q: unit_of_root[r] for q, r in zip(fpos, froots, strict=True)}
    fps = tuple(sorted(fmap))
    return UnitGroup(index=0, name=rg.root, kind=kind, size=n_units, slices=slices, norms=norm_sites,
                     feature_positions=fps, feature_units=tuple(fmap[q] for q in fps), unit_cost=cost)


def _split_by_tensors(g: UnitGroup) -> list[UnitGroup]:
    """Split a group whose units touch different sets of tensors (the branches of a concat) into one group per
    set, named ``root``, ``root#1``, ... So "at least one unit per group" means at least one channel per branch:
    a branch conv left with no output channel is not a valid layer."""
    touched: list[set[str]] = [set() for _ in range(g.size)]
    for s in g.slices:
        for u in s.units:
            touched[u].add(s.tensor)
    keys: dict[frozenset, int] = {}
    part = [keys.setdefault(frozenset(t), len(keys)) for t in touched]
    if len(keys) < 2:
        return [g]
    out = []
    for k in range(len(keys)):
        units = [u for u in range(g.size) if part[u] == k]
        local = {u: i for i, u in enumerate(units)}

        slices = []
        for s in g.slices:
            pos, uns = _keep(s.positions, s.units, local)
            if pos:
                slices.append(TensorSlice(s.tensor, s.dim, pos, uns))
        norms = []
        for n in g.norms:
            pos, uns = _keep(n.positions, n.units, local)
            if pos:
                norms.append(NormSite(n.module, pos, uns, n.size))
        fpos, funits = _keep(g.feature_positions, g.feature_units, local)
        cost = g.unit_cost[units] if g.unit_cost is not None else None
        out.append(UnitGroup(index=0, name=g.name if k == 0 else f"{g.name}#{k}", kind=g.kind, size=len(units),
                             slices=slices, norms=norms, attention=list(g.attention), feature_positions=fpos,
                             feature_units=funits, unit_cost=cost))
    return out


def _keep(positions, units, local: dict[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    pairs = [(p, local[u]) for p, u in zip(positions, units, strict=True) if u in local]
    return tuple(p for p, _ in pairs), tuple(u for _, u in pairs)


def _is_grouped(m: nn.Module | None) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels


def _stripe_constraint(uf: _UnionFind, m: nn.Module, direction: str, pos: list[int], roots: list[int]) -> None:
    """Grouped convs and GroupNorm keep equal-sized groups: channel j of every group forms one unit."""
    if _is_grouped(m):
        per_group = (m.in_channels if direction == "in" else m.out_channels) // m.groups
        _union_by_key(uf, roots, [p % per_group for p in pos])
    elif isinstance(m, nn.GroupNorm) and 1 < m.num_groups < m.num_channels:
        _union_by_key(uf, roots, [p % (m.num_channels // m.num_groups) for p in pos])
