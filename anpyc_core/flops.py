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
    """FLOPs (multiply and add counted separately, as FlopCounterMode does) of one forward on ``example``.

    Parameters are counted with ``requires_grad`` off: FlopCounterMode's module tracker hooks the gradient of every
    module input that requires one, and a parameter passed to a submodule as an input (CaiT's class token, expanded
    under ``no_grad``) has neither a gradient function nor an accumulator to hook."""
    was = module.training
    grads = {p: p.requires_grad for p in module.parameters()}
    module.eval()
    try:
        for p in grads:
            p.requires_grad_(False)
        counter = FlopCounterMode(display=False)
        with counter:
            module(example)
        return int(counter.get_total_flops())
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        module.train(was)
