"""Where a group breaks parity: the first tensor at which the masked and the sliced trunk part, and by how much.

Verification only compares the trunk's final features, which says *that* a group is wrong, not *where*. To make a
rejection fixable, :func:`locate_break` runs the masked and the sliced model once more with hooks on every module
and compares their inputs and outputs in execution order. A sliced tensor is compared with the masked one at the
kept positions of whichever of the module's own unit-indexed dimensions has the masked size; the first module whose
input or output differs by more than the verification tolerance is where the slicing went wrong (an input that
differs while every module before it agreed points at code between modules, e.g. a ``reshape`` with a stored head
count). :func:`explain_rejected` formats a structure's rejected groups with that location.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import clip
from .masked import MaskedModel
from .slicing import kept_positions
from .units import Structure

__all__ = ["Break", "locate_break", "explain_rejected"]

RTOL = 1e-4  # the walk's parity tolerance, relative to max(1, |reference|)


@dataclass(frozen=True)
class Break:
    """The first tensor at which masked and sliced differ: ``tensor`` (a parameter, ``"<module> input"``,
    ``"<module> output"`` or ``"features"``) and the max abs difference there (``inf`` for an error)."""

    tensor: str
    max_abs_diff: float
    error: str = ""


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class _Recorder:
    """Module inputs and outputs in the order they happen: ``[(module, "input"/"output", call, tensor)]``."""

    def __init__(self, model: nn.Module):
        self.events: list[tuple[str, str, int, torch.Tensor]] = []
        self.stack: list[str] = []
        self.calls: dict[str, int] = {}
        self.hooks = []
        for name, m in model.named_modules():
            if not name:
                continue
            self.hooks.append(m.register_forward_pre_hook(self._enter(name)))
            self.hooks.append(m.register_forward_hook(self._leave(name)))

    def _enter(self, name: str):
        def hook(module, args):
            self.stack.append(name)
            x = _first_tensor(args)
            if x is not None:
                self.events.append((name, "input", self.calls.get(name, 0), x.detach().clone()))
        return hook

    def _leave(self, name: str):
        def hook(module, args, out):
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            y = _first_tensor(out)
            if y is not None:
                self.events.append((name, "output", call, y.detach().clone()))
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _module_ids(structure: Structure, module: str) -> list[torch.Tensor]:
    """Unit ids of every unit-indexed dimension of ``module``'s own tensors (and of it as a norm)."""
    ids = [dims[d] for t, dims in structure.tensor_units.items() if t.rpartition(".")[0] == module for d in dims]
    if module in structure.norm_units:
        ids.append(structure.norm_units[module])
    return ids


def _diff(structure: Structure, module: str, ref: torch.Tensor, got: torch.Tensor, active: torch.Tensor
          ) -> float | None:
    """Max abs difference of ``got`` (sliced) from ``ref`` (masked) at the kept positions; None if not comparable."""
    if ref.shape != got.shape:
        if ref.ndim != got.ndim:
            return None
        dims = [d for d in range(ref.ndim) if ref.shape[d] != got.shape[d]]
        if len(dims) != 1:
            return None
        d = dims[0]
        keep = next((k for k in (kept_positions(ids, active) for ids in _module_ids(structure, module)
                                 if ids.numel() == ref.shape[d]) if k.numel() == got.shape[d]), None)
        if keep is None:
            return None
        ref = ref.index_select(d, keep.to(ref.device))
    if not ref.is_floating_point() or ref.numel() == 0:
        return None
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((ref.float() - got.float()).abs().max())


def _name(structure: Structure, module: str, kind: str) -> str:
    if kind == "output":
        own = [t for t in structure.tensor_units if t.rpartition(".")[0] == module]
        if own:
            return own[0]
    return f"{module} {kind}"


def locate_break(trunk: nn.Module, structure: Structure, active: torch.Tensor, example: torch.Tensor) -> Break:
    """The first place where the masked ``trunk`` and its slice for ``active`` compute different values."""
    from .slicing import slice_trunk

    try:
        sliced = slice_trunk(trunk, structure, active).eval()
    except Exception as e:
        return Break("(slicing)", float("inf"), clip(f"{type(e).__name__}: {e}", 300))
    masked = MaskedModel(trunk, structure.num_features, norm_modules=list(structure.norm_units), weight_stats=True)
    params = {n for n, _ in trunk.named_parameters()}
    masked.set_masks(structure.tensor_masks(active, params), structure.norm_masks(active), structure.feature_mask(active))
    masked.eval()
    ref_rec, got_rec = _Recorder(trunk), _Recorder(sliced)
    try:
        with torch.no_grad():
            y_ref = masked.features(example)
            try:
                y_got = sliced(example)
            except Exception as e:  # the module that was running when the sliced model failed
                where = got_rec.stack[-1] if got_rec.stack else "(trunk)"
                return Break(_name(structure, where, "output"), float("inf"), clip(f"{type(e).__name__}: {e}", 300))
    finally:
        ref_rec.close()
        got_rec.close()
        for h in masked._hooks:
            h.remove()
    got = {(m, k, c): t for m, k, c, t in got_rec.events}
    for module, kind, call, ref in ref_rec.events:
        other = got.get((module, kind, call))
        if other is None:
            continue
        d = _diff(structure, module, ref, other, active)
        if d is not None and not d <= RTOL * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0):
            return Break(_name(structure, module, kind), d)
    keep = kept_positions(structure.feature_unit_ids, active)
    ref = y_ref[:, keep]
    if ref.shape != y_got.shape:
        return Break("features", float("inf"), f"shape {tuple(y_got.shape)} != {tuple(ref.shape)}")
    return Break("features", float((ref - y_got).abs().max()) if ref.numel() else 0.0)


def explain_rejected(rejected, *, include_single: bool = False) -> list[str]:
    """One line per rejected group: its name, the tensor where parity broke and by how much, and the reason.

    ``rejected`` is a :class:`Structure`, its ``rejected`` records, or their dict form (``name``, ``reason``,
    ``tensor``, ``max_abs_diff``, as ``anpyc check --json`` reports them). Single-unit groups are left out unless
    ``include_single``."""
    items = rejected.rejected if isinstance(rejected, Structure) else rejected
    lines = []
    for r in items:
        get = r.get if isinstance(r, dict) else (lambda k, d=None, _r=r: getattr(_r, k, d))
        name, reason, tensor, diff = get("name"), get("reason", ""), get("tensor", ""), get("max_abs_diff")
        if reason == "a single unit" and not include_single:
            continue
        if tensor:
            size = "?" if diff is None else ("an error" if diff == float("inf") else f"{diff:.3g}")
            lines.append(f"{name}: parity broke at {tensor} (max abs diff {size}); {reason}")
        else:
            lines.append(f"{name}: {reason}")
    return lines
