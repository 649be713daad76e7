"""Batches for the loops: built in the training process, or by torch DataLoader worker processes.

A :class:`~anpyc.training.BatchPlan` fixes every batch of an epoch (its indices, its loss weight and, through the
plan's seed and the batch's position, the random state its samples are transformed under). :class:`Loaders` hands
the loops an iterable of ``(batch, weight)`` for a plan:

* in the training process (``workers == 0``, or a dataset held in memory: decoding is done, a worker would only copy
  tensors across processes), exactly as :class:`BatchPlan` iterates;
* from a torch ``DataLoader`` with ``workers`` worker processes, fed by :class:`PlanSampler`, which yields the plan's
  batches in order, so each batch is built from the same indices under the same seed as in the training process.
  The determinism, the resume position (an epoch replayed after a crash sees the same batches) and the torchrun
  sharding (already in the plan) do not depend on the number of workers. Workers are persistent (one pool per
  dataset, kept across epochs and phases), prefetch ``prefetch`` batches each and, on CUDA, batches are pinned.

The DataLoader is torch's own: its worker pool, prefetching, pinning and dead-worker detection are the ones every
torch user relies on; this module adds only the batch order, the per-batch seeds and the error translation. A
:class:`~anpyc.errors.AnpycError` raised while a worker builds a batch (a file that fails to decode) comes back as
the same one-line error the training process would raise; a worker that dies (killed, out of memory) ends the run
with one line naming it, not a hung loader.

Every batch ``b`` of a plan with seed ``s`` is built under ``torch``, ``random`` and ``numpy`` seeded from
``(s, "batch", b)`` (in the training process inside a forked RNG state, so augmentation never draws from the
stream the model's dropout uses).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from .errors import AnpycError, DataError

__all__ = ["default_workers", "resolve_workers", "in_memory", "collate_batch", "PlanSampler", "Feed", "Loaders"]

MAX_DEFAULT_WORKERS = 8


def default_workers(local_world: int = 1) -> int:
    """Worker processes per training process when none are asked for: one core per process stays with the training
    loop, the rest decode (at most 8); none on a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(MAX_DEFAULT_WORKERS, cores // max(1, local_world) - 1))


def resolve_workers(workers: int) -> int:
    """``config.workers`` as a count: -1 = :func:`default_workers` (shared among the local torchrun processes)."""
    if workers >= 0:
        return workers
    return default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def in_memory(dataset: Dataset) -> bool:
    """Whether ``dataset`` holds its samples in memory (workers would gain nothing): tensor datasets, datasets that
    say so (an ``in_memory`` attribute, e.g. a cached image folder), and concatenations/subsets of them. A dataset
    that says nothing is taken to decode per item."""
    flag = getattr(dataset, "in_memory", None)
    if flag is not None:
        return bool(flag)
    if isinstance(dataset, TensorDataset):
        return True
    if isinstance(dataset, ConcatDataset):
        return all(in_memory(d) for d in dataset.datasets)
    inner = getattr(dataset, "dataset", None) if isinstance(dataset, Subset) else getattr(dataset, "ds", None)
    return inner is not None and in_memory(inner)


def _batch_seed(seed: int, b: int) -> int:
    return int(hashlib.sha256(f"{seed}/batch/{b}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _seed_all(s: int) -> None:
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


@contextlib.contextmanager
def _forked_rng() -> Iterator[None]:
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def collate_batch(dataset: Dataset, idx: Sequence[int], seed: int | None, b: int) -> Any:
    """Batch ``b`` of a plan with seed ``seed``: ``dataset[i]`` for ``i`` in ``idx``, collated, built under the
    batch's seed (the training process's random state is left as it was)."""
    if seed is None:
        return default_collate([dataset[i] for i in idx])
    with _forked_rng():
        _seed_all(_batch_seed(seed, b))
        return default_collate([dataset[i] for i in idx])


class PlanSampler(Sampler):
    """The batch keys of the current plan, in order: ``(seed, position, indices, weight)``. The loaders keep one
    sampler per dataset and point it at each epoch's plan (the sampler runs in the training process)."""

    def __init__(self) -> None:
        self.plan: Any = None

    def __iter__(self):
        for b, (idx, weight) in enumerate(self.plan.batches):
            yield self.plan.seed, b, idx, weight

    def __len__(self) -> int:
        return len(self.plan.batches) if self.plan is not None else 0


class _Failure:
    """An :class:`AnpycError` raised in a worker, sent back as a value (re-raised as itself in the main process;
    torch would wrap it in a multi-line traceback)."""

    def __init__(self, error: AnpycError):
        self.cls, self.problem, self.fix = type(error), error.problem, error.fix


class _Batches(Dataset):
    """What the workers index: a batch key in, a collated batch (and its weight) out."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        seed, b, idx, weight = key
        try:
            if seed is not None:
                _seed_all(_batch_seed(seed, b))  # a worker's random state belongs to the batch it builds
            return default_collate([self.dataset[i] for i in idx]), weight
        except AnpycError as e:
            return _Failure(e)


def _worker_init(_: int) -> None:
    """Die with the training process (Linux): a killed run leaves no worker behind holding its files or lock."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


def _dead_worker(error: RuntimeError) -> bool:
    text = str(error)
    return "DataLoader worker" in text and ("exited unexpectedly" in text or "killed" in text)


class Feed:
    """One pass over a plan's batches, ``(batch, weight)``; ``wait`` is the time (s) spent waiting for batches
    (building them, in the training process; the workers' lag behind the loop, with workers)."""

    def __init__(self, plan: Any, loader: DataLoader | None, owner: "Loaders | None" = None):
        self.plan, self.loader, self.owner = plan, loader, owner
        self.wait = 0.0

    def __len__(self) -> int:
        return len(self.plan)

    def _source(self) -> Iterable:
        if self.loader is None:
            for b, (idx, weight) in enumerate(self.plan.batches):
                yield collate_batch(self.plan.dataset, idx, self.plan.seed, b), weight
        else:
            yield from self.loader

    def __iter__(self):
        it = iter(self._source())
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.wait += time.perf_counter() - t0
                return
            except RuntimeError as e:
                if self.loader is None or not _dead_worker(e):
                    raise
                if self.owner is not None:
                    self.owner.drop(self.plan.dataset)
                line = " ".join(str(e).split())
                raise DataError(f"a data-loading worker process died ({line})",
                                "it was killed from outside or ran out of memory: lower --workers (config key "
                                "workers), or load in the training process with --workers 0") from None
            self.wait += time.perf_counter() - t0
            if isinstance(item, _Failure):
                raise item.cls(item.problem, item.fix)
            yield item


class Loaders:
    """The batch sources of one learner: in-process, or one persistent DataLoader per dataset (at most
    ``keep`` pools alive: the training set, validation and test sets of the task at hand)."""

    def __init__(self, workers: int, device: torch.device, *, prefetch: int = 2, keep: int = 3):
        self.workers, self.device, self.prefetch, self.keep = workers, device, prefetch, keep
        self._pools: OrderedDict[int, tuple[Dataset, DataLoader, PlanSampler]] = OrderedDict()

    def uses_workers(self, dataset: Dataset) -> bool:
        return self.workers > 0 and not in_memory(dataset)

    def feed(self, plan: Any) -> Feed:
        """The batches of ``plan`` (a :class:`~anpyc.training.BatchPlan`)."""
        if not self.uses_workers(plan.dataset) or len(plan.batches) == 0:
            return Feed(plan, None)
        key = id(plan.dataset)
        if key not in self._pools:
            while len(self._pools) >= self.keep:
                self._shutdown(self._pools.popitem(last=False)[1])
            sampler = PlanSampler()
            loader = DataLoader(_Batches(plan.dataset), batch_size=None, sampler=sampler, num_workers=self.workers,
                                collate_fn=_identity, pin_memory=self.device.type == "cuda", persistent_workers=True,
                                prefetch_factor=self.prefetch, worker_init_fn=_worker_init)
            self._pools[key] = (plan.dataset, loader, sampler)
        self._pools.move_to_end(key)
        _, loader, sampler = self._pools[key]
        sampler.plan = plan
        return Feed(plan, loader, self)

    def drop(self, dataset: Dataset) -> None:
        pool = self._pools.pop(id(dataset), None)
        if pool is not None:
            self._shutdown(pool)

    @staticmethod
    def _shutdown(pool: tuple) -> None:
        it = getattr(pool[1], "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        pool[1]._iterator = None

    def close(self) -> None:
        """Stop every worker process."""
        while self._pools:
            self._shutdown(self._pools.popitem()[1])


def _identity(x: Any) -> Any:
    return x
