"""Training and evaluation loops (the learner decides *what* to train; these decide nothing).

Randomness is derived from ``(seed, task, phase, step, epoch)`` at the start of every epoch, so an epoch
replayed after a resume sees exactly the same batches and dropout masks as it did the first time.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset

from .config import OptimConfig
from .consolidation import Consolidation
from .dist import DistContext
from .errors import TrainingDiverged
from .registry import Registry

if TYPE_CHECKING:  # the measure's hooks are called, never imported: importance imports this module's batches
    from .importance import Importance

__all__ = ["derive_seed", "BatchPlan", "make_loader", "make_optimizer", "OPTIMIZERS", "OptimizerRule", "train_epoch",
           "evaluate", "correctness", "EpochResult", "take_batches", "tagged_concat"]


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (task id, phase name, epoch, ...)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class BatchPlan:
    """The batches of one epoch for this process: ``(indices, weight)`` pairs.

    Batches are cut from one global permutation of ``dataset``; under torchrun each rank takes its interleaved
    share of every global batch, and ``weight`` = ``local_size * world / global_size`` rescales the rank's mean
    loss so that DDP's gradient average equals the gradient of the global batch's mean loss: a run on N processes
    follows the single-process trajectory. A rank whose share of a (short) last batch is empty computes one
    sample with weight 0, so it still joins the gradient all-reduce. Batch ``b`` is built under a seed derived
    from ``(seed, b)`` (:func:`anpyc.loading.collate_batch`), in this process or in a loader worker alike.
    """

    dataset: Dataset
    batches: tuple[tuple[tuple[int, ...], float], ...]
    seed: int | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        from .loading import collate_batch

        for b, (idx, weight) in enumerate(self.batches):
            yield collate_batch(self.dataset, idx, self.seed, b), weight


# what turns a plan into its batches (anpyc.loading.Loaders.feed); None: this process, batch by batch
Feeder = Callable[[BatchPlan], Iterable] | None


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, ctx: DistContext | None = None
                ) -> BatchPlan:
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None and ctx.enabled else (0, 1)
    batches = []
    for start in range(0, n, batch_size):
        glob = order[start: start + batch_size].tolist()
        mine = glob[rank::world]
        batches.append((tuple(mine), len(mine) * world / len(glob)) if mine else ((glob[0],), 0.0))
    return BatchPlan(dataset, tuple(batches), seed)


@dataclass(frozen=True)
class OptimizerRule:
    """How one optimiser name is built, and how weight decay is applied with it.

    The loop applies weight decay itself, only to elements no earlier task uses (an earlier task's weights must not
    shrink): ``decoupled`` rules (AdamW) shrink the weights after the step, ``theta -= lr * wd * theta``; the others
    (SGD, Adam) add the L2 gradient ``wd * theta`` before it, as torch's own ``weight_decay`` would.
    """

    build: Callable[[list[torch.nn.Parameter], OptimConfig], torch.optim.Optimizer]
    decoupled: bool = False


OPTIMIZERS: Registry = Registry("optimizer")
OPTIMIZERS.register("sgd", OptimizerRule(lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum)),
                    help="SGD (optim.momentum), L2 weight decay")
OPTIMIZERS.register("adam", OptimizerRule(lambda p, c: torch.optim.Adam(p, lr=c.lr)), help="Adam, L2 weight decay")
OPTIMIZERS.register("adamw", OptimizerRule(lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=0.0),
                                           decoupled=True), help="AdamW, decoupled weight decay")


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of a phase (:data:`OPTIMIZERS`). Weight decay is applied by the loop (see :class:`OptimizerRule`)."""
    return OPTIMIZERS.get(cfg.name).build(params, cfg)


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    penalty: float
    batches: int
    seconds: float = 0.0  # the epoch's wall time
    data_wait: float = 0.0  # of which the loop waited for batches


