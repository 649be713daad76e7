"""Building a config for use: a preset with overrides (:func:`method_config`), a config read back from a run or a
file (:func:`load_config`), and the check every value that names a registered part passes (:func:`check_choices`).

:mod:`anpyc.config` holds the dataclasses and checks numbers and types; it imports nothing of the engine, so every
part can import it. This module sits above the registries: each key below is checked against the registry that
implements it, so a typo fails at once with the valid choices instead of deep in a run.
"""

from __future__ import annotations

from typing import Any, Callable

from .config import LearnerConfig, _choice, from_dict, override
from .consolidation import ACCUMULATE, CONSOLIDATION
from .importance import IMPORTANCE
from .masks import MASK_SPACES
from .precision import AMP
from .presets import METHODS
from .pruning import GUARDS, PRUNING
from .training import OPTIMIZERS

__all__ = ["method_config", "load_config", "check_choices", "CHOICES"]

# config key -> (how to read it from a LearnerConfig, the registry of its valid values)
CHOICES: dict[str, tuple[Callable[[LearnerConfig], Any], Any]] = {
    "method": (lambda c: c.method, METHODS),  # a run records its preset; one this anpyc lacks is no recipe
    "optim.name": (lambda c: c.optim.name, OPTIMIZERS),
    "importance.measure": (lambda c: c.importance.measure, IMPORTANCE),
    "importance.accumulate": (lambda c: c.importance.accumulate, ACCUMULATE),
    "prune.mode": (lambda c: c.prune.mode, PRUNING),
    "prune.granularity": (lambda c: c.prune.granularity, MASK_SPACES),
    "prune.guard": (lambda c: c.prune.guard, GUARDS),
    "consolidation.rule": (lambda c: c.consolidation.rule, CONSOLIDATION),
    "amp": (lambda c: c.amp, AMP),
}


def check_choices(cfg: LearnerConfig) -> LearnerConfig:
    """``cfg`` when every value that names a registered part is registered; else a ConfigError naming the key and
    the valid values."""
    for key, (read, registry) in CHOICES.items():
        _choice(key, read(cfg), registry)
    return cfg


def method_config(name: str, **overrides: Any) -> LearnerConfig:
    """The preset ``name`` with ``overrides`` (dotted keys allowed, e.g. ``{"optim.lr": 0.01}``) applied."""
    cfg = METHODS.get(name)()
    return check_choices(override(cfg, overrides) if overrides else cfg)


def load_config(data: Any) -> LearnerConfig:
    """A ``LearnerConfig`` from its recorded dict (run.json, config.json, a config file), fully checked."""
    return check_choices(from_dict(LearnerConfig, data))
