"""Widening: a unit group gains ``m`` units, the inverse of slicing (:mod:`anpyc.structure.slicing`).

Every tensor dimension a group owns gains the positions of the new units, laid out as the existing units are: a
dimension is a sequence of ``blocks`` (1 for channels; k for a fused q/k/v projection; one per group of a
depthwise layer's multiplier...) in each of which every unit owns ``width`` consecutive positions (1 for a
channel, ``head_dim`` for a head). The new units' positions go at the end of every block, so a fused projection
stays [q heads | k heads | v heads]. Modules re-derive their shape attributes from their tensors (the slicing
rules' ``resync``), attention modules count the new heads, and any int attribute equal to an old width takes the
new one.

The rules cannot widen everything: a group is widened only when it owns every position of every dimension it
touches (a concat shared with another group, or positions owned by no unit, would need a layout the group alone
does not decide) and each of those dimensions has the block layout above. :func:`growable` says why not.
A module can still hold a width the rules do not see (GhostNet's ``out[:, :out_chs]`` after a concat is a no-op
when slicing, a truncation when widening): :func:`check_growth` widens a copy by one unit and checks that what the
current units compute is unchanged, which is what growth promises every earlier task.

New entries of a weight are drawn from a normal with the mean and standard deviation of the tensor's *initial*
values (a norm's weight of ones gets ones, a conv its init or pretrained scale), or taken as given when a saved
growth is replayed. Running statistics are measured, not drawn: new channels start as a fresh BatchNorm does (mean
0, variance 1), whatever the layer's initial statistics were. A variance drawn around a trained layer's (spread
wide, mean near its spread) is negative for some channels, and a negative variance is NaN in the masked model of
every earlier task, where zeroing the channel does not help (NaN * 0 is NaN).
Because the new units are owned by the growing task, no earlier task's subnetwork contains them: the physically
sliced model of every earlier task is the same module it was, and computes bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ..errors import clip
from .layers import has_resync_rule, resync
from .slicing import _sync_static_sizes, drop_tensor_caches, original_size, set_site_heads
from .units import NormSite, Structure, TensorSlice, UnitGroup, unit_costs

__all__ = ["growable", "grow_group", "check_growth", "Layout"]


@dataclass(frozen=True)
class Layout:
    """A dimension of ``blocks`` blocks, each holding every unit's ``width`` consecutive positions in unit order."""

    blocks: int
    width: int
    units: int

    def old_to_new(self, m: int) -> torch.Tensor:
        """New index of every old position after ``m`` units are appended to every block."""
        p = torch.arange(self.blocks * self.units * self.width)
        block, rest = p // (self.units * self.width), p % (self.units * self.width)
        return block * (self.units + m) * self.width + rest

    def new_units(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the ``m`` new units in the grown dimension, and their local unit ids."""
        pos, ids = [], []
        for b in range(self.blocks):
            base = b * (self.units + m) * self.width + self.units * self.width
            for i in range(m):
                pos += [base + i * self.width + j for j in range(self.width)]
                ids += [self.units + i] * self.width
        return torch.tensor(pos, dtype=torch.long), torch.tensor(ids, dtype=torch.long)

    def unit_sequence(self, m: int) -> tuple[int, ...]:
        """The unit of every position of the grown dimension."""
        u = self.units + m
        return tuple((p // self.width) % u for p in range(self.blocks * u * self.width))


def _layout(positions: tuple[int, ...], units: tuple[int, ...], size: int, num_units: int) -> Layout | None:
    if sorted(positions) != list(range(size)) or num_units < 1:
        return None
    unit_at = [0] * size
    for p, u in zip(positions, units, strict=True):
        unit_at[p] = u
    width = 1
    while width < size and unit_at[width] == unit_at[0]:
        width += 1
    if size % (num_units * width):
        return None
    layout = Layout(size // (num_units * width), width, num_units)
    return layout if tuple(unit_at) == layout.unit_sequence(0) else None


def _dims(structure: Structure, group: UnitGroup) -> dict[tuple[str, int], Layout] | str:
    """The layout of every (tensor, dim) the group owns, or why the group cannot be widened."""
    out: dict[tuple[str, int], Layout] = {}
    for s in group.slices:
        size = structure.tensor_shapes[s.tensor][s.dim]
        layout = _layout(s.positions, s.units, size, group.size)
        if layout is None:
            return f"{s.tensor} (dim {s.dim}) is not laid out unit by unit over its whole size"
        out[(s.tensor, s.dim)] = layout
    for n in group.norms:
        if _layout(n.positions, n.units, n.size, group.size) is None:
            return f"norm {n.module} is not laid out unit by unit over its channels"
    if group.feature_positions and _layout(group.feature_positions, group.feature_units, structure.num_features,
                                           group.size) != Layout(1, 1, group.size):
        return "the trunk's output features are not this group's units one to one"
    if group.kind not in ("channels", "heads", "heads-major") or group.sync_parents:
        return f"groups of kind {group.kind!r} are not widened"
    return out


def growable(structure: Structure, name: str) -> str | None:
    """None when group ``name`` can be widened, else the reason it cannot."""
    group = next((g for g in structure.groups if g.name == name), None)
    if group is None:
        return f"there is no group {name!r}"
    why = _dims(structure, group)
    return why if isinstance(why, str) else None


def check_growth(trunk: nn.Module, structure: Structure, name: str, example: torch.Tensor, *, seed: int = 0
                 ) -> str | None:
    """None when widening group ``name`` keeps what the trunk computes on its current units, else why not.

    A copy of ``trunk`` (:func:`~.walk.verification_probe`: weights at unit gain and norms randomised, so equal
    outputs prove something) is widened by one unit, drawn at random like a real growth, and run masked with the
    new unit inactive, as every earlier task runs it: its features on ``example`` must match the copy's before the
    widening (max abs diff <= 1e-4 of their scale). ``trunk`` is not changed."""
    from .walk import close, masked_features, verification_probe

    why = growable(structure, name)
    if why is not None:
        return why
    gen = torch.Generator().manual_seed(seed)
    probe = verification_probe(trunk, example, gen)
    group = next(g for g in structure.groups if g.name == name)
    try:
        with torch.no_grad():
            ref = probe(example)
        init = {n: p.detach() for n, p in probe.named_parameters()}  # buffers start at zero (a variance of 0 is safe)
        grown, _, _ = grow_group(probe, structure, name, 1, init=init, generator=gen)
        active = torch.ones(grown.num_units, dtype=torch.bool)
        active[group.offset + group.size] = False
        y = masked_features(probe, grown, active, example)
    except Exception as e:  # a width the rules did not update breaks the forward pass
        text = clip(e, 200)
        return f"widening breaks the forward pass ({type(e).__name__}: {text})"
    if y.shape != ref.shape:
        return f"widening changes the features' shape ({tuple(ref.shape)} -> {tuple(y.shape)})"
    ok, diff = close(ref, y)
    if not ok:
        return f"widening changes what the current units compute (max abs diff {diff:.3g})"
    return None


def _grown_tensor(old: torch.Tensor, dims: dict[int, Layout], m: int, fill: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``old`` widened along ``dims``; the entries at new positions are ``fill`` (flat, in row-major order).
    Returns the new tensor and the bool mask of its new entries."""
    new, kept = old.detach(), torch.ones(old.shape, dtype=torch.bool)
    for d, layout in dims.items():
        idx = layout.old_to_new(m)
        shape = list(new.shape)
        shape[d] = layout.blocks * (layout.units + m) * layout.width
        grown = torch.zeros(shape, dtype=old.dtype, device=old.device)
        grown.index_copy_(d, idx.to(old.device), new)
        mask = torch.zeros(shape, dtype=torch.bool)
        mask.index_copy_(d, idx, kept)
        new, kept = grown, mask
    fresh = ~kept
    new[fresh.to(new.device)] = fill.to(dtype=new.dtype, device=new.device)
    return new, fresh


# what a fresh BatchNorm holds (``reset_running_stats``): the value of every new entry of its running statistics
_STAT_RESET = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}


