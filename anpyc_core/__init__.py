"""anpyc: continual learning on any timm/torch backbone with per-task subnetworks.

The public surface is listed in ``__all__``; names resolve lazily so that ``import anpyc`` (and the CLI's
``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # learner and its configuration
    "ContinualLearner": "anpyc.learner",
    "LearnerConfig": "anpyc.config",
    "OptimConfig": "anpyc.config",
    "ImportanceConfig": "anpyc.config",
    "PruneConfig": "anpyc.config",
    "ConsolidationConfig": "anpyc.config",
    "METHODS": "anpyc.config",
    "method_config": "anpyc.config",
    # tasks and data contract
    "Task": "anpyc.task",
    "TaskStream": "anpyc.task",
    "InputSpec": "anpyc.task",
    # structure walk and masks
    "walk": "anpyc.structure",
    "Structure": "anpyc.structure",
    "UnitGroup": "anpyc.structure",
    "MaskSpace": "anpyc.masks",
    "load_masks": "anpyc.masks",
    # registries
    "IMPORTANCE": "anpyc.importance",
    "CONSOLIDATION": "anpyc.consolidation",
    # metrics
    "continual_metrics": "anpyc.metrics",
    # errors
    "AnpycError": "anpyc.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anpyc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
