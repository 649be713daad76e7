"""Group builders: raw traced groups refined into unit groups.

Raw traced groups are refined here by *constraints* that merge channels into coarser units, so that removing a
unit is always a valid physical edit: grouped convolutions and GroupNorm take channel *stripes* (the j-th channel
of every group, so groups stay equal-sized) and attention modules take whole *heads* (q, k, v and output slices
of one head together, laid out by :mod:`.attention`). A group whose units touch different tensors (the branches
of a concat) is split per branch, and no tensor position may belong to two groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import clip
from .attention import attention_modules, core_members, heads_fit, heads_group, owner_of
from .layers import norm_kind, slices_for
from .trace import PROBE, RawGroup
from .unionfind import UnionFind
from .units import NormSite, Rejected, Structure, TensorSlice, UnitGroup, unit_costs

__all__ = ["build_structure", "attention_owners", "PARENTS_SUFFIX", "Reach", "Prepared"]

PARENTS_SUFFIX = "+parents"


@dataclass(frozen=True)
class Reach:
    """A tensor slice a traced group reaches (owned by traced root), and where it was reached."""

    slice: TensorSlice
    origin: str  # the module the slice belongs to
    bare: bool  # a bare parameter traced by Torch-Pruning (its channel dim is a guess)
    norm: bool  # a parameter of a module that normalises across channels
    direction: str = "param"  # "out"/"in" side of the module (modules), "param" for bare parameters


@dataclass
class Prepared:
    """A traced group read against the trunk's modules: the slices it reaches, its norms, its grouped layers."""

    raw: RawGroup
    reaches: list[Reach] = field(default_factory=list)
    norms: list[tuple[str, list[int], list[int], int]] = field(default_factory=list)
    grouped: list[tuple[nn.Module, str, list[int], list[int]]] = field(default_factory=list)
    feature: tuple[list[int], list[int]] = ((), ())
    reason: str | None = None  # not prunable at all (no slicing rule, ...)
    trace_reason: str | None = None  # the traced positions cannot be trusted (fine for layout-derived heads)

    def owners(self, attn: dict) -> set[str | None]:
        """The attention modules (None: none) the group's slices and norms lie in."""
        return {owner_of(r.origin, attn) for r in self.reaches} | {owner_of(n[0], attn) for n in self.norms}


def _prepare(rg: RawGroup, modules: dict, shapes: dict, stat_modules: frozenset[str]) -> Prepared:
    p = Prepared(rg)
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
            piece = TensorSlice(item.target, item.dim, tuple(item.positions), tuple(item.roots))
            p.reaches.append(Reach(piece, owner, True, is_norm))
            if is_norm:
                p.norms.append((owner, item.positions, item.roots, shapes[item.target][item.dim]))
            continue
        mod = modules[item.target]
        rule_slices = slices_for(mod, item.direction, item.positions)
        if rule_slices is None:
            p.reason = f"no slicing rule for {type(mod).__name__} ({item.target})"
            return p
        is_norm = norm_kind(mod) == "channel" or item.target in stat_modules
        for t in rule_slices:
            piece = TensorSlice(f"{item.target}.{t.tensor}" if item.target else t.tensor, t.dim, tuple(t.positions),
                                tuple(item.roots[i] for i in t.owners()))
            p.reaches.append(Reach(piece, item.target, False, is_norm, item.direction))
        if is_norm:
            size = getattr(mod, "num_channels", None) or _norm_size(mod, shapes, item.target)
            p.norms.append((item.target, item.positions, item.roots, size))
        p.grouped.append((mod, item.direction, item.positions, item.roots))
    if not p.reaches:
        p.reason = "touches no parameters"
        return p
    if rg.problem:
        p.trace_reason = rg.problem
    for r in p.reaches:
        shape = shapes.get(r.slice.tensor)
        if shape is None or r.slice.dim >= len(shape) or any(q < 0 or q >= shape[r.slice.dim]
                                                             for q in r.slice.positions):
            p.trace_reason = p.trace_reason or f"traced channels outside {r.slice.tensor} (dim {r.slice.dim})"
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


