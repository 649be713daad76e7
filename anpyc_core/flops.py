"""Parameter and FLOP counts of a (sub)network, with torch's own FlopCounterMode."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_params"]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs (multiply and add counted separately, as FlopCounterMode does) of one forward on ``example``."""
    was = module.training
    module.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            module(example)
        return int(counter.get_total_flops())
    finally:
        module.train(was)