def _statistic_reset(module: nn.Module, attr: str) -> float | None:
    """The value new entries of ``module.attr`` take when it is a running statistic, else None (drawn)."""
    if isinstance(module, nn.modules.batchnorm._NormBase) and attr in _STAT_RESET:
        return _STAT_RESET[attr]
    return None


def _draw(init: torch.Tensor | None, count: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if init is None or init.numel() == 0 or not init.is_floating_point():
        return torch.zeros(count, dtype=dtype)
    mean, std = float(init.float().mean()), float(init.float().std()) if init.numel() > 1 else 0.0
    return (mean + std * torch.randn(count, generator=generator)).to(dtype)


def grow_group(trunk: nn.Module, structure: Structure, name: str, m: int, *, init: dict[str, torch.Tensor],
               generator: torch.Generator, values: dict[str, torch.Tensor] | None = None
               ) -> tuple[Structure, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Widen group ``name`` of ``trunk`` (in place) by ``m`` units.

    ``init`` holds the initial value of every tensor (new entries are drawn to match it); ``values`` replays a
    recorded growth (the new entries of every tensor, flat). Returns the grown structure, the new entries of every
    widened tensor (what to record) and their masks (where they are in the grown tensor)."""
    group = next(g for g in structure.groups if g.name == name)
    dims = _dims(structure, group)
    if isinstance(dims, str):
        raise ValueError(f"group {name!r} cannot be widened: {dims}")
    by_tensor: dict[str, dict[int, Layout]] = {}
    for (tensor, d), layout in dims.items():
        by_tensor.setdefault(tensor, {})[d] = layout
    entries: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    touched: dict[str, nn.Module] = {}
    resized: dict[str, dict[int, set[int]]] = {}
    for tensor, tdims in sorted(by_tensor.items()):
        owner, _, attr = tensor.rpartition(".")
        module = trunk.get_submodule(owner)
        old = getattr(module, attr)
        probe_shape = list(old.shape)
        for d, layout in tdims.items():
            probe_shape[d] = layout.blocks * (layout.units + m) * layout.width
            resized.setdefault(owner, {}).setdefault(original_size(module, attr, d), set()).add(probe_shape[d])
        count = int(torch.tensor(probe_shape).prod()) - old.numel()
        reset = _statistic_reset(module, attr)
        if values is not None and tensor in values:
            fill = values[tensor]
        elif reset is not None:
            fill = torch.full((count,), reset, dtype=old.dtype)
        else:
            fill = _draw(init.get(tensor), count, generator, old.dtype)
        if fill.numel() != count:
            raise ValueError(f"recorded growth of {tensor} has {fill.numel()} entries, the layout needs {count}")
        new, new_mask = _grown_tensor(old, tdims, m, fill)
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module._buffers[attr] = new
        entries[tensor], masks[tensor] = fill.detach().cpu().clone(), new_mask.cpu()
        touched[owner] = module
    sites = {site.module for site in group.attention}
    for owner, module in touched.items():
        resync(module)
        if not has_resync_rule(module) and owner not in sites:
            _sync_static_sizes(module, resized.get(owner, {}))
    for site in group.attention:
        module = trunk.get_submodule(site.module)
        heads = getattr(module, site.count_attrs[0]) if site.count_attrs else site.num_heads
        set_site_heads(module, site, heads + m)
        touched[site.module] = module
    for module in touched.values():
        drop_tensor_caches(module)
    return _grown_structure(structure, group, dims, m, trunk), entries, masks


def _grown_structure(structure: Structure, group: UnitGroup, dims: dict[tuple[str, int], Layout], m: int,
                     trunk: nn.Module) -> Structure:
    shapes = dict(structure.tensor_shapes)
    named = dict(trunk.named_parameters())
    named.update(trunk.named_buffers())
    for tensor, _ in dims:
        shapes[tensor] = tuple(named[tensor].shape)
    slices = [TensorSlice(s.tensor, s.dim, tuple(range(shapes[s.tensor][s.dim])),
                          dims[(s.tensor, s.dim)].unit_sequence(m)) for s in group.slices]
    norms = []
    for n in group.norms:
        layout = _layout(n.positions, n.units, n.size, group.size)
        size = layout.blocks * (layout.units + m) * layout.width
        norms.append(NormSite(n.module, tuple(range(size)), layout.unit_sequence(m), size))
    attention = [replace(a, num_heads=a.num_heads + m) for a in group.attention]
    fpos, funits = group.feature_positions, group.feature_units
    num_features = structure.num_features
    if fpos:
        num_features += m
        fpos, funits = tuple(range(num_features)), tuple(range(num_features))
    grown = replace(group, size=group.size + m, slices=slices, norms=norms, attention=attention,
                    feature_positions=fpos, feature_units=funits)
    groups = [grown if g is group else g for g in structure.groups]
    groups = [_with_cost(g, shapes) for g in groups]
    return Structure(groups, list(structure.rejected), shapes, num_features, structure.model_name)


def _with_cost(group: UnitGroup, shapes: dict[str, tuple[int, ...]]) -> UnitGroup:
    """The group with its units' parameter counts recomputed from the (possibly grown) tensor shapes."""
    return replace(group, unit_cost=unit_costs(group.slices, shapes, group.size))
