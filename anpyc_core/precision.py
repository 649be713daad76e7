"""Numerics and memory layout of the loops: mixed precision (``amp``) and channels-last (``channels_last``).

Mixed precision is autocast only: the parameters, their gradients and the optimiser state stay float32 (master
weights), so the hard freeze zeroes float32 gradients and restores float32 values, and an earlier task's elements
stay bit-identical under any policy. Training, importance scoring, BatchNorm recalibration and evaluation all run
their forward passes under the run's policy (the numbers the prune guard compares are the numbers training sees);
the reference forward, the export and its parity check stay float32 in the default layout.

``fp16`` scales the loss (torch's ``GradScaler``): gradients are unscaled before anything reads them (importance
hooks, the consolidation gate, clipping), and a step whose gradients overflowed is skipped. The scaler starts afresh
every epoch (scale 2^10, doubling after 100 clean steps), so an epoch replayed after a resume takes the same steps.
``bf16`` has float32's range and needs no scaling (CPUs with AVX-512 BF16/AMX and Ampere+ GPUs run it natively).

``channels_last`` stores the trunk's 4-d weights and the image batches NHWC, the layout cuDNN's and oneDNN's fast
convolution kernels prefer; it changes the speed, not the function (parity-tested against the default layout).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import ConfigError
from .registry import Registry

__all__ = ["AMP", "Policy"]

AMP: Registry = Registry("mixed-precision mode")
AMP.register("none", torch.float32, help="float32 throughout (the default)")
AMP.register("bf16", torch.bfloat16, help="autocast to bfloat16 (float32 master weights, no loss scaling)")
AMP.register("fp16", torch.float16, help="autocast to float16 with loss scaling (float32 master weights)")

INIT_SCALE, GROWTH_INTERVAL = 2.0**10, 100


@dataclass(frozen=True)
class Policy:
    """The run's policy on ``device``: ``amp`` (a name of :data:`AMP`) and ``channels_last``."""

    amp: str = "none"
    channels_last: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype | None:
        dtype = AMP.get(self.amp)
        return None if dtype is torch.float32 else dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' context: autocast to the policy's dtype (a no-op for ``none``)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the policy's layout."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def wrap(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``forward`` under the policy, returning float32 logits (what losses, scores and argmax read)."""
        if self.dtype is None and not self.channels_last:
            return forward

        def run(x: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                out = forward(self.inputs(x))
            return out.float()

        return run

    def layout(self, trunk: nn.Module, model_name: str | None = None) -> None:
        """Put ``trunk``'s weights in the policy's layout (after building it, and after a growth widened some)."""
        if not self.channels_last:
            return
        if not any(isinstance(m, nn.Conv2d) for m in trunk.modules()):
            raise ConfigError(f"channels_last needs a convolutional backbone; {model_name or 'this model'} has no "
                              "2-d convolution", "drop --channels-last (config key channels_last)")
        trunk.to(memory_format=torch.channels_last)

    def scaler(self) -> "Scaler":
        """A fresh loss scaler for one epoch (a pass-through unless ``fp16``)."""
        return Scaler(self.device.type if self.amp == "fp16" else None)


class Scaler:
    """``GradScaler`` for fp16, a pass-through otherwise: ``backward``, ``unscale`` (before gradients are read),
    ``step`` (skipped on overflow)."""

    def __init__(self, device_type: str | None):
        self._s: Any = None if device_type is None else torch.amp.GradScaler(
            device_type, init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self._s is None else self._s.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self._s is not None:
            self._s.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._s is None:
            optimizer.step()
        else:
            self._s.step(optimizer)
            self._s.update()
