"""Pruning: how a task's claim shrinks to what it keeps (docs/method.md, section 4).

A task claims every free unit when it starts; a strategy decides which of them it keeps and releases the rest to the
free pool, for later tasks. :mod:`~anpyc.pruning.base` holds the registry, the strategies' typed state and the two
views of a task they run on; :mod:`~anpyc.pruning.gradual` the default (pruning inside the task's epochs, then a
guarded release), :mod:`~anpyc.pruning.search` the cheap search (ranking without retraining, one guarded retrain),
:mod:`~anpyc.pruning.strategies` the step-wise and scheduled ones; :mod:`~anpyc.pruning.guard` the statistical
accept/roll-back rule, :mod:`~anpyc.pruning.plan` capacity planning, :mod:`~anpyc.pruning.host` the learner's side.
"""

from . import gradual, search, strategies  # noqa: F401  (each registers its strategies)
from .base import PRUNING, Ownership, PruneHost, PruneState, Strategy, Training, select_release, tolerance
from .guard import GUARDS, Verdict, judge

__all__ = ["PRUNING", "GUARDS", "Strategy", "PruneState", "Ownership", "Training", "PruneHost", "Verdict", "judge",
           "select_release", "tolerance"]
