"""The adversarial prune-retrain loop (docs/method.md, section 4).

After a task trains, its claim (the units it took from the free pool) is shrunk: importance is recomputed on the
task, the least important part of the claim is released back to the free pool, and the network retrains under
consolidation. :mod:`~anpyc.pruning.base` holds the registry and the host protocol, :mod:`~anpyc.pruning.search`
the default strategy (cheap ranking, one guarded retrain), :mod:`~anpyc.pruning.strategies` the step-wise and
scheduled ones, :mod:`~anpyc.pruning.guard` the statistical accept/roll-back rule, :mod:`~anpyc.pruning.plan`
capacity planning, :mod:`~anpyc.pruning.host` the learner's side of the protocol.
"""

from .base import PRUNING, PruneHost, initial_state, select_release, tolerance
from .gradual import prune_gradual
from .guard import GUARDS, Verdict, judge
from .search import prune_search
from .strategies import prune_guarded, prune_none, prune_schedule

__all__ = ["PRUNING", "GUARDS", "PruneHost", "Verdict", "judge", "select_release", "tolerance", "initial_state",
           "prune_gradual", "prune_guarded", "prune_none", "prune_schedule", "prune_search"]
