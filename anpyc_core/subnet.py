"""A task's standalone subnetwork: the physically pruned trunk (or the masked one, for element masks) with the
task's head and statistics, and what it costs in parameters and FLOPs."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .flops import count_flops, count_params
from .structure.masked import MaskedModel
from .masks import MaskSpace

__all__ = ["TaskModel", "standalone", "measure"]


class TaskModel(nn.Module):
    """A standalone task model: the physically pruned trunk followed by the task's head."""

    def __init__(self, trunk: nn.Module, head: nn.Linear):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _copies(model: MaskedModel, k: int) -> tuple[nn.Module, nn.Linear]:
    """CPU copies of the trunk (without the masked model's hooks) and of task index ``k``'s head."""
    trunk = model.strip_hooks(copy.deepcopy(model.trunk)).cpu().eval()
    return trunk, copy.deepcopy(model.heads[str(k)]).cpu()


def standalone(model: MaskedModel, space: MaskSpace, k: int, stats: dict[str, torch.Tensor], *,
               mask: int | None = None) -> TaskModel:
    """Task index ``k``'s model: units outside its mask (task index ``mask``'s, by default its own) removed, its
    head and statistics loaded, no masks left inside (eval mode, on the CPU)."""
    trunk, head = _copies(model, k)
    with torch.no_grad():
        for name, value in stats.items():
            mod, _, buf = name.rpartition(".")
            getattr(trunk.get_submodule(mod), buf).copy_(value.cpu())
    trunk, head = space.extract(trunk, head, space.active(k if mask is None else mask))
    return TaskModel(trunk, head).eval()


def measure(model: MaskedModel, space: MaskSpace, k: int, stats: dict[str, torch.Tensor], example: torch.Tensor
            ) -> dict[str, int]:
    """Parameters and FLOPs of task index ``k``'s subnetwork and of the dense model, on one ``example`` input."""
    example = example[:1].cpu()
    dense = TaskModel(*_copies(model, k))
    dense_params = count_params(dense)
    dense_flops = count_flops(dense, example)
    params, flops = space.cost(lambda: standalone(model, space, k, stats), dense, space.active(k), example,
                               dense_flops)
    return {"params": int(params), "flops": int(flops), "dense_params": int(dense_params),
            "dense_flops": int(dense_flops)}
