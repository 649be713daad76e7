"""FLOP and parameter counts of (sub)networks."""

from __future__ import annotations

import torch
import torch.nn as nn

from anpyc.flops import count_flops, count_params


class _TokenBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, token):
        return self.proj(token) + x.mean(1, keepdim=True)


class _ClassToken(nn.Module):
    """A learned token expanded and handed to a child module as an input (CaiT's class-attention blocks)."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = _TokenBlock(dim)

    def forward(self, x):
        return self.block(x, self.token.expand(x.shape[0], -1, -1)).flatten(1)


def test_flops_of_a_linear_stack():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    # FlopCounterMode counts 2 * in * out per sample for each matmul (bias adds not counted)
    assert count_flops(model, torch.zeros(5, 8)) == 5 * 2 * (8 * 16 + 16 * 3)
    assert count_params(model) == 8 * 16 + 16 + 16 * 3 + 3


def test_flops_with_a_parameter_passed_as_module_input():
    model = _ClassToken().train()
    assert count_flops(model, torch.zeros(2, 3, 4)) == 2 * 2 * 4 * 4
    # the model comes back as it was: training mode, every parameter still trainable
    assert model.training and all(p.requires_grad for p in model.parameters())
