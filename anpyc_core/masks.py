"""Ownership: which task owns each unit, and the masks that follow from it.

One ``uint8`` per unit holds its owner task (``FREE`` = 255 means no task has it), as in Avalanche's PackNet:
task ``t``'s subnetwork is every unit with ``owner <= t``, so one small tensor encodes every task's mask.
Two spaces share this interface:

* :class:`UnitSpace` — structured units (channels, neurons, heads) from the structure walk;
* :class:`ElementSpace` — unstructured: every element of every weight matrix is a unit (the paper mode).

Masks are saved as safetensors (``masks.safetensors``) with a versioned schema in the metadata: the file format is
:mod:`anpyc.maskfile` (its functions are re-exported here).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.nn as nn

from .errors import StateFileError
from .maskfile import MASKS_FORMAT, MASKS_READS, MASKS_VERSION, load_masks, save_masks, schema_tasks
from .structure.units import along
from .registry import Registry
from .structure import Structure, kept_positions, slice_trunk, walk

__all__ = ["FREE", "MASK_SPACES", "MaskSpace", "UnitSpace", "ElementSpace", "save_masks", "load_masks", "schema_tasks",
           "MASKS_FORMAT", "MASKS_VERSION", "MASKS_READS"]

FREE = 255  # the free marker of uint8 owners; a space's own marker is ``space.free`` (the largest owner value)
WIDE = torch.int16  # owners of runs past 254 tasks (free = 32767)
_DTYPES = {"uint8": torch.uint8, "int16": torch.int16}


class MaskSpace(ABC):
    """Owners of the units of one trunk, and the masks they imply."""

    granularity: str
    owners: torch.Tensor  # uint8, one per unit
    structure: Structure | None = None  # the walk's unit groups (structured spaces)
    base_sizes: dict[str, int] = {}  # every group's width before any growth (anpyc.growth)
    # whether a removed unit leaves a layer's weight (sliced away) rather than a zero in it: weight-standardised
    # layers then take their statistics over the kept weights in the masked model (structure.masked)
    removes_weights: bool = False

    @classmethod
    @abstractmethod
    def for_trunk(cls, trunk: nn.Module, example: torch.Tensor, *, num_features: int, verify: bool, seed: int,
                  model_name: str | None, layout: list[dict] | None) -> "MaskSpace":
        """The space of ``trunk``'s trainable parameters (``layout``: a saved unit layout to rebuild exactly)."""

    def norm_modules(self) -> list[str]:
        """Modules that normalise across channels of some unit (the masked model computes their statistics over
        the kept channels only)."""
        return []

    @property
    def num_units(self) -> int:
        return int(self.owners.numel())

    @property
    def free(self) -> int:
        """The owner value of a free unit: the largest value of the owner dtype (255 for uint8)."""
        return int(torch.iinfo(self.owners.dtype).max)

    def make_room(self, task: int) -> None:
        """Widen the owner dtype (uint8 -> int16) when task index ``task`` would reach the free marker."""
        if task >= self.free - 1 and self.owners.dtype == torch.uint8:
            wide = self.owners.to(WIDE)
            wide[self.owners == FREE] = int(torch.iinfo(WIDE).max)
            self.owners = wide

    # ------------------------------------------------------------------ ownership
    def active(self, task: int) -> torch.Tensor:
        """Units of task ``task``'s subnetwork: owned by ``task`` or an earlier task."""
        return self.owners.long() <= task

    def claim_free(self, task: int) -> torch.Tensor:
        """Give every free unit to ``task``; returns the mask of the units claimed."""
        free = self.owners == self.free
        self.owners[free] = task
        return free

    def release(self, units: torch.Tensor) -> None:
        self.owners[units] = self.free

    def capacity(self) -> float:
        """Fraction of units owned by some task."""
        return float((self.owners != self.free).float().mean()) if self.num_units else 0.0

    def capacity_by_task(self, tasks: list[int]) -> dict[int, float]:
        n = max(self.num_units, 1)
        return {t: float((self.owners == t).sum()) / n for t in tasks}

    def digest(self, task: int) -> str:
        """sha256 of task ``task``'s mask (its active units) and the space's layout."""
        h = hashlib.sha256(self.layout_key().encode())
        h.update(self.active(task).to(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ masks
    @abstractmethod
    def tensor_masks(self, active: torch.Tensor) -> dict[str, torch.Tensor]:
        """Element masks (float, broadcastable) for every parameter with an inactive element."""

    @abstractmethod
    def norm_masks(self, active: torch.Tensor) -> dict[str, torch.Tensor]:
        """Channel masks of normalisation modules with an inactive channel."""

    @abstractmethod
    def feature_mask(self, active: torch.Tensor) -> torch.Tensor | None:
        """Mask over the trunk's output features, or None when all are active."""

    @abstractmethod
    def element_owner(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Owner of every element of tensor ``name``: the latest owner among the units it belongs to."""

    @abstractmethod
    def touched(self, units: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per tensor: bool mask of the elements that belong to any unit in ``units`` (a bool vector)."""

    @abstractmethod
    def unit_scores(self, element_scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Aggregate element scores into one score per unit, normalised per parameter of the unit."""

    @abstractmethod
    def unit_cost(self) -> torch.Tensor:
        """Parameter elements each unit touches (for capacity in parameters and fair scores)."""

    @abstractmethod
    def layout_key(self) -> str:
        """A fingerprint of the unit layout."""

    @abstractmethod
    def schema(self) -> dict:
        """JSON-ready description of the units, stored in the mask file's metadata."""

    # ------------------------------------------------------------------ pruning
    @abstractmethod
    def unit_groups(self) -> tuple[torch.Tensor, int]:
        """The group of every unit (the units whose capacity is planned together) and the number of groups."""

    def releasable(self, order: torch.Tensor, count: int, task: int, minimum: int) -> torch.Tensor:
        """The first ``count`` units of ``order`` that may leave task ``task``'s subnetwork."""
        return order[:max(count, 0)]

    def on_release(self, params: dict[str, torch.Tensor], units: torch.Tensor) -> None:
        """Called after ``units`` (a bool vector) returned to the free pool."""

    # ------------------------------------------------------------------ subnetworks
    @abstractmethod
    def extract(self, trunk: nn.Module, head: nn.Linear, active: torch.Tensor) -> tuple[nn.Module, nn.Linear]:
        """The standalone subnetwork of ``active`` units from a private copy of the trunk and head (modified)."""

    @abstractmethod
    def cost(self, sub: Callable[[], nn.Module], dense: nn.Module, active: torch.Tensor, example: torch.Tensor,
             dense_flops: int) -> tuple[int, int]:
        """``(parameters, FLOPs)`` of the subnetwork of ``active`` (``sub()`` builds it, ``dense`` is the whole
        model as a ``trunk``/``head`` module)."""

    def capacity_params(self) -> float:
        """The share of the trunk's parameters (counted by unit cost) in units some task owns."""
        cost = self.unit_cost().double()
        total = float(cost.sum())
        return float(cost[self.owners != self.free].sum()) / total if total else 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"owners": self.owners}

    def load_owners(self, tensors: dict[str, torch.Tensor]) -> None:
        owners = tensors.get("owners")
        if owners is None or owners.dtype not in _DTYPES.values() or owners.shape != self.owners.shape:
            raise StateFileError("mask file's owner tensor does not match this backbone's units",
                                 "use the mask file of this run (same backbone and input size)")
        self.owners = owners.clone()


# ================================================================================================ structured

class UnitSpace(MaskSpace):
    """Structured units from the structure walk."""

    granularity = "unit"
    removes_weights = True

    def __init__(self, structure: Structure, param_names: set[str]):
        self.structure = structure
        self.param_names = param_names
        self.owners = torch.full((structure.num_units,), FREE, dtype=torch.uint8)
        self.base_sizes = {g.name: g.size for g in structure.groups}

    def grown(self, structure: Structure, name: str, m: int) -> "UnitSpace":
        """The space of ``structure`` (this one with group ``name`` widened by ``m`` units): the same owners, the new
        units free."""
        g = next(g for g in self.structure.groups if g.name == name)
        end = g.offset + g.size
        space = UnitSpace(structure, self.param_names)
        space.owners = torch.cat([self.owners[:end], torch.full((m,), self.free, dtype=self.owners.dtype),
                                  self.owners[end:]])
        space.base_sizes = dict(self.base_sizes)
        return space

    @classmethod
    def for_trunk(cls, trunk, example, *, num_features, verify, seed, model_name, layout):
        structure = walk(trunk, example, num_features=num_features, verify=verify, seed=seed, model_name=model_name,
                         layout=layout)
        return cls(structure, {n for n, p in trunk.named_parameters() if p.requires_grad})

    def norm_modules(self) -> list[str]:
        return list(self.structure.norm_units)

    def unit_groups(self):
        return self.structure.unit_group, len(self.structure.groups)

    def releasable(self, order, count, task, minimum):
        """Group minimums kept: a group never drops below ``minimum`` units of the task's subnetwork."""
        if count <= 0:
            return order[:0]
        left = torch.zeros(len(self.structure.groups), dtype=torch.long)
        left.index_add_(0, self.structure.unit_group, self.active(task).long())
        picked = []
        for u in order.tolist():
            g = int(self.structure.unit_group[u])
            if left[g] > minimum:
                left[g] -= 1
                picked.append(u)
                if len(picked) >= count:
                    break
        return torch.tensor(picked, dtype=torch.long)

    def extract(self, trunk, head, active):
        trunk = slice_trunk(trunk, self.structure, active, inplace=True)
        keep = kept_positions(self.structure.feature_unit_ids, active)
        new_head = nn.Linear(len(keep), head.out_features)
        with torch.no_grad():
            new_head.weight.copy_(head.weight[:, keep])
            new_head.bias.copy_(head.bias)
        return trunk, new_head

    def cost(self, sub, dense, active, example, dense_flops):
        from .flops import count_flops, count_params

        model = sub()
        return count_params(model), count_flops(model, example)

    def tensor_masks(self, active: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.structure.tensor_masks(active, self.param_names)

    def norm_masks(self, active: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.structure.norm_masks(active)

    def feature_mask(self, active: torch.Tensor) -> torch.Tensor | None:
        return self.structure.feature_mask(active)

    def element_owner(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        ext = self.structure.extend(self.owners, 0)
        owner = torch.zeros(shape, dtype=self.owners.dtype)
        for dim, ids in self.structure.tensor_units.get(name, {}).items():
            owner = torch.maximum(owner, along(ext[ids], len(shape), dim).expand(shape))
        return owner

    def touched(self, units: torch.Tensor) -> dict[str, torch.Tensor]:
        ext = self.structure.extend(units.bool(), False)
        out = {}
        for name, dims in self.structure.tensor_units.items():
            shape = self.structure.tensor_shapes[name]
            mask = None
            for dim, ids in dims.items():
                m = ext[ids]
                if not bool(m.any()):
                    continue
                m = along(m, len(shape), dim).expand(shape)
                mask = m.clone() if mask is None else mask | m
            if mask is not None:
                out[name] = mask
        return out

    def unit_scores(self, element_scores: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(self.num_units, dtype=torch.float64)
        for name, dims in self.structure.tensor_units.items():
            s = element_scores.get(name)
            if s is None:
                continue
            for dim, ids in dims.items():
                reduce = [d for d in range(s.ndim) if d != dim]
                per_pos = s.double().sum(dim=reduce) if reduce else s.double()
                valid = ids >= 0
                total.index_add_(0, ids[valid], per_pos[valid])
        return (total / self.unit_cost().double().clamp_min(1)).float()

    def unit_cost(self) -> torch.Tensor:
        return self.structure.unit_cost

    def layout_key(self) -> str:
        return self.structure.fingerprint()

    def schema(self) -> dict:
        return {
            "granularity": self.granularity,
            "free": self.free,
            "dtype": str(self.owners.dtype).removeprefix("torch."),
            "fingerprint": self.structure.fingerprint(),
            "num_units": self.num_units,
            "groups": [{"name": g.name, "kind": g.kind, "offset": g.offset, "size": g.size}
                       for g in self.structure.groups],
        }


# ================================================================================================ unstructured

class ElementSpace(MaskSpace):
    """Every element of every weight tensor (``ndim >= 2``) is a unit; other tensors are shared by all tasks."""

    granularity = "element"

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.names = sorted(n for n, s in shapes.items() if len(s) >= 2)
        self.shapes = {n: tuple(shapes[n]) for n in self.names}
        self.offsets = {}
        off = 0
        for n in self.names:
            self.offsets[n] = off
            off += int(torch.tensor(self.shapes[n]).prod())
        self.owners = torch.full((off,), FREE, dtype=torch.uint8)

    @classmethod
    def for_trunk(cls, trunk, example, *, num_features, verify, seed, model_name, layout):
        return cls({n: tuple(p.shape) for n, p in trunk.named_parameters() if p.requires_grad})

    def unit_groups(self):
        """One group per weight tensor."""
        if getattr(self, "_groups", None) is None or self._groups.numel() != self.num_units:
            self._groups = torch.zeros(self.num_units, dtype=torch.long)
            for i, n in enumerate(self.names):
                self._groups[self.offsets[n]: self.offsets[n] + self._view(self.owners, n).numel()] = i
        return self._groups, len(self.names)

    def on_release(self, params, units):
        """The original zeroes released weights."""
        with torch.no_grad():
            for name, m in self.touched(units).items():
                params[name].masked_fill_(m.to(params[name].device), 0.0)

    def extract(self, trunk, head, active):
        masks = self.tensor_masks(active)
        with torch.no_grad():
            for name, p in trunk.named_parameters():
                if name in masks:
                    p.mul_(masks[name].cpu())
        return trunk, head

    def cost(self, sub, dense, active, example, dense_flops):
        """Kept elements (plus the head); unstructured masks remove no computation."""
        masks = self.tensor_masks(active)
        params = sum(int(masks[n].expand(p.shape).sum()) if n in masks else p.numel()
                     for n, p in dense.trunk.named_parameters())
        return params + sum(p.numel() for p in dense.head.parameters()), dense_flops

    def _view(self, values: torch.Tensor, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        n = int(torch.tensor(shape).prod())
        return values[self.offsets[name]: self.offsets[name] + n].view(shape)

    def tensor_masks(self, active: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.names:
            m = self._view(active, n)
            if not bool(m.all()):
                out[n] = m.float()
        return out

    def norm_masks(self, active: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def feature_mask(self, active: torch.Tensor) -> torch.Tensor | None:
        return None

    def element_owner(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name in self.offsets:
            return self._view(self.owners, name).clone()
        return torch.zeros(shape, dtype=self.owners.dtype)

    def touched(self, units: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.names:
            m = self._view(units.bool(), n)
            if bool(m.any()):
                out[n] = m.clone()
        return out

    def unit_scores(self, element_scores: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for n in self.names:
            s = element_scores.get(n)
            parts.append(s.float().flatten() if s is not None else torch.zeros(self._view(self.owners, n).numel()))
        return torch.cat(parts) if parts else torch.zeros(0)

    def unit_cost(self) -> torch.Tensor:
        return torch.ones(self.num_units)

    def layout_key(self) -> str:
        return hashlib.sha256(repr(sorted(self.shapes.items())).encode()).hexdigest()[:32]

    def schema(self) -> dict:
        return {
            "granularity": self.granularity,
            "free": self.free,
            "dtype": str(self.owners.dtype).removeprefix("torch."),
            "fingerprint": self.layout_key(),
            "num_units": self.num_units,
            "tensors": [{"name": n, "shape": list(self.shapes[n]), "offset": self.offsets[n]} for n in self.names],
        }


MASK_SPACES: Registry = Registry("mask granularity")
MASK_SPACES.register("unit", UnitSpace, help="structured units from the structure walk (physically removable)")
MASK_SPACES.register("element", ElementSpace, help="one owner per weight element (unstructured)")
