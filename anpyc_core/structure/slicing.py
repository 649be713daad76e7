"""Physical removal: a copy of the trunk in which every unit outside an active set is sliced away.

This is the other side of the exactness invariant: the masked dense model and this sliced module compute the
same function. The exporter builds each task's standalone subnetwork with it; the walk uses it to verify groups.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .layers import HEAD_COUNT_ATTRS, has_resync_rule, resync
from .units import AttentionSite, Structure
from .weightstats import fold_weight, standardizes_weight

__all__ = ["slice_trunk", "kept_positions", "original_size", "drop_tensor_caches", "set_site_heads"]


def kept_positions(unit_ids: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Indices of positions whose unit is active (``unit_ids`` == -1 means always kept)."""
    ext = torch.cat([active.bool().cpu(), torch.ones(1, dtype=torch.bool)])
    return ext[unit_ids].nonzero().squeeze(1)


def slice_trunk(trunk: nn.Module, structure: Structure, active: torch.Tensor, *, inplace: bool = False) -> nn.Module:
    """Return ``trunk`` (a deep copy unless ``inplace``) with the units where ``active`` is False removed."""
    model = trunk if inplace else copy.deepcopy(trunk)
    active = active.bool().cpu()
    touched: dict[str, nn.Module] = {}
    resized: dict[str, dict[int, set[int]]] = {}  # module -> original size -> new sizes of its sliced dimensions
    for_parents: dict[str, dict[int, set[int]]] = {}  # the same, from groups that also update parents
    syncing = torch.tensor([g.sync_parents for g in structure.groups] + [False], dtype=torch.bool)
    for tensor_name, dims in structure.tensor_units.items():
        owner, _, attr = tensor_name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, attr)
        new = old.detach()
        for dim, ids in sorted(dims.items()):
            new = new.index_select(dim, kept_positions(ids, active).to(new.device))
            change = (original_size(module, attr, dim), int(new.shape[dim]))
            resized.setdefault(owner, {}).setdefault(change[0], set()).add(change[1])
            groups = structure.unit_group[ids[ids >= 0]] if bool((ids >= 0).any()) else torch.zeros(0, dtype=torch.long)
            if groups.numel() and bool(syncing[groups].all()):
                for_parents.setdefault(owner, {}).setdefault(change[0], set()).add(change[1])
        new = new.contiguous().clone()
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module._buffers[attr] = new
        touched[owner] = module
    sites = {site.module for g in structure.groups for site in g.attention}
    for owner, module in touched.items():
        resync(module)
        if not has_resync_rule(module) and owner not in sites:  # attention modules: their head attributes below
            _sync_static_sizes(module, resized.get(owner, {}))
    # a parent that stores its children's width (``self.embed_dim`` used to split a fused projection) follows it
    inherited: dict[str, dict[int, set[int]]] = {}
    for owner, sizes in for_parents.items():
        parent = owner
        for _ in range(2):
            if not parent:
                break
            parent = parent.rpartition(".")[0]
            for old, new in sizes.items():
                inherited.setdefault(parent, {}).setdefault(old, set()).update(new)
    for name, sizes in inherited.items():
        if name and name not in touched and name not in sites:
            module = model.get_submodule(name)
            if not has_resync_rule(module):
                _sync_static_sizes(module, sizes)
    for group in structure.groups:
        kept = int(active[group.offset: group.offset + group.size].sum())
        for site in group.attention:
            module = model.get_submodule(site.module)
            set_site_heads(module, site, kept)
            touched[site.module] = module
    for module in touched.values():
        drop_tensor_caches(module)
    for owner, module in touched.items():  # weight-standardising layers become the plain layers they compute
        if owner and owner not in sites and standardizes_weight(module):
            plain = fold_weight(module)
            if plain is not None:
                parent, _, child = owner.rpartition(".")
                setattr(model.get_submodule(parent), child, plain)
    return model


def set_site_heads(module: nn.Module, site: AttentionSite, heads: int) -> None:
    """Give an attention site's static head attributes ``heads`` heads: its counts, its widths (count x per-head
    size) and the head count inside its shape tuples."""
    current = getattr(module, site.count_attrs[0]) if site.count_attrs else site.num_heads
    for attr in site.width_attrs:
        setattr(module, attr, getattr(module, attr) // current * heads)
    for attr in site.shape_attrs:
        setattr(module, attr, tuple(heads if v == current else v for v in getattr(module, attr)))
    for attr in site.count_attrs:
        setattr(module, attr, heads)


def original_size(module: nn.Module, attr: str, dim: int) -> int:
    """The size of dimension ``dim`` of ``module``'s tensor ``attr`` before anpyc first resized it (call it before
    replacing the tensor). Widths a module stores are matched against these, not against its current sizes: a
    grown module whose width came to equal an unrelated stored number (4 heads, a window area of 4) must not
    rewrite that number when it is sliced."""
    shapes = module.__dict__.setdefault("_anpyc_shapes", {})
    return shapes.setdefault(attr, tuple(getattr(module, attr).shape))[dim]


def _ints(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sync_static_sizes(module: nn.Module, resized: dict[int, set[int]]) -> None:
    """A module without a layer rule that stores its width (``self.shape = (dim, 1, 1)``, ``self.dim = dim``) gets
    the new width wherever it stored the original one (``resized``: original size -> new sizes; see
    :func:`original_size`), when the original width maps to exactly one new width."""
    changes = {old: next(iter(new)) for old, new in resized.items() if len(new) == 1}
    if not changes:
        return
    original = module.__dict__.setdefault("_anpyc_attrs", {
        k: v for k, v in vars(module).items() if not k.startswith("_") and k not in HEAD_COUNT_ATTRS
        and (_ints(v) or (isinstance(v, (tuple, list)) and v and all(_ints(x) for x in v)))})
    for attr, value in original.items():
        current = getattr(module, attr, None)
        if _ints(value) and value in changes and _ints(current):
            setattr(module, attr, changes[value])
        elif isinstance(value, (tuple, list)) and type(current) is type(value) and len(current) == len(value):
            if any(v in changes for v in value):
                setattr(module, attr, type(value)(changes.get(v, c) for v, c in zip(value, current)))


def drop_tensor_caches(module: nn.Module) -> None:
    """Forget caches of derived tensors (e.g. attention biases cached per device in eval mode): they were computed
    from the tensors before slicing."""
    for attr, value in list(vars(module).items()):
        if attr.startswith("_"):  # _parameters, _buffers, _modules: nn.Module's own registries
            continue
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            setattr(module, attr, {})
