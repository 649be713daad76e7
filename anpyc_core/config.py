"""Configuration: frozen dataclasses, passed explicitly, validated on load.

``LearnerConfig`` is the whole recipe of a run; it is saved as JSON in the run directory. This module is a leaf:
the dataclasses, their ranges and types, and reading them from dicts. Method presets (``anpyc``, ``paper``, ``ewc``,
...) are registered functions returning a ``LearnerConfig`` (:mod:`anpyc.presets`); :mod:`anpyc.configure` builds a
config for use (``method_config(name, **overrides)``, a run's recorded config) and checks every value that names a
registered part against its registry.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, clip

_MAX_NUMBER = 2 ** 53  # an integer count, size or seed beyond it is no setting (and a float holds it exactly)

__all__ = [
    "OptimConfig",
    "ImportanceConfig",
    "PruneConfig",
    "PlanConfig",
    "GradualConfig",
    "LadderConfig",
    "StepsConfig",
    "canonical_key",
    "ConsolidationConfig",
    "GrowConfig",
    "LearnerConfig",
    "from_dict",
    "to_dict",
    "override",
]


# ----------------------------------------------------------------------------------------------- validation
# Numbers are checked against their valid range and types against the fields when a config is built here; a value
# that picks a registered part (an optimizer, a measure, a strategy...) against its registry where a config is built
# for use (anpyc.configure), so a typo fails at once with the valid choices instead of deep in a run. This module
# imports nothing of the engine: every part of it may import it.

def _choice(key: str, value: Any, registry: Any) -> None:
    if value not in registry:
        raise ConfigError(f"config key {key!r} has unknown value {clip(repr(value), 60)}",
                          f"choose one of: {', '.join(sorted(registry))}")


def _range(key: str, value: float, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> None:
    bad = (low is not None and (value <= low if low_open else value < low)) or \
          (high is not None and (value >= high if high_open else value > high))
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        span = f"{lo}, {hi}" if low is not None and high is not None else (f">{'' if low_open else '='} {low:g}"
                                                                           if low is not None else f"<= {high:g}")
        raise ConfigError(f"config key {key!r} is {value!r}, outside its valid range {span}", f"set {key} within it")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and loop settings for one training phase."""

    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 10
    grad_clip: float = 0.0  # 0 disables clipping
    dropout: float = 0.0  # dropout on the features before the task head

    def __post_init__(self) -> None:
        _range("optim.lr", self.lr, low=0, low_open=True)
        _range("optim.momentum", self.momentum, low=0, high=1, high_open=True)
        _range("optim.weight_decay", self.weight_decay, low=0)
        _range("optim.batch_size", self.batch_size, low=1)
        _range("optim.epochs", self.epochs, low=0)
        _range("optim.grad_clip", self.grad_clip, low=0)
        _range("optim.dropout", self.dropout, low=0, high=1, high_open=True)


@dataclass(frozen=True)
class ImportanceConfig:
    """Which importance measure scores parameters, and on how much data."""

    measure: str = "entropy_taylor"  # entropy_taylor | magnitude | fisher | mas | si
    max_batches: int = 16  # 0 = the whole training set
    batch_size: int = 64
    accumulate: str = "sum"  # sum | max   (how a task's scores add to the consolidated importance)

    def __post_init__(self) -> None:
        _range("importance.max_batches", self.max_batches, low=0)
        _range("importance.batch_size", self.batch_size, low=1)


@dataclass(frozen=True)
class PlanConfig:
    """Capacity planning (``anpyc.pruning.plan``): how much of every group a task may keep."""

    expected_tasks: int = 0  # stream length, this run's tasks included; 0 = unknown (rolling horizon)
    horizon: int = 8  # without expected_tasks: each task may keep 1/horizon of the free units of every group
    reserve: float = 0.0  # share of every group kept out of the plan
    group_slack: float = 2.0  # a group may hold this many times its share of the task's budget

    def __post_init__(self) -> None:
        _range("prune.plan.expected_tasks", self.expected_tasks, low=0)
        _range("prune.plan.horizon", self.horizon, low=1)
        _range("prune.plan.reserve", self.reserve, low=0, high=1, high_open=True)
        _range("prune.plan.group_slack", self.group_slack, low=1)


