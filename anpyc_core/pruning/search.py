"""The cheap search: rank keep-ratios without retraining, retrain once, let a statistical guard decide.

After a task trains on everything it claimed, it should keep the least that costs it no accuracy, within its
capacity budget (:mod:`~anpyc.pruning.plan`). Finding that by pruning in steps and retraining after each (the
``guarded`` strategy) costs several times the task's training. This strategy spends about one retrain instead:

1. **Rank without retraining.** One importance pass scores the claimed units. For a ladder of keep fractions (the
   budget, then ``prune.ladder.ratio`` times smaller each rung, down to ``prune.ladder.min_keep``), the units
   outside the keep set are masked and the model is evaluated on the validation set as it is (BatchNorm statistics
   recalibrated on a few training batches first): a forward pass each, no training. The smallest fraction whose
   drop the guard accepts at ``prune.ladder.tolerance`` (a looser tolerance: retraining recovers part of it) is the
   first candidate.
2. **Retrain once, guarded.** The task is pruned to the candidate and retrained for at most
   ``prune.retrain_epochs``, with its kept weights pulled toward their unpruned values by their importance
   (``consolidation.pull``: the confrontation of pruning and consolidation); after every epoch the guard
   (:mod:`~anpyc.pruning.guard`) compares the validation predictions with the unpruned model's, and retraining
   stops as soon as it accepts.
3. **Back off, at most ``prune.ladder.max_tries`` times.** A rejected candidate is rolled back and the next one is
   half way (in rungs) to the budget. The budget itself is always kept when it is reached (the plan wins over a
   task that cannot keep its accuracy in its share; growth, when enabled, is where that task gets more).

The state dict (in every checkpoint) holds the ladder, the no-retrain drops and the candidate being tried, so an
interrupted search resumes at the try it was on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import PruneConfig
from .base import Ownership, PruneState, Strategy, Training, register
from .guard import judge
from .plan import keep_set, ladder

__all__ = ["Search", "SearchState"]


def _keep(own: Ownership, scores: torch.Tensor, fraction: float, cap: torch.Tensor) -> torch.Tensor:
    """The keep set at ``fraction`` of the claim: the most important claimed units within the per-group caps."""
    claim = own.claim()
    groups, num_groups = own.unit_groups()
    count = max(1, int(round(fraction * int(claim.sum()))))
    return keep_set(scores, claim, groups, num_groups, cap, count, own.needed())


@dataclass
class SearchState(PruneState):
    """The ``ladder`` of keep fractions, the no-retrain drops measured on it, the rung being tried (``choice``) and
    the tries so far."""

    ladder: list[float] | None = None
    search_drops: list[float] = field(default_factory=list)
    choice: int = 0
    tries: int = 0


@register
class Search(Strategy):
    """Keep the smallest share of the claim (within the budget) the guard accepts, in about one retrain."""

    name = "search"
    state_type = SearchState

    def run(self, own: Ownership, training: Training, cfg: PruneConfig, state: SearchState, *,
            task_index: int) -> SearchState:
        claim = state.claim
        if claim == 0 or state.done:
            state.done = True
            return state
        cap, total = own.budget()
        before = training.val_correct()  # the model is unpruned whenever the loop (re)starts here
        scores = own.unit_scores()  # one importance pass on the unpruned model ranks every candidate and every try

        def verdict(tolerance: float):
            return judge(cfg.guard, before, training.val_correct(), tolerance, cfg.confidence)

        if state.ladder is None:
            top = min(1.0, total / claim, float(cap.sum()) / claim)
            fractions = ladder(top, min(cfg.ladder.min_keep, top), cfg.ladder.ratio)
            drops, choice = [], len(fractions) - 1
            for i, f in enumerate(fractions):  # ascending: the first accepted one is the smallest
                snap = own.snapshot()
                own.release(own.claim() & ~_keep(own, scores, f, cap))
                training.recalibrate()
                v = verdict(cfg.ladder.tolerance)
                own.restore(snap)
                drops.append(round(v.drop, 6))
                if v.accepted:
                    choice = i
                    break
            state.ladder, state.search_drops, state.choice, state.tries = fractions, drops, choice, 0
            training.checkpoint(state)
        while not state.done:
            fractions = state.ladder
            last = len(fractions) - 1
            i = state.choice if state.tries + 1 < cfg.ladder.max_tries else last
            snap = own.snapshot()
            released = own.claim() & ~_keep(own, scores, fractions[i], cap)
            own.release(released)
            epochs = training.retrain_until(state.taken, lambda: verdict(cfg.tolerance).accepted, snap)
            v = verdict(cfg.tolerance)
            kept = v.accepted or i == last  # the budget is kept even when the guard rejects it
            decision = "accepted" if v.accepted else ("budget" if i == last else "rolled back")
            if kept:
                state.released = int(released.sum())
                state.done = True
            else:
                own.restore(snap)
                state.choice = i + max(1, (last - i + 1) // 2)  # half way (in rungs) to the budget
                state.tries += 1
            acc = float(before.float().mean()) - v.drop
            state.record(training, {"released": int(released.sum()), "val_acc": acc, "accepted": kept,
                                    "keep": fractions[i], "decision": decision, "epochs": epochs, **v.as_dict()},
                         val_acc=acc, accepted=kept)
            training.checkpoint(state)
        return state
