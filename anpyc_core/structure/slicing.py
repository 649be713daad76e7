"""Physical removal: a copy of the trunk in which every unit outside an active set is sliced away.

This is the other side of the exactness invariant: the masked dense model and this sliced module compute the
same function. The exporter builds each task's standalone subnetwork with it; the walk uses it to verify groups.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .layers import HEAD_COUNT_ATTRS, has_resync_rule, resync
from .units import Structure

__all__ = ["slice_trunk", "kept_positions"]


def kept_positions(unit_ids: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Indices of positions whose unit is active (``unit_ids`` == -1 means always kept)."""
    ext = torch.cat([active.bool().cpu(), torch.ones(1, dtype=torch.bool)])
    return ext[unit_ids].nonzero().squeeze(1)


def slice_trunk(trunk: nn.Module, structure: Structure, active: torch.Tensor, *, inplace: bool = False) -> nn.Module:
    """Return ``trunk`` (a deep copy unless ``inplace``) with the units where ``active`` is False removed."""
    model = trunk if inplace else copy.deepcopy(trunk)
    active = active.bool().cpu()
    touched: dict[str, nn.Module] = {}
    resized: dict[str, dict[int, set[int]]] = {}  # module -> old size -> new sizes of its sliced dimensions
    for_parents: dict[str, dict[int, set[int]]] = {}  # the same, from groups that also update parents
    syncing = torch.tensor([g.sync_parents for g in structure.groups] + [False], dtype=torch.bool)
    for tensor_name, dims in structure.tensor_units.items():
        owner, _, attr = tensor_name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, attr)
        new = old.detach()
        for dim, ids in sorted(dims.items()):
            new = new.index_select(dim, kept_positions(ids, active).to(new.device))
            change = (int(old.shape[dim]), int(new.shape[dim]))
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
            for attr in site.count_attrs:
                setattr(module, attr, kept)
            for attr in site.width_attrs:
                setattr(module, attr, getattr(module, attr) // site.num_heads * kept)
            touched[site.module] = module
    for module in touched.values():
        _drop_tensor_caches(module)
    return model


def _sync_static_sizes(module: nn.Module, resized: dict[int, set[int]]) -> None:
    """A module without a layer rule that stores its width (``self.shape = (dim, 1, 1)``, ``self.dim = dim``) gets
    the new width wherever the old one was stored, when the old width maps to exactly one new width."""
    changes = {old: next(iter(new)) for old, new in resized.items() if len(new) == 1 and next(iter(new)) != old}
    if not changes:
        return
    for attr, value in list(vars(module).items()):
        if attr.startswith("_") or isinstance(value, bool) or attr in HEAD_COUNT_ATTRS:
            continue
        if isinstance(value, int) and value in changes:
            setattr(module, attr, changes[value])
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in value):
            if any(v in changes for v in value):
                setattr(module, attr, type(value)(changes.get(v, v) for v in value))


def _drop_tensor_caches(module: nn.Module) -> None:
    """Forget caches of derived tensors (e.g. attention biases cached per device in eval mode): they were computed
    from the tensors before slicing."""
    for attr, value in list(vars(module).items()):
        if attr.startswith("_"):  # _parameters, _buffers, _modules: nn.Module's own registries
            continue
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            setattr(module, attr, {})