def train_epoch(
    forward: Callable[[torch.Tensor, tuple], torch.Tensor],
    loader: BatchPlan,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    consolidation: Consolidation,
    tracker: Importance,
    cfg: OptimConfig,
    *,
    decay_mask: dict[str, torch.Tensor] | None = None,
    device: torch.device,
    on_batch: Callable[[int, float], None] | None = None,
    policy=None,
) -> EpochResult:
    """One epoch. ``forward(x, batch)`` returns logits for the inputs' tasks; batches are ``(x, y)`` or
    ``(x, y, task)``; ``loader`` yields ``(batch, weight)`` (a :class:`BatchPlan` or an
    :class:`anpyc.loading.Feed`, whose ``wait`` is the time spent waiting for batches); ``policy``: the
    :class:`anpyc.precision.Policy` (autocast, loss scaling, layout)."""
    from .precision import Policy

    policy = policy or Policy(device=device)
    scaler = policy.scaler()
    t0 = time.perf_counter()
    total_loss = total_pen = 0.0
    correct = seen = 0
    n = 0
    trainable = [p for p in optimizer.param_groups[0]["params"]]
    decay = cfg.weight_decay > 0 and decay_mask is not None
    decoupled = OPTIMIZERS.get(cfg.name).decoupled
    for batch, weight in loader:
        x, y = policy.inputs(batch[0].to(device, non_blocking=True)), batch[1].to(device, non_blocking=True)
        with policy.autocast():
            logits = forward(x, batch).float()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
            from .errors import DataError

            raise DataError(f"a training label is outside the task's class range 0..{logits.shape[1] - 1} "
                            f"(got {int(y.min())}..{int(y.max())})", "labels must index the task's classes")
        loss = F.cross_entropy(logits, y)
        pen = consolidation.penalty(params)
        full = loss * weight if weight != 1.0 else loss
        full = full + pen if pen is not None else full
        if not torch.isfinite(full):
            raise TrainingDiverged(f"the loss became {float(full.detach())} (not finite) at batch {n}; the last good state is "
                                   "kept", "lower the learning rate (--lr) or the consolidation strength")
        optimizer.zero_grad(set_to_none=True)
        scaler.backward(full)
        scaler.unscale(optimizer)
        tracker.after_backward(params)
        consolidation.gate(params)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        if decay and not decoupled:
            with torch.no_grad():
                for name, m in decay_mask.items():
                    g = params[name].grad
                    if g is not None:
                        g.add_(params[name] * m, alpha=cfg.weight_decay)
        scaler.step(optimizer)
        if decay and decoupled:
            with torch.no_grad():
                for name, m in decay_mask.items():
                    params[name].sub_(params[name] * m, alpha=cfg.lr * cfg.weight_decay)
        consolidation.after_step(params)
        tracker.after_step(params)
        if weight > 0:
            total_loss += float(loss.detach())
            total_pen += float(pen.detach()) if pen is not None else 0.0
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += int(y.numel())
        n += 1
        if on_batch is not None:
            on_batch(n, float(loss.detach()))
    consolidation.end_epoch(params)
    return EpochResult(total_loss / max(n, 1), correct / max(seen, 1), total_pen / max(n, 1), n,
                       time.perf_counter() - t0, float(getattr(loader, "wait", 0.0)))


EVAL_BATCH_BYTES = 256 * 1024 * 1024


@torch.no_grad()
def correctness(forward: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int,
                device: torch.device, feed: Feeder = None) -> torch.Tensor:
    """Whether ``forward``'s top-1 prediction is right, per sample of ``dataset`` in order (a bool vector on the
    CPU): what the prune guard compares before and after a prune step. A batch holds at most
    :data:`EVAL_BATCH_BYTES` of inputs (an input spec of huge images evaluates a few at a time; the results are the
    same, each sample's prediction does not depend on its batch in eval mode)."""
    if len(dataset):
        sample = dataset[0][0]
        per = int(sample.numel()) * 4 if isinstance(sample, torch.Tensor) else 0
        batch_size = max(1, min(batch_size, EVAL_BATCH_BYTES // per)) if per else batch_size
    plan = make_loader(dataset, batch_size, shuffle=False, seed=0)
    parts = [(forward(b[0].to(device)).argmax(1) == b[1].to(device)).cpu() for b, _ in (feed or iter)(plan)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int,
             device: torch.device, feed: Feeder = None) -> float:
    """Top-1 accuracy of ``forward`` on ``dataset`` (NaN for an empty dataset)."""
    if dataset is None or len(dataset) == 0:
        return math.nan
    right = correctness(forward, dataset, batch_size, device, feed)
    return int(right.sum()) / int(right.numel())


def take_batches(dataset: Dataset, batch_size: int, max_batches: int, seed: int, device: torch.device,
                 ctx: DistContext | None = None, feed: Feeder = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_batches`` shuffled batches (0 = all) for importance estimation; under torchrun each rank takes
    every world-th batch (the caller averages the scores across ranks)."""
    plan = make_loader(dataset, batch_size, shuffle=True, seed=seed)
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None and ctx.enabled else (0, 1)
    batches = plan.batches[:max_batches] if max_batches else plan.batches
    mine = BatchPlan(dataset, tuple(b for i, b in enumerate(batches) if i % world == rank), seed)
    for batch, _ in (feed or iter)(mine):
        yield batch[0].to(device), batch[1].to(device)


class _Tagged(Dataset):
    def __init__(self, ds: Dataset, k: int):
        self.ds, self.k = ds, k

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i][:2]
        return x, y, self.k


def tagged_concat(datasets: list[tuple[int, Dataset]]) -> Dataset:
    """One dataset of every ``(task index, dataset)`` pair, each sample ``(x, y, task index)`` (joint training)."""
    return ConcatDataset([_Tagged(ds, k) for k, ds in datasets])

