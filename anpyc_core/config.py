"""Configuration: frozen dataclasses, passed explicitly, validated on load.

``LearnerConfig`` is the whole recipe of a run; it is saved as JSON in the run directory. Method presets
(``anpyc``, ``paper``, ``ewc``, ``mas``, ``si``, ``packnet``, ``finetune``, ``joint``) are registered
functions returning a ``LearnerConfig``; user overrides are applied on top with :func:`override`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .registry import Registry

__all__ = [
    "OptimConfig",
    "ImportanceConfig",
    "PruneConfig",
    "ConsolidationConfig",
    "GrowConfig",
    "LearnerConfig",
    "METHODS",
    "method_config",
    "from_dict",
    "to_dict",
    "override",
]


# ----------------------------------------------------------------------------------------------- validation
# Every value that picks a behaviour is checked against the registry that implements it when a config is built,
# and numbers against their valid range, so a typo fails at once with the valid choices instead of deep in a run.

def _choice(key: str, value: Any, registry: Any) -> None:
    if value not in registry:
        raise ConfigError(f"config key {key!r} has unknown value {value!r}",
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
        from .training import OPTIMIZERS

        _choice("optim.name", self.name, OPTIMIZERS)
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
        from .consolidation import ACCUMULATE
        from .importance import IMPORTANCE

        _choice("importance.measure", self.measure, IMPORTANCE)
        _choice("importance.accumulate", self.accumulate, ACCUMULATE)
        _range("importance.max_batches", self.max_batches, low=0)
        _range("importance.batch_size", self.batch_size, low=1)


@dataclass(frozen=True)
class PruneConfig:
    """The adversarial prune-retrain loop.

    ``mode``: ``guarded`` keeps releasing ``step`` of the task's claim while validation accuracy stays within
    ``tolerance`` of the unpruned accuracy, rolling back (and halving the step) when it does not;
    ``schedule`` is the original fixed schedule (``first_ratio`` for the first task, times ``decay`` for each
    next, in ``step`` increments); ``none`` disables pruning (the task keeps every free unit).
    ``granularity``: ``unit`` (structured: channels, neurons, heads) or ``element`` (unstructured, paper mode).
    ``geometric`` (guarded mode): each step releases ``step`` of what the task still keeps instead of ``step`` of its
    original claim, so keep-fractions of a few percent (cheap with element masks) are reached in a few steps
    (step 0.5: 50%, 25%, 12.5%, ... kept) and each rollback halves a step that is already small.
    """

    mode: str = "guarded"
    granularity: str = "unit"
    tolerance: float = 0.02
    step: float = 0.2
    min_step: float = 0.05
    max_ratio: float = 0.95
    geometric: bool = False
    first_ratio: float = 0.5
    decay: float = 0.8
    retrain_epochs: int = 2
    prune_final: bool = True
    min_units_per_group: int = 1
    # the guard (search mode; anpyc.pruning.guard): paired per-sample comparison with the unpruned model
    guard: str = "paired"
    confidence: float = 1.0  # z: standard errors the drop must stay below the tolerance by
    # gradual pruning (anpyc.pruning.gradual): dense epochs, then a cubic ramp to the budget inside the epochs
    warmup: float = 0.3  # share of optim.epochs trained on the whole claim
    ramp: float = 0.4  # share of optim.epochs over which the keep fraction falls to the budget
    # the cheap search (anpyc.pruning.search)
    search_tolerance: float = 0.05  # drop the no-retrain ranking accepts (retraining recovers part of it)
    search_ratio: float = 0.7  # keep fraction of each rung of the ladder relative to the one above
    min_keep: float = 0.02  # the ladder's lowest rung (share of the claim)
    max_tries: int = 3  # retrains before the budget is taken as it is
    calibration_batches: int = 8  # training batches that re-estimate BatchNorm statistics of a candidate
    # capacity planning (anpyc.pruning.plan)
    expected_tasks: int = 0  # stream length, this run's tasks included; 0 = unknown (rolling horizon)
    horizon: int = 8  # without expected_tasks: each task may keep 1/horizon of the free units of every group
    reserve: float = 0.0  # share of every group kept out of the plan
    group_slack: float = 2.0  # a group may hold this many times its share of the task's budget

    def __post_init__(self) -> None:
        from .masks import MASK_SPACES
        from .pruning import GUARDS, PRUNING

        _choice("prune.mode", self.mode, PRUNING)
        _choice("prune.granularity", self.granularity, MASK_SPACES)
        _choice("prune.guard", self.guard, GUARDS)
        _range("prune.confidence", self.confidence, low=0)
        _range("prune.warmup", self.warmup, low=0, high=1)
        _range("prune.ramp", self.ramp, low=0, high=1)
        _range("prune.search_tolerance", self.search_tolerance, low=0, high=1)
        _range("prune.search_ratio", self.search_ratio, low=0, high=1, low_open=True, high_open=True)
        _range("prune.min_keep", self.min_keep, low=0, high=1, low_open=True)
        _range("prune.max_tries", self.max_tries, low=1)
        _range("prune.calibration_batches", self.calibration_batches, low=0)
        _range("prune.expected_tasks", self.expected_tasks, low=0)
        _range("prune.horizon", self.horizon, low=1)
        _range("prune.reserve", self.reserve, low=0, high=1, high_open=True)
        _range("prune.group_slack", self.group_slack, low=1)
        _range("prune.tolerance", self.tolerance, low=0, high=1)
        _range("prune.step", self.step, low=0, high=1, low_open=True)
        _range("prune.min_step", self.min_step, low=0, high=1, low_open=True)
        _range("prune.max_ratio", self.max_ratio, low=0, high=1)
        _range("prune.first_ratio", self.first_ratio, low=0, high=1)
        _range("prune.decay", self.decay, low=0, low_open=True)
        _range("prune.retrain_epochs", self.retrain_epochs, low=0)
        _range("prune.min_units_per_group", self.min_units_per_group, low=1)


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
        from .consolidation import CONSOLIDATION

        _choice("consolidation.rule", self.rule, CONSOLIDATION)
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
        from .precision import AMP

        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"config key 'method' must be a non-empty string, got {self.method!r}",
                              'write e.g. method = "anpyc"')
        _choice("replay", self.replay, REPLAY)
        _choice("inference", self.inference, INFERENCE)
        _choice("amp", self.amp, AMP)
        _range("workers", self.workers, low=-1)
        _range("threads", self.threads, low=0)
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
            raise ConfigError(f"config key {path!r} must be a number, got {value!r}", "write e.g. 0.01")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {path!r} must be an integer, got {value!r}", "write e.g. 3")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {path!r} must be true or false, got {value!r}", "write true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {path!r} must be a string, got {value!r}", "quote the value")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {path!r} must be a list, got {value!r}", "write e.g. [1, 2]")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_check_type(f"{path}[{i}]", v, inner) for i, v in enumerate(value))
    return value


def from_dict(cls: type, data: dict[str, Any], *, _prefix: str = "") -> Any:
    """Build config dataclass ``cls`` from ``data``; unknown keys and wrong types are errors that name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {_prefix or cls.__name__} must be a mapping", "check the file's structure")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {_prefix + unknown[0]!r}", f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _check_type(_prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def override(cfg: Any, changes: dict[str, Any]) -> Any:
    """Apply nested ``changes`` (e.g. ``{"optim": {"lr": 0.1}}`` or ``{"optim.lr": 0.1}``) to ``cfg``."""
    nested: dict[str, Any] = {}
    for key, value in changes.items():
        node = nested
        parts = key.split(".")
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


