"""Process-group plumbing: one code path for a single process and for ``torchrun`` (DDP).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`context` initialises the default process
group (gloo on CPU, nccl on CUDA), shards data with a ``DistributedSampler``, averages gradients with DDP and
importance statistics with all-reduce (so every rank takes the same pruning decisions), and only rank 0
writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

__all__ = ["DistContext", "context", "check_device", "wrap_ddp"]

from .errors import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
            tensor.div_(self.world_size)
        return tensor

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.enabled:
            tdist.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def device(self, requested: str) -> torch.device:
        if requested.startswith("cuda") and self.enabled:
            return torch.device("cuda", self.local_rank)
        return torch.device(requested)


_CONTEXT: DistContext | None = None


def context(device: str = "cpu") -> DistContext:
    """The process group of this process, initialised on first use when launched by torchrun."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    _CONTEXT = DistContext(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=local,
                           backend=backend)
    return _CONTEXT


def check_device(device: str) -> None:
    """A device torch can use here; otherwise a one-line ConfigError instead of a late traceback."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for, but torch sees no CUDA GPU here",
                          "use --device cpu (config: device = 'cpu')")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist ({torch.cuda.device_count()} GPU(s))", "use cuda:0")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for, but torch sees no Apple GPU here",
                          "use --device cpu (config: device = 'cpu')")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r} is not supported", "use cpu, cuda, cuda:N or mps")


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, device: torch.device):
    """DistributedDataParallel over ``model`` under torchrun (None in a single process)."""
    if not ctx.enabled:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False)

