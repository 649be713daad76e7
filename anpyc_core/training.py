"""Training and evaluation loops (the learner decides *what* to train; these decide nothing).

Randomness is derived from ``(seed, task, phase, step, epoch)`` at the start of every epoch, so an epoch
replayed after a resume sees exactly the same batches and dropout masks as it did the first time.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .config import OptimConfig
from .consolidation import Consolidation
from .dist import DistContext
from .errors import TrainingDiverged
from .importance import Importance

__all__ = ["derive_seed", "make_loader", "make_optimizer", "train_epoch", "evaluate", "EpochResult", "take_batches"]


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (task id, phase name, epoch, ...)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, ctx: DistContext | None = None,
                drop_last: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    if ctx is not None and ctx.enabled:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                                     seed=seed, drop_last=drop_last)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last)


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of a phase. Weight decay is applied by the loop (only to elements no earlier task uses)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name in ("adam", "adamw"):
        return torch.optim.Adam(params, lr=cfg.lr)
    from .errors import ConfigError

    raise ConfigError(f"unknown optimizer {cfg.name!r}", "choose one of: sgd, adam, adamw")


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    penalty: float
    batches: int


def train_epoch(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    consolidation: Consolidation,
    tracker: Importance,
    cfg: OptimConfig,
    *,
    decay_mask: dict[str, torch.Tensor] | None = None,
    device: torch.device,
    on_batch: Callable[[int, float], None] | None = None,
) -> EpochResult:
    """One epoch. ``forward(x, batch)`` returns logits for the inputs' tasks; batches are ``(x, y)`` or
    ``(x, y, task)``."""
    total_loss = total_pen = 0.0
    correct = seen = 0
    n = 0
    trainable = [p for p in optimizer.param_groups[0]["params"]]
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        logits = forward(x, batch)
        loss = F.cross_entropy(logits, y)
        pen = consolidation.penalty(params)
        full = loss + pen if pen is not None else loss
        if not torch.isfinite(full):
            raise TrainingDiverged(f"the loss became {float(full)} (not finite) at batch {n}",
                                   "lower the learning rate (--lr) or the consolidation strength; the last good "
                                   "state is kept in the run directory")
        optimizer.zero_grad(set_to_none=True)
        full.backward()
        tracker.after_backward(params)
        consolidation.gate(params)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        if cfg.weight_decay > 0 and decay_mask is not None:
            with torch.no_grad():
                factor = cfg.lr * cfg.weight_decay
                for name, m in decay_mask.items():
                    params[name].sub_(params[name] * m, alpha=factor)
        consolidation.after_step(params)
        tracker.after_step(params)
        total_loss += float(loss.detach())
        total_pen += float(pen.detach()) if pen is not None else 0.0
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += int(y.numel())
        n += 1
        if on_batch is not None:
            on_batch(n, float(loss.detach()))
    return EpochResult(total_loss / max(n, 1), correct / max(seen, 1), total_pen / max(n, 1), n)


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int,
             device: torch.device) -> float:
    """Top-1 accuracy of ``forward`` on ``dataset`` (NaN for an empty dataset)."""
    if dataset is None or len(dataset) == 0:
        return math.nan
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct = total = 0
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        correct += int((forward(x).argmax(1) == y).sum())
        total += int(y.numel())
    return correct / total


def take_batches(dataset: Dataset, batch_size: int, max_batches: int, seed: int, device: torch.device
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_batches`` shuffled batches (0 = all) for importance estimation."""
    loader = make_loader(dataset, batch_size, shuffle=True, seed=seed)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        yield batch[0].to(device), batch[1].to(device)
