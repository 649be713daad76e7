"""anpyc: continual learning on any timm/torch backbone with per-task subnetworks.

The public surface is listed in ``__all__``; names resolve lazily so that ``import anpyc`` (and the CLI's
``--help``) does not import torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# public name -> the submodule that defines it (imported on first access, by a literal import in _load)
_EXPORTS: dict[str, str] = {
    # learner and its configuration
    "ContinualLearner": "learner",
    "LearnerConfig": "config",
    "OptimConfig": "config",
    "ImportanceConfig": "config",
    "PruneConfig": "config",
    "ConsolidationConfig": "config",
    "METHODS": "presets",
    "method_config": "configure",
    # tasks and data contract
    "Task": "task",
    "TaskStream": "task",
    "InputSpec": "task",
    # backbones by name
    "BACKBONES": "backbones",
    "create_backbone": "backbones",
    # structure walk and masks
    "walk": "structure",
    "Structure": "structure",
    "UnitGroup": "structure",
    "MaskSpace": "masks",
    "load_masks": "masks",
    # registries
    "IMPORTANCE": "importance",
    "CONSOLIDATION": "consolidation",
    # metrics
    "continual_metrics": "metrics",
    # errors
    "AnpycError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def _load(module: str) -> Any:
    """The submodule ``module``, by a literal import: nothing in the core imports code by a string."""
    match module:
        case "learner":
            from . import learner as m
        case "config":
            from . import config as m
        case "configure":
            from . import configure as m
        case "presets":
            from . import presets as m
        case "task":
            from . import task as m
        case "backbones":
            from . import backbones as m
        case "structure":
            from . import structure as m
        case "masks":
            from . import masks as m
        case "importance":
            from . import importance as m
        case "consolidation":
            from . import consolidation as m
        case "metrics":
            from . import metrics as m
        case "errors":
            from . import errors as m
        case _:
            raise AttributeError(module)
    return m


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anpyc' has no attribute {name!r}")
    value = getattr(_load(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