@dataclass(frozen=True)
class GradualConfig:
    """The gradual strategy (``anpyc.pruning.gradual``): dense epochs, then a cubic ramp to the budget."""

    warmup: float = 0.3  # share of optim.epochs trained on the whole claim
    ramp: float = 0.4  # share of optim.epochs over which the keep fraction falls to the budget
    # the evidence for a release made without retraining (the release below the budget): a validation set smaller
    # than this is topped up to it with training samples (a fixed random subset); 0 = the validation set alone.
    # Training samples are evidence only where validation has too little to decide with (BENCHMARKS.md)
    guard_samples: int = 500

    def __post_init__(self) -> None:
        _range("prune.gradual.warmup", self.warmup, low=0, high=1)
        _range("prune.gradual.ramp", self.ramp, low=0, high=1)
        _range("prune.gradual.guard_samples", self.guard_samples, low=0)


@dataclass(frozen=True)
class LadderConfig:
    """The ladder of keep fractions below the budget (the gradual strategy's release without retraining, and the
    search strategy's candidates, ``anpyc.pruning.search``)."""

    ratio: float = 0.7  # keep fraction of each rung relative to the one above
    min_keep: float = 0.02  # the lowest rung (share of the claim)
    tolerance: float = 0.05  # drop the search's no-retrain ranking accepts (retraining recovers part of it)
    max_tries: int = 3  # the search's retrains before the budget is taken as it is

    def __post_init__(self) -> None:
        _range("prune.ladder.ratio", self.ratio, low=0, high=1, low_open=True, high_open=True)
        _range("prune.ladder.min_keep", self.min_keep, low=0, high=1, low_open=True)
        _range("prune.ladder.tolerance", self.tolerance, low=0, high=1)
        _range("prune.ladder.max_tries", self.max_tries, low=1)


@dataclass(frozen=True)
class StepsConfig:
    """Pruning in steps with retraining after each (the ``guarded`` and ``schedule`` strategies).

    ``guarded``: each step releases ``step`` of the claim (``geometric``: of what the task still keeps, so
    keep-fractions of a few percent are reached in a few steps) while validation accuracy stays within the
    tolerance; a step that breaks it is rolled back and halved, down to ``min_step``, up to ``max_ratio`` of the
    claim. ``schedule``: the original fixed schedule, ``first_ratio`` for the first task, times ``decay`` for each
    next, in ``step`` increments."""

    step: float = 0.2
    min_step: float = 0.05
    max_ratio: float = 0.95
    geometric: bool = False
    first_ratio: float = 0.5
    decay: float = 0.8

    def __post_init__(self) -> None:
        _range("prune.steps.step", self.step, low=0, high=1, low_open=True)
        _range("prune.steps.min_step", self.min_step, low=0, high=1, low_open=True)
        _range("prune.steps.max_ratio", self.max_ratio, low=0, high=1)
        _range("prune.steps.first_ratio", self.first_ratio, low=0, high=1)
        _range("prune.steps.decay", self.decay, low=0, low_open=True)


@dataclass(frozen=True)
class PruneConfig:
    """How a task's claim shrinks to what it keeps (docs/method.md, section 4).

    ``mode``: the registered strategy (``anpyc.pruning.PRUNING``; each one's help says what it does): ``gradual``
    (the default: pruning inside the task's epochs, then a guarded release), ``search``, ``guarded``, ``schedule``
    and ``none``. ``granularity``: ``unit`` (structured: channels, neurons, heads) or ``element`` (unstructured,
    paper mode). What every strategy judges with is here; what one strategy (or two) reads is nested under it:
    ``plan`` (capacity planning), ``gradual``, ``ladder`` (rungs below the budget), ``steps`` (guarded, schedule).
    """

    mode: str = "gradual"
    granularity: str = "unit"
    tolerance: float = 0.02  # the accuracy drop a release may cost (the guard's tolerance)
    guard: str = "paired"  # the guard's rule (anpyc.pruning.guard): per-sample comparison with the unpruned model
    confidence: float = 1.0  # z: standard errors the drop must stay below the tolerance by
    retrain_epochs: int = 2  # retraining after a release (guarded, schedule, search)
    prune_final: bool = True
    min_units_per_group: int = 1
    calibration_batches: int = 8  # training batches that re-estimate BatchNorm statistics of a candidate
    plan: PlanConfig = field(default_factory=PlanConfig)
    gradual: GradualConfig = field(default_factory=GradualConfig)
    ladder: LadderConfig = field(default_factory=LadderConfig)
    steps: StepsConfig = field(default_factory=StepsConfig)

    def __post_init__(self) -> None:
        _range("prune.tolerance", self.tolerance, low=0, high=1)
        _range("prune.confidence", self.confidence, low=0)
        _range("prune.retrain_epochs", self.retrain_epochs, low=0)
        _range("prune.min_units_per_group", self.min_units_per_group, low=1)
        _range("prune.calibration_batches", self.calibration_batches, low=0)