def _tensor_shapes(trunk: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in list(trunk.named_parameters()) + list(trunk.named_buffers())}


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
    (:data:`.attention.HEAD_MODES`; "off" keeps plain channels); groups named in ``no_heads`` never become heads.
    ``stat_modules`` are modules found to compute statistics across channels (they get masked statistics).
    Channel groups named in ``parent_sync`` also update static widths stored on the parents of the modules they
    slice (``self.in_channels`` used in ``x[:, :self.in_channels]``); the walk turns this on for a group that
    fails without it, since a parent's attribute may as well hold an unrelated size that happens to be equal.
    """
    modules = dict(trunk.named_modules())
    shapes = _tensor_shapes(trunk)
    attn = attention_modules(trunk)
    modes = dict(head_modes or {})
    groups: list[UnitGroup] = []
    rejected: list[Rejected] = []

    prepared: list[Prepared] = []
    for rg in raw:
        try:
            prepared.append(_prepare(rg, modules, shapes, stat_modules))
        except Exception as e:  # a rule that breaks on an odd module rejects that group only
            rejected.append(Rejected(rg.root, clip(f"cannot read the group ({type(e).__name__}: {e})", 300)))

    # ------------------------------------------------------------ heads: traced groups inside attention modules
    by_module: dict[str, list[Prepared]] = {}
    for p in prepared:
        if p.reason is not None or p.feature[0] or p.raw.root in no_heads:
            continue
        owners = p.owners(attn)
        if len(owners) != 1 or None in owners:
            continue
        a_name = owners.pop()
        if modes.get(a_name, "heads") == "off" or not heads_fit(p, attn[a_name], shapes):
            continue
        by_module.setdefault(a_name, []).append(p)
    for a_name, members in list(by_module.items()):
        if modes.get(a_name, "heads").startswith("heads-core"):
            by_module[a_name] = core_members(a_name, members, prepared, attn, modules, shapes)
    as_heads = {id(p) for members in by_module.values() for p in members}
    for a_name, members in by_module.items():
        if not members:
            continue
        try:
            g = heads_group(trunk, a_name, attn[a_name], members, shapes, modes.get(a_name, "heads"),
                            {id(q) for q in prepared} - {id(m) for m in members}, prepared)
        except Exception as e:
            g = clip(f"cannot lay out heads ({type(e).__name__}: {e})", 300)
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
            rejected.append(Rejected(name, clip(f"cannot build the group ({type(e).__name__}: {e})", 300)))

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
    shapes = _tensor_shapes(trunk)
    attn = attention_modules(trunk)
    out = {}
    for rg in raw:
        try:
            p = _prepare(rg, modules, shapes, frozenset())
        except Exception:
            continue
        owners = p.owners(attn)
        if len(owners) == 1 and None not in owners:
            out[rg.root] = owners.pop()
    return out


def _channel_group(p: Prepared, modules: dict, shapes: dict) -> UnitGroup:
    rg = p.raw
    uf = UnionFind(rg.size)
    for mod, direction, pos, roots in p.grouped:
        _stripe_constraint(uf, mod, direction, pos, roots)
    # positions reached through several roots move together
    for r in p.reaches:
        uf.union_by_key(r.slice.units, r.slice.positions)
    kind = "channels"
    if any(_is_grouped(modules.get(r.origin)) for r in p.reaches) or any(
            isinstance(modules.get(n[0]), nn.GroupNorm) for n in p.norms):
        kind = "stripes"
    comp = [uf.find(r) for r in range(rg.size)]
    order = {c: i for i, c in enumerate(sorted(set(comp)))}
    unit_of_root = [order[c] for c in comp]
    n_units = len(order)
    merged: dict[tuple[str, int], dict[int, int]] = {}
    for r in p.reaches:
        slot = merged.setdefault((r.slice.tensor, r.slice.dim), {})
        for q, root in zip(r.slice.positions, r.slice.units, strict=True):
            slot[q] = unit_of_root[root]
    slices = [TensorSlice(t, d, tuple(sorted(m)), tuple(m[q] for q in sorted(m))) for (t, d), m in merged.items()]
    norm_sites = []
    for mod_name, pos, roots, size in p.norms:
        uniq = {q: unit_of_root[r] for q, r in zip(pos, roots, strict=True)}
        ps = tuple(sorted(uniq))
        norm_sites.append(NormSite(mod_name, ps, tuple(uniq[q] for q in ps), size))
    fpos, froots = p.feature
    fmap = {q: unit_of_root[r] for q, r in zip(fpos, froots, strict=True)}
    fps = tuple(sorted(fmap))
    return UnitGroup(index=0, name=rg.root, kind=kind, size=n_units, slices=slices, norms=norm_sites,
                     feature_positions=fps, feature_units=tuple(fmap[q] for q in fps),
                     unit_cost=unit_costs(slices, shapes, n_units))


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


def _stripe_constraint(uf: UnionFind, m: nn.Module, direction: str, pos: list[int], roots: list[int]) -> None:
    """Grouped convs and GroupNorm keep equal-sized groups: channel j of every group forms one unit."""
    if _is_grouped(m):
        per_group = (m.in_channels if direction == "in" else m.out_channels) // m.groups
        uf.union_by_key(roots, [p % per_group for p in pos])
    elif isinstance(m, nn.GroupNorm) and 1 < m.num_groups < m.num_channels:
        uf.union_by_key(roots, [p % (m.num_channels // m.num_groups) for p in pos])