# ----------------------------------------------------------------------------------------------- method presets

METHODS: Registry = Registry("method")
# growth widens structured units owned task by task: the other methods own elements, or share everything
NO_GROWTH = GrowConfig(enabled=False)


def method_config(name: str, **overrides: Any) -> LearnerConfig:
    """The preset ``name`` with ``overrides`` (dotted keys allowed) applied."""
    cfg = METHODS.get(name)()
    return override(cfg, overrides) if overrides else cfg


# The default: gradual pruning inside the task's epochs (no prune-retrain rounds: the prune phase costs no more than
# the training it replaces), a paired guard that releases what the trained task does not use, earlier tasks frozen,
# and growth that keeps a quarter of every group's base width free for each new task. The share is a compromise
# measured on validation (benchmarks/forgetting.py --search; BENCHMARKS.md): on permuted MNIST-5k (10 tasks, an MLP
# small for its 10-class tasks) grow.min_free 0.125 / 0.25 / 0.5 / 0.75 gave 92.0 / 93.6 / 94.4 / 94.8 validation
# ACC against PackNet's 93.8, and each step up costs wall time; on split digits (resnet18, far larger than its
# 2-class tasks) 0.5 took 4-5x PackNet's wall time for no accuracy over the smaller shares. Small backbones that
# learn many-class tasks: set grow.min_free = 0.5.