# Keys of PruneConfig before it was nested (config files, --set, run.json of older runs): still accepted, moved to
# where they live now.
LEGACY_PRUNE_KEYS = {
    "expected_tasks": "plan", "horizon": "plan", "reserve": "plan", "group_slack": "plan",
    "warmup": "gradual", "ramp": "gradual", "guard_samples": "gradual",
    "search_ratio": ("ladder", "ratio"), "min_keep": "ladder", "search_tolerance": ("ladder", "tolerance"),
    "max_tries": "ladder",
    "step": "steps", "min_step": "steps", "max_ratio": "steps", "geometric": "steps", "first_ratio": "steps",
    "decay": "steps",
}


def _nest_prune(data: dict[str, Any]) -> dict[str, Any]:
    """A ``prune`` table with its flat keys of older versions moved under their section (the flat value wins)."""
    if not any(k in LEGACY_PRUNE_KEYS for k in data):
        return data
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items() if k not in LEGACY_PRUNE_KEYS}
    for key, where in LEGACY_PRUNE_KEYS.items():
        if key in data:
            section, name = where if isinstance(where, tuple) else (where, key)
            table = out.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"config key 'prune.{section}' must be a table/mapping",
                                  f"give the fields of prune.{section}")
            table[name] = data[key]
    return out


def canonical_key(key: str) -> str:
    """A dotted config key as it is spelled now (``prune.step`` -> ``prune.steps.step``)."""
    head, _, name = key.partition(".")
    where = LEGACY_PRUNE_KEYS.get(name) if head == "prune" else None
    if where is None:
        return key
    section, field_name = where if isinstance(where, tuple) else (where, name)
    return f"prune.{section}.{field_name}"


@dataclass(frozen=True)
class ConsolidationConfig:
    """How parameters that earlier tasks use are protected while later tasks train.

    ``rule``: ``quadratic`` (lambda * sum Omega (theta - theta*)^2), ``gate`` (quadratic plus an element-wise
    gradient gate from normalised Omega), ``hard`` (freeze every element an earlier task uses; PackNet-like),
    ``none`` (fine-tuning).
    """

    rule: str = "gate"
    strength: float = 100.0
    gate_quantile: float = 0.5
    # within a task: while it retrains after a prune step, its kept weights are pulled toward their unpruned values,
    # pull * sum(omega~ * (theta - theta_unpruned)^2) with omega~ its own normalised importance (0 disables)
    pull: float = 0.0

    def __post_init__(self) -> None:
        _range("consolidation.strength", self.strength, low=0)
        _range("consolidation.gate_quantile", self.gate_quantile, low=0, high=1, low_open=True)
        _range("consolidation.pull", self.pull, low=0)


REPLAY = ("none", "all")  # all: joint training on every task seen so far (the upper bound)
# task: each task runs with its own mask (its subnetwork, what it exports); shared: every task runs with the mask of
# the newest task, the whole network a single-head-per-task model of the original paper evaluates with
INFERENCE = ("task", "shared")


@dataclass(frozen=True)
class GrowConfig:
    """Widening the backbone when its free capacity runs out (anpyc.growth; structured units only).

    At the start of a task, a group with fewer free units than ``min_free`` of its base width (its width before any
    growth) grows by the shortfall, at least ``step`` of its base width, up to ``max_width`` times it; a task may
    then keep up to ``min_free`` of every group's base width whatever its capacity plan says.
    """

    enabled: bool = True
    min_free: float = 0.125
    step: float = 0.125
    max_width: float = 8.0

    def __post_init__(self) -> None:
        _range("grow.min_free", self.min_free, low=0, high=1, low_open=True)
        _range("grow.step", self.step, low=0, high=1, low_open=True)
        _range("grow.max_width", self.max_width, low=1)


