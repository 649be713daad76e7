"""Gradual pruning inside the task's own training epochs: the default strategy.

A structured subnetwork recovers from pruning by training as the small network it becomes, and retraining after
the task's training is what made pruning cost several times the training. Here the task trains on its whole claim
for the first ``prune.gradual.warmup`` of its epochs, then its keep fraction falls along a cubic ramp (Zhu & Gupta's
gradual schedule) to its capacity budget (:mod:`~anpyc.pruning.plan`) over the next ``prune.gradual.ramp`` of them, one
importance pass and release at the start of each ramp epoch, and it trains the rest at its budget: the prune phase
costs a few importance passes and no extra epochs.

The guard (:mod:`~anpyc.pruning.guard`) then decides sample by sample:

* **at the budget**: whether the task kept its accuracy within its share, on the validation set against the model
  as it was before the ramp (the training samples are no evidence here: the ramp epochs fitted them); the verdict
  is logged (``within_budget``);
* **below the budget**: units beyond what the task needs go back to the free pool when releasing them costs no
  measurable accuracy as they are (no retraining): the smallest keep of a ladder under the budget
  (``prune.ladder.ratio`` per rung, down to ``prune.ladder.min_keep``) whose drop against the trained model the guard
  accepts at ``prune.tolerance``, found by bisection. Nothing is retrained after such a release, so training
  samples count as evidence of what it changed where the validation set is too small to decide: they top it up to
  ``prune.gradual.guard_samples``. On the 72 validation images of a split-digits task alone the paired guard cannot show
  any drop below 1.4%, and would keep the whole budget of every task.

BatchNorm statistics are re-estimated (:meth:`recalibrate`, a few training batches) before every measurement the
ramp and the guard take: the running averages of epochs in which the network changes fast describe none of the
networks they passed through, and a task measured with them can look near chance while it trains at 100%.

Everything the loop needs to resume (next epoch, the unpruned model's per-sample correctness, the ladder) is in the
state dict of every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import PruneConfig
from .base import Ownership, PruneState, Strategy, Training, register
from .guard import Verdict, judge
from .plan import keep_set, ladder

__all__ = ["Gradual", "GradualState", "ramp"]


def ramp(top: float, target: float, steps: int) -> list[float]:
    """Keep fractions after each of ``steps`` ramp epochs: cubic from ``top`` to ``target`` (fast first, then
    slow, so the network adapts while the cuts get finer)."""
    return [target + (top - target) * (1 - (p + 1) / steps) ** 3 for p in range(steps)]


def _pack(mask: torch.Tensor) -> str:
    return np.packbits(mask.numpy().astype(np.uint8)).tobytes().hex()


def _unpack(text: str, n: int) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))


def _keep(own: Ownership, scores: torch.Tensor, count: int, cap: torch.Tensor) -> torch.Tensor:
    groups, num_groups = own.unit_groups()
    return keep_set(scores, own.claim(), groups, num_groups, cap, count, own.needed())


@dataclass
class GradualState(PruneState):
    """Where the ramp stands: the next ``epoch``, the unpruned model's per-sample validation correctness (``c0``,
    packed bits of ``n_val`` samples) and the keep fraction after each ramp epoch (``schedule``)."""

    epoch: int | None = None
    c0: str = ""
    n_val: int = 0
    schedule: list[float] = field(default_factory=list)


def _smallest_unused(own: Ownership, training: Training, cfg: PruneConfig, trained: torch.Tensor,
                     rungs: list[float], claim: int, cap: torch.Tensor
                     ) -> tuple[float, int, Verdict, torch.Tensor] | None:
    """``(keep, released, verdict, correct)`` of the smallest rung the guard accepts against the trained task
    (``None``: no rung; ``correct``: the per-sample evidence at that rung), found by bisection. Fewer units never
    serve a task better, and each rung tried is one more chance for the guard to accept a loss it cannot see (a
    pass over every rung took the smallest of ten such chances). The task is left at the rung found."""
    scores = own.unit_scores()
    snap = own.snapshot()
    lo, hi, best, at = -1, len(rungs), None, None  # rungs[hi] is accepted (hi == len: the budget itself)

    def cut(i: int) -> tuple[int, Verdict, torch.Tensor]:
        own.restore(snap)
        release = own.claim() & ~_keep(own, scores, max(1, int(round(rungs[i] * claim))), cap)
        own.release(release)
        training.recalibrate()
        after = training.evidence_correct()
        return int(release.sum()), judge(cfg.guard, trained, after, cfg.tolerance, cfg.confidence), after

    while hi - lo > 1:
        mid = (lo + hi) // 2
        released, v, after = cut(mid)
        at = mid
        if v.accepted:
            hi, best = mid, (rungs[mid], released, v, after)
        else:
            lo = mid
    if best is None:
        own.restore(snap)
    elif at != hi:
        cut(hi)
    return best


@register
class Gradual(Strategy):
    """Prune along a cubic ramp inside the task's epochs to its budget, then release what the guard finds unused."""

    name = "gradual"
    state_type = GradualState

    def dense_epochs(self, cfg: PruneConfig, epochs: int) -> int:
        """The first ``prune.gradual.warmup`` of the epochs train on the whole claim; the rest are this strategy's."""
        return min(epochs, max(1, int(round(cfg.gradual.warmup * epochs))))

    def run(self, own: Ownership, training: Training, cfg: PruneConfig, state: GradualState, *,
            task_index: int) -> GradualState:
        epochs = training.epochs()
        dense = self.dense_epochs(cfg, epochs)
        steps = max(1, min(epochs - dense, int(round(cfg.gradual.ramp * epochs)))) if epochs > dense else 0
        claim = state.claim
        if state.epoch is None:
            cap, total = own.budget()
            training.recalibrate()  # running averages lag a network that is still learning fast: measure it as is
            before = training.val_correct()
            state.epoch, state.c0, state.n_val = dense, _pack(before), int(before.numel())
            state.schedule = [max(f, total / max(claim, 1)) for f in
                              ramp(1.0, total / max(claim, 1), steps)] if steps else []
        before = _unpack(state.c0, state.n_val)
        cap, total = own.budget()
        while state.epoch < epochs:
            e = state.epoch
            p = e - dense
            if 0 <= p < len(state.schedule) and claim:
                count = max(1, int(round(state.schedule[p] * claim)))
                kept = int(own.claim().sum())
                if count < kept:
                    training.recalibrate()  # the importance pass scores the network in eval mode, with these statistics
                    release = own.claim() & ~_keep(own, own.unit_scores(), count, cap)
                    own.release(release)
                    state.released += int(release.sum())
            training.train_epoch(e)
            state.epoch = e + 1
            if state.epoch < epochs:
                training.checkpoint(state)
        if state.done:
            return state
        kept = int(own.claim().sum())
        if claim and not state.schedule and total < kept:  # no epoch to ramp in (one-epoch tasks): the budget at once
            release = own.claim() & ~_keep(own, own.unit_scores(), total, cap)
            own.release(release)
            state.released += int(release.sum())
        # at the budget: did the task keep its accuracy within its share? Its BatchNorm statistics are re-estimated
        # first: the running averages of the ramp epochs mix the networks the ramp passed through
        training.recalibrate()
        at_val = training.val_correct()
        at_budget = judge(cfg.guard, before, at_val, cfg.tolerance, cfg.confidence)
        val_acc = float(before.float().mean()) - at_budget.drop
        state.record(training, {"released": state.released, "val_acc": val_acc, "accepted": True,
                                "decision": "budget", "keep": 1 - state.released / max(claim, 1),
                                "within_budget": at_budget.accepted, **at_budget.as_dict()},
                     val_acc=val_acc, accepted=True)
        # below the budget: what the task does not use, released without retraining when the guard sees no loss on
        # the validation and training samples
        trained = training.evidence_correct(at_val)  # the network the verdict measured: its validation part is known
        kept = int(own.claim().sum())
        if kept > 1 and cfg.ladder.min_keep * claim < kept:
            rungs = ladder(kept / claim * cfg.ladder.ratio, cfg.ladder.min_keep, cfg.ladder.ratio)
            found = _smallest_unused(own, training, cfg, trained, rungs, claim, cap)
            if found is not None:
                f, released, v, after = found
                state.released += released
                state.record(training, {"released": released, "accepted": True, "decision": "unused", "keep": f,
                                        "evidence_val": state.n_val, "evidence_train": v.n - state.n_val,
                                        **v.as_dict()},
                             val_acc=float(after[:state.n_val].float().mean()), accepted=True)
        state.done = True
        training.checkpoint(state)
        return state