@METHODS.register("anpyc", help="ANPyC, structured: entropy-Taylor importance, gradual pruning with a paired guard, "
                                 "earlier tasks frozen, growth when free units run out")
def _anpyc() -> LearnerConfig:
    # built here, not at import: validating a PruneConfig imports the registries (and torch), which `anpyc --help`
    # must not pay for
    return LearnerConfig(method="anpyc", prune=PruneConfig(mode="gradual", tolerance=0.01),
                         grow=GrowConfig(min_free=0.25), consolidation=ConsolidationConfig(rule="hard"))


@METHODS.register("anpyc-element", help="ANPyC with unstructured element masks: more reuse on long streams, no "
                                         "inference speed-up")
def _anpyc_element() -> LearnerConfig:
    # Every weight element is owned by one task: a later task can own fresh input weights of a unit an earlier task
    # uses, so long streams of tasks that need task-specific first layers (permuted MNIST) keep learning after the
    # units themselves are all taken. Exported models are dense with zeroed weights (no speed or size gain).
    # Geometric guarded pruning down to 1% of a claim, 4 retrain epochs per step: the winner of the validation search
    # on permuted MNIST-5k at 50 tasks (benchmarks/forgetting.py --search --suites permuted50; BENCHMARKS.md). On
    # 10 tasks, keeping more per task (tolerance 0.01, linear steps) wins instead: a short stream needs no room.
    return LearnerConfig(method="anpyc-element", grow=NO_GROWTH, consolidation=ConsolidationConfig(rule="hard"),
                         prune=PruneConfig(granularity="element", tolerance=0.02, max_ratio=0.99, retrain_epochs=4,
                                           geometric=True, step=0.5))


@METHODS.register("anpyc-soft", help="ANPyC with soft consolidation: quadratic penalty plus importance-gated updates")
def _anpyc_soft() -> LearnerConfig:
    return LearnerConfig(method="anpyc-soft", grow=NO_GROWTH, consolidation=ConsolidationConfig(rule="gate"))


# The original's lambda = 3 multiplies its raw importance: the entropy *summed* over a batch of 256, so its scores
# are ~256x ours (batch mean) and their mean over the kept elements of permuted-MNIST task 0 is 0.0231 (measured on
# the 784-64-32 MLP after 30 epochs; the first-order term dominates). Our quadratic rule divides omega by that mean,
# so the original's penalty is strength = 3 * 0.0231 ~= 0.07 here. strength = 3.0 on the normalised scale is 43x
# the original and makes plain SGD (lr 0.02) diverge on the second task: an element is unstable once
# 2 * lr * strength * omega~ > 2, and omega~ reaches ~200 in the tail.
PAPER_STRENGTH = 0.07


@METHODS.register("paper", help="the original ANPyC: unstructured masks, fixed schedule, SGD, lambda 3")
def _paper() -> LearnerConfig:
    # Dropout 0.5 belongs to the original's MLP (after each hidden layer): build the trunk with it,
    # create_backbone("mlp", hidden=[64, 32], dropout=0.5). A feature dropout here would apply a second dropout
    # to the last hidden layer (0.75 drop rate in effect), so optim.dropout stays 0.
    return LearnerConfig(
        method="paper",
        grow=NO_GROWTH,
        optim=OptimConfig(name="sgd", lr=0.02, momentum=0.0, batch_size=256, epochs=30, dropout=0.0),
        importance=ImportanceConfig(measure="entropy_taylor", max_batches=0, batch_size=256, accumulate="sum"),
        prune=PruneConfig(mode="schedule", granularity="element", step=0.1, first_ratio=0.5, decay=0.8,
                          retrain_epochs=30, prune_final=False),
        consolidation=ConsolidationConfig(rule="quadratic", strength=PAPER_STRENGTH),
        reinit_free=False,
        inference="shared",  # the original evaluates every task on the whole current network (no per-task masks)
    )