@dataclass(frozen=True)
class LearnerConfig:
    """The full recipe of a continual-learning run."""

    method: str = "anpyc"
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # 0 = leave torch's default
    optim: OptimConfig = field(default_factory=OptimConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    consolidation: ConsolidationConfig = field(default_factory=ConsolidationConfig)
    grow: GrowConfig = field(default_factory=GrowConfig)
    reinit_free: bool = True  # re-initialise free units before a task claims them
    replay: str = "none"  # none | all (joint training upper bound)
    eval_batch_size: int = 256
    checkpoint_epochs: bool = True  # checkpoint after every epoch, not only after every phase
    verify_structure: bool = True  # parity-check every unit group at walk time, drop the ones that fail
    inference: str = "task"  # task | shared (see INFERENCE)
    # speed (anpyc.loading, anpyc.precision): workers do not change a run's batches; amp and channels_last change
    # its arithmetic, not its function
    workers: int = -1  # data-loading worker processes: -1 = from the core count, 0 = in the training process
    amp: str = "none"  # none | bf16 | fp16 (autocast; float32 master weights)
    channels_last: bool = False  # NHWC weights and batches (convolutional backbones)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"config key 'method' must be a non-empty string, got {self.method!r}",
                              'write e.g. method = "anpyc"')
        _choice("replay", self.replay, REPLAY)
        _choice("inference", self.inference, INFERENCE)
        _range("workers", self.workers, low=-1, high=1024)
        _range("threads", self.threads, low=0, high=4096)
        _range("eval_batch_size", self.eval_batch_size, low=1)

    def replace(self, **changes: Any) -> "LearnerConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------- (de)serialise

def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def _check_type(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(path, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"config key {path!r} has the wrong type ({type(value).__name__})", f"expected {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {path!r} must be null", "remove it or set null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {path!r} must be a table/mapping", f"give the fields of {tp.__name__}")
        return from_dict(tp, value, _prefix=path + ".")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {path!r} must be a number, got {clip(repr(value), 40)}", "write e.g. 0.01")
        if not math.isfinite(value):
            raise ConfigError(f"config key {path!r} must be a finite number, got {clip(repr(value), 40)}",
                              "write e.g. 0.01")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {path!r} must be an integer, got {clip(repr(value), 40)}", "write e.g. 3")
        if abs(value) > _MAX_NUMBER:
            raise ConfigError(f"config key {path!r} is {clip(value, 24)}, beyond +-2**53", "write e.g. 3")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {path!r} must be true or false, got {clip(repr(value), 40)}",
                              "write true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {path!r} must be a string, got {clip(repr(value), 40)}", "quote the value")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {path!r} must be a list, got {clip(repr(value), 40)}", "write e.g. [1, 2]")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_check_type(f"{path}[{i}]", v, inner) for i, v in enumerate(value))
    return value


def from_dict(cls: type, data: dict[str, Any], *, _prefix: str = "") -> Any:
    """Build config dataclass ``cls`` from ``data``; unknown keys and wrong types are errors that name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {_prefix or cls.__name__} must be a mapping", "check the file's structure")
    if cls is PruneConfig:
        data = _nest_prune(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in names), key=repr)  # YAML keys may be numbers, null, ...
    if unknown:
        raise ConfigError(f"unknown config key {clip(_prefix + str(unknown[0]), 80)!r}",
                          f"valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _check_type(_prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def override(cfg: Any, changes: dict[str, Any]) -> Any:
    """Apply nested ``changes`` (e.g. ``{"optim": {"lr": 0.1}}`` or ``{"optim.lr": 0.1}``) to ``cfg``."""
    nested: dict[str, Any] = {}
    for key, value in changes.items():
        node = nested
        parts = canonical_key(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    merged = _deep_merge(to_dict(cfg), nested)
    return from_dict(type(cfg), merged)


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out

