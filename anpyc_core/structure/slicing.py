"""Physical removal: a copy of the trunk in which every unit outside an active set is sliced away.

This is the other side of the exactness invariant: the masked dense model and this sliced module compute the
same function. The exporter builds each task's standalone subnetwork with it; the walk uses it to verify groups.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .layers import resync
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
    for tensor_name, dims in structure.tensor_units.items():
        owner, _, attr = tensor_name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, attr)
        new = old.detach()
        for dim, ids in sorted(dims.items()):
            new = new.index_select(dim, kept_positions(ids, active).to(new.device))
        new = new.contiguous().clone()
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module._buffers[attr] = new
        touched[owner] = module
    for module in touched.values():
        resync(module)
    for group in structure.groups:
        kept = int(active[group.offset: group.offset + group.size].sum())
        for site in group.attention:
            module = model.get_submodule(site.module)
            for attr in site.count_attrs:
                setattr(module, attr, kept)
            for attr in site.width_attrs:
                setattr(module, attr, getattr(module, attr) // site.num_heads * kept)
    return model