# A preset's own network where the user names a backbone without its settings (``--model mlp``): the paper mode is
# the original's 784-64-32 MLP with dropout 0.5 after each hidden layer. Explicit model_kwargs win.
BACKBONE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"mlp": {"hidden": [64, 32], "dropout": 0.5}},
}


# Baseline strengths: the winners of the validation search on permuted MNIST-5k, 10 tasks, MLP 784-256-256
# (benchmarks/forgetting.py --search; grids and numbers in BENCHMARKS.md). The quadratic rule normalises omega to
# mean 1 over the old elements, but its tail reaches 100x-500x the mean, and plain/momentum SGD diverges on an
# element once lr * 2 * strength * omega~ > 2 * (1 + momentum): with lr 0.05 and momentum 0.9 the former default
# strength of 100 (EWC) diverged on the second task, and strengths >= 1 diverge for every measure. Below that,
# a weak penalty wins on validation: stronger ones stop later tasks from learning (intransigence).


# EWC: Adam (lr 1e-3, strength 0.01) beat SGD with momentum (best strength 0.003) on validation: 91.5 vs 90.8.
@METHODS.register("ewc", help="Elastic Weight Consolidation: Fisher importance, quadratic penalty, no pruning")
def _ewc() -> LearnerConfig:
    return LearnerConfig(
        method="ewc",
        grow=NO_GROWTH,
        optim=OptimConfig(name="adam", lr=0.001),
        importance=ImportanceConfig(measure="fisher"),
        prune=PruneConfig(mode="none"),
        consolidation=ConsolidationConfig(rule="quadratic", strength=0.01),
    )


@METHODS.register("mas", help="Memory Aware Synapses: output-sensitivity importance, quadratic penalty")
def _mas() -> LearnerConfig:
    return LearnerConfig(
        method="mas",
        grow=NO_GROWTH,
        importance=ImportanceConfig(measure="mas"),
        prune=PruneConfig(mode="none"),
        consolidation=ConsolidationConfig(rule="quadratic", strength=0.001),
    )


@METHODS.register("si", help="Synaptic Intelligence: path-integral importance, quadratic penalty")
def _si() -> LearnerConfig:
    # SGD with momentum (strength 0.001) beat Adam (lr 1e-3, best strength 0.01) on validation: 91.9 vs 90.5
    return LearnerConfig(
        method="si",
        grow=NO_GROWTH,
        importance=ImportanceConfig(measure="si"),
        prune=PruneConfig(mode="none"),
        consolidation=ConsolidationConfig(rule="quadratic", strength=0.001),
    )


@METHODS.register("packnet", help="PackNet: magnitude pruning to a fixed ratio, hard freeze of earlier tasks")
def _packnet() -> LearnerConfig:
    # each task releases 90% of the weights it claimed (in two steps, 50% then 90%, retraining after each):
    # tied with 75% on validation and leaves far more capacity for later tasks (65% vs 94% used after 10 tasks)
    return LearnerConfig(
        method="packnet",
        grow=NO_GROWTH,
        importance=ImportanceConfig(measure="magnitude"),
        prune=PruneConfig(mode="schedule", granularity="element", first_ratio=0.9, decay=1.0, step=0.5,
                          retrain_epochs=1),
        consolidation=ConsolidationConfig(rule="hard"),
        reinit_free=False,
    )


@METHODS.register("finetune", help="fine-tuning: shared weights, no protection (lower bound)")
def _finetune() -> LearnerConfig:
    return LearnerConfig(method="finetune", grow=NO_GROWTH, prune=PruneConfig(mode="none"),
                         consolidation=ConsolidationConfig(rule="none"))


@METHODS.register("joint", help="joint training on all tasks seen so far (upper bound, keeps all data)")
def _joint() -> LearnerConfig:
    return LearnerConfig(method="joint", grow=NO_GROWTH, prune=PruneConfig(mode="none"),
                         consolidation=ConsolidationConfig(rule="none"), replay="all")
