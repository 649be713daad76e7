"""The guard: accept or roll back a prune step by what it did to the task's validation predictions.

A prune decision is a statistical decision: on ``n`` validation samples one sample is ``1/n`` of accuracy, and two
retrained models differ by a few samples for no reason but chance. The unpruned model's per-sample correctness is
kept, and a pruned model is compared with it *sample by sample*: of the ``n`` samples, ``lost`` were right before and
are wrong now, ``gained`` the other way round. The accuracy drop is ``(lost - gained) / n``; its standard error
comes from the discordant pairs only, ``sqrt(lost + gained - (lost - gained)^2 / n) / n`` (the paired difference of
two proportions, as in McNemar's test), which is far smaller than the spread of two independent accuracies because
the samples both models get right (or wrong) do not count.

Rules (a registry, ``prune.guard``):

* ``paired`` (default): accept when the drop is within the tolerance *with confidence*: ``drop + z * se <= tol``
  (``z`` = ``prune.confidence``; at least one discordant sample is assumed, so a tiny validation set cannot prove
  anything finer than ``z / n``). On a small validation set the task keeps more units rather than risk accuracy it
  cannot measure; its capacity budget (:mod:`anpyc.pruning.plan`) bounds what it can keep.
* ``plain``: the earlier rule, ``acc >= a0 - max(tol, 1/n)`` on the accuracies alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..registry import Registry

__all__ = ["GUARDS", "Verdict", "judge"]

GUARDS: Registry = Registry("prune guard")


@dataclass(frozen=True)
class Verdict:
    """A guard's decision on one pruned model, with everything it was decided on (logged with the prune step)."""

    accepted: bool
    rule: str
    n: int  # validation samples
    lost: int  # right before pruning, wrong after
    gained: int  # wrong before, right after
    drop: float  # accuracy drop (lost - gained) / n
    se: float  # standard error of the drop (paired)
    bound: float  # what was compared with the tolerance
    tolerance: float

    def as_dict(self) -> dict:
        """The verdict as event fields: ``guard_accepted``, ``guard_rule``, ``guard_n``, ..."""
        return {f"guard_{k}": v for k, v in asdict(self).items()}


def _counts(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int, int]:
    if before.shape != after.shape:
        raise ValueError(f"the guard compares predictions of the same samples, got {tuple(before.shape)} and "
                         f"{tuple(after.shape)}")
    before, after = before.bool(), after.bool()
    return int(before.numel()), int((before & ~after).sum()), int((~before & after).sum())


def paired_se(n: int, lost: int, gained: int) -> float:
    """Standard error of the paired accuracy difference, with at least one discordant sample."""
    if n <= 0:
        return math.inf
    var = max(lost + gained - (lost - gained) ** 2 / n, 1.0)
    return math.sqrt(var) / n


@GUARDS.register("paired", help="drop + z * paired standard error <= tolerance (per-sample comparison)")
def paired(before: torch.Tensor, after: torch.Tensor, tolerance: float, confidence: float) -> Verdict:
    n, lost, gained = _counts(before, after)
    drop = (lost - gained) / n if n else math.inf
    se = paired_se(n, lost, gained)
    bound = drop + confidence * se
    return Verdict(bound <= tolerance + 1e-12, "paired", n, lost, gained, drop, se, bound, tolerance)


@GUARDS.register("plain", help="accuracy drop <= max(tolerance, 1/n) (accuracies alone)")
def plain(before: torch.Tensor, after: torch.Tensor, tolerance: float, confidence: float) -> Verdict:
    n, lost, gained = _counts(before, after)
    drop = (lost - gained) / n if n else math.inf
    tol = max(tolerance, 1.0 / max(n, 1) + 1e-9)
    return Verdict(drop <= tol, "plain", n, lost, gained, drop, paired_se(n, lost, gained), drop, tol)


def judge(rule: str, before: torch.Tensor, after: torch.Tensor, tolerance: float, confidence: float) -> Verdict:
    """The verdict of guard ``rule`` on the per-sample correctness ``before`` and ``after`` a prune step."""
    return GUARDS.get(rule)(before, after, tolerance, confidence)
