"""Attention detection: which modules carry heads, and the unit group of one module's heads.

An attention module is found by its static head count (a ``num_heads``-like attribute > 1). The traced groups
inside it are cut by head instead of by channel (q, k, v and output slices of one head together), in one of the
:data:`HEAD_MODES` layouts; the walk moves to the next mode when one fails parity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch.nn as nn

from .layers import HEAD_COUNT_ATTRS, HEAD_WIDTH_ATTRS
from .units import AttentionSite, NormSite, TensorSlice, UnitGroup, unit_costs

if TYPE_CHECKING:
    from .build import Prepared

__all__ = ["HEAD_MODES", "Attention", "attention_modules", "owner_of", "heads_fit", "core_members", "heads_group"]

# How an attention module's heads are formed, tried in this order: every traced group inside the module as heads
# (standard then head-major layout), then only its core (the groups feeding the projection out of the module, plus
# groups that index heads themselves, e.g. talking-heads mixers), then "off": plain channels.
HEAD_MODES = ("heads", "heads-major", "heads-core", "heads-core-major", "off")

_LINEAR_LIKE = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class Attention:
    heads: int
    widths: tuple[str, ...]  # attributes equal to heads x (a per-head size)
    counts: tuple[str, ...]
    head_dim: int | None
    helpers: tuple[AttentionSite, ...] = ()  # nested per-head modules (relative-position MLPs, ...)


def _int_attrs(m: nn.Module) -> dict[str, int]:
    return {k: v for k, v in vars(m).items()
            if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_")}


def attention_modules(trunk: nn.Module) -> dict[str, Attention]:
    """Modules carrying a static head count (``num_heads``-like attribute > 1)."""
    found = {}
    modules = dict(trunk.named_modules())
    for name, m in modules.items():
        counts = tuple(a for a in HEAD_COUNT_ATTRS if isinstance(getattr(m, a, None), int) and getattr(m, a) > 1)
        if not counts:
            continue
        heads = getattr(m, counts[0])
        head_dim = next((getattr(m, a) for a in ("head_dim", "dim_head", "head_channels")
                         if isinstance(getattr(m, a, None), int)), None)
        widths = tuple(a for a in HEAD_WIDTH_ATTRS if head_dim is not None and getattr(m, a, None) == heads * head_dim)
        found[name] = Attention(heads, widths, tuple(a for a in counts if getattr(m, a) == heads), head_dim)
    # a module with the same head count but no per-head width, inside an attention module, is one of its per-head
    # helpers (a relative-position MLP emitting one bias per head): its tensors follow the outer module's heads
    helpers: dict[str, list[AttentionSite]] = {}
    for n, a in found.items():
        outer = owner_of(n, [o for o, b in found.items() if o != n and b.heads == a.heads and b.head_dim is not None])
        if a.head_dim is None and outer is not None:
            shaped = tuple(k for k, v in vars(modules[n]).items() if not k.startswith("_") and isinstance(v, tuple)
                           and a.heads in v and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
            helpers.setdefault(outer, []).append(AttentionSite(n, a.heads, (), a.counts, shaped))
    nested = {h.module for hs in helpers.values() for h in hs}
    return {n: dataclasses.replace(a, helpers=tuple(helpers.get(n, ()))) for n, a in found.items() if n not in nested}


def owner_of(name: str, candidates: Iterable[str]) -> str | None:
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


def core_members(a_name: str, members: list[Prepared], prepared: list[Prepared], attn: dict, modules: dict,
                 shapes: dict) -> list[Prepared]:
    """The groups that must be cut by head: those feeding a layer whose output leaves the attention module (the
    output projection reads every head), and those whose tensors are indexed by head only (talking-heads
    mixers); other groups inside the module (a spatial-reduction conv, ...) stay channels."""
    heads = attn[a_name].heads
    exits = set()
    for q in prepared:
        if not any(owner_of(r.origin, attn) != a_name for r in q.reaches):
            continue
        for r in q.reaches:
            if r.direction == "out" and owner_of(r.origin, attn) == a_name and isinstance(modules.get(r.origin),
                                                                                        _LINEAR_LIKE):
                exits.add(r.origin)
    return [p for p in members
            if any(r.direction == "in" and r.origin in exits for r in p.reaches)
            or all(shapes[r.slice.tensor][r.slice.dim] == heads for r in p.reaches if not r.norm)]


def heads_fit(p: Prepared, a: Attention, shapes: dict) -> bool:
    """Every non-norm tensor dimension of the group splits into the heads (bare parameters: some dim does)."""
    for r in p.reaches:
        shape = shapes.get(r.slice.tensor)
        if shape is None or r.slice.dim >= len(shape):
            return False
        if r.bare:
            if shape[r.slice.dim] % a.heads and a.heads not in shape:
                return False
        elif not r.norm and shape[r.slice.dim] % a.heads:
            return False
    return True


def heads_group(trunk: nn.Module, a_name: str, a: Attention, members: list[Prepared], shapes: dict, mode: str,
                others: set[int], prepared: list[Prepared]) -> UnitGroup | str:
    """One group of ``a.heads`` units from the tensors the member groups touch, laid out by head."""
    heads = a.heads
    dims: dict[tuple[str, int], int] = {}
    norm_dims: dict[str, int] = {}
    widths: set[int] = set()
    for p in members:
        for r in p.reaches:
            shape = shapes[r.slice.tensor]
            dim = r.slice.dim
            if r.bare and heads in shape:  # TP guesses the last dim for bare parameters; per-head ones lead with it
                dim = shape.index(heads)
            if r.norm:
                norm_dims[r.origin] = shape[dim]
            elif shape[dim] > heads:
                widths.add(shape[dim])
            dims[(r.slice.tensor, dim)] = shape[dim]
    # norms over one head's channels (q/k norms) are shared by every head: not sliced
    for origin, size in norm_dims.items():
        if size not in widths and size != heads:
            for key in [k for k in dims if k[0].rsplit(".", 1)[0] == origin]:
                dims.pop(key)
    # per-head tensors of the module that no traced group reached (bias tables, temperatures, ...)
    claimed_elsewhere = {r.slice.tensor for q in prepared if id(q) in others for r in q.reaches}
    module = trunk.get_submodule(a_name)
    prefix = f"{a_name}." if a_name else ""
    for sub_name, sub in module.named_modules():
        if isinstance(sub, _LINEAR_LIKE):
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
    major = mode.endswith("major")
    slices = []
    for (tensor, dim), size in sorted(dims.items()):
        units = tuple(_head_of(q, size, heads, head_dim, major=major) for q in range(size))
        slices.append(TensorSlice(tensor, dim, tuple(range(size)), units))
    norm_sites = []
    for origin, size in norm_dims.items():
        if size in widths:
            units = tuple(_head_of(q, size, heads, head_dim, major=major) for q in range(size))
            norm_sites.append(NormSite(origin, tuple(range(size)), units, size))
    # static widths of the heads (``self.val_attn_dim = num_heads * val_dim``): int attributes equal to a width
    ints = _int_attrs(module)
    width_attrs = tuple(sorted(set(a.widths) | {k for k, v in ints.items() if k not in a.counts and v in widths
                                                and v % heads == 0}))
    sites = [AttentionSite(a_name, heads, width_attrs, a.counts)]
    sites += list(a.helpers)
    return UnitGroup(index=0, name=members[0].raw.root, kind=mode, size=heads, slices=slices, norms=norm_sites,
                     attention=sites, unit_cost=unit_costs(slices, shapes, heads))
