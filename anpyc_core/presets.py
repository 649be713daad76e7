"""Method presets: each registered name builds the :class:`~anpyc.config.LearnerConfig` of a method (the default
``anpyc``, its variants, the original paper mode and the baselines), with the reasons for its settings beside it.
``anpyc.configure.method_config(name, **{"dotted.key": value})`` starts from one and applies overrides."""

from __future__ import annotations

from typing import Any

from .config import (ConsolidationConfig, GrowConfig, ImportanceConfig, LearnerConfig, OptimConfig, PruneConfig,
                     StepsConfig)
from .registry import Registry

__all__ = ["METHODS", "NO_GROWTH", "PAPER_STRENGTH", "BACKBONE_DEFAULTS"]

METHODS: Registry = Registry("method")
# growth widens structured units owned task by task: the other methods own elements, or share everything
NO_GROWTH = GrowConfig(enabled=False)


# Every setting below was chosen on validation splits, never on test: the grids and their results are the
# validation-search sections of BENCHMARKS.md (benchmarks/suites.py: SEARCH). The comments say why a setting won,
# not by how much: the figures live in BENCHMARKS.md, where they are re-measured.
#
# The default: gradual pruning inside the task's epochs (no prune-retrain rounds: the prune phase costs no more than
# the training it replaces), a paired guard that releases what the trained task does not use, earlier tasks frozen,
# and growth that keeps a quarter of every group's base width free for each new task. The share is a compromise:
# on permuted MNIST (an MLP small for its 10-class tasks) validation ACC rises with it, and so does the wall time;
# on the CNN suites (resnet18, far larger than its 2-class tasks) a larger share buys no accuracy for several times
# the wall time. Small backbones that learn many-class tasks: set grow.min_free = 0.5.
# The guard's tolerance (0.5 pts of the task's accuracy, with one standard error of the paired drop on top) beat
# 0.01 on the validation splits of every suite, for a few more parameters per task.


@METHODS.register("anpyc", help="ANPyC, structured: entropy-Taylor importance, gradual pruning with a paired guard, "
                                 "earlier tasks frozen, growth when free units run out")
def _anpyc() -> LearnerConfig:
    return LearnerConfig(method="anpyc", prune=PruneConfig(mode="gradual", tolerance=0.005),
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
                         prune=PruneConfig(mode="guarded", granularity="element", tolerance=0.02, retrain_epochs=4,
                                           steps=StepsConfig(max_ratio=0.99, geometric=True, step=0.5)))


@METHODS.register("anpyc-soft", help="ANPyC with soft consolidation: quadratic penalty plus importance-gated updates")
def _anpyc_soft() -> LearnerConfig:
    return LearnerConfig(method="anpyc-soft", grow=NO_GROWTH, prune=PruneConfig(mode="guarded"),
                         consolidation=ConsolidationConfig(rule="gate"))


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
        prune=PruneConfig(mode="schedule", granularity="element", retrain_epochs=30, prune_final=False,
                          steps=StepsConfig(step=0.1, first_ratio=0.5, decay=0.8)),
        consolidation=ConsolidationConfig(rule="quadratic", strength=PAPER_STRENGTH),
        reinit_free=False,
        inference="shared",  # the original evaluates every task on the whole current network (no per-task masks)
    )


# A preset's own network where the user names a backbone without its settings (``--model mlp``): the paper mode is
# the original's 784-64-32 MLP with dropout 0.5 after each hidden layer. Explicit model_kwargs win.
BACKBONE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"mlp": {"hidden": [64, 32], "dropout": 0.5}},
}


# Baseline settings: the winners of the validation search on permuted MNIST-5k, 10 tasks, MLP 784-256-256
# (benchmarks/forgetting.py --search). The quadratic rule normalises omega to mean 1 over the old elements, but its
# tail reaches a few hundred times the mean, and plain/momentum SGD diverges on an element once
# lr * 2 * strength * omega~ > 2 * (1 + momentum): strengths >= 1 diverge for every measure under SGD. Below that,
# a weak penalty wins on validation: stronger ones stop later tasks from learning (intransigence).


def _quadratic(method: str, measure: str, strength: float, optim: OptimConfig | None = None) -> LearnerConfig:
    """A quadratic-penalty baseline: ``measure`` importance, no pruning, no growth."""
    return LearnerConfig(method=method, grow=NO_GROWTH, optim=optim or OptimConfig(),
                         importance=ImportanceConfig(measure=measure), prune=PruneConfig(mode="none"),
                         consolidation=ConsolidationConfig(rule="quadratic", strength=strength))


# EWC: Adam (lr 1e-3, strength 0.01) beat SGD with momentum at its best strength on validation.
@METHODS.register("ewc", help="Elastic Weight Consolidation: Fisher importance, quadratic penalty, no pruning")
def _ewc() -> LearnerConfig:
    return _quadratic("ewc", "fisher", 0.01, OptimConfig(name="adam", lr=0.001))


@METHODS.register("mas", help="Memory Aware Synapses: output-sensitivity importance, quadratic penalty")
def _mas() -> LearnerConfig:
    return _quadratic("mas", "mas", 0.001)


@METHODS.register("si", help="Synaptic Intelligence: path-integral importance, quadratic penalty")
def _si() -> LearnerConfig:
    # SGD with momentum (strength 0.001) beat Adam (lr 1e-3) at its best strength on validation
    return _quadratic("si", "si", 0.001)


@METHODS.register("packnet", help="PackNet: magnitude pruning to a fixed ratio, hard freeze of earlier tasks")
def _packnet() -> LearnerConfig:
    # each task releases 90% of the weights it claimed (in two steps, 50% then 90%, retraining after each):
    # tied with 75% on validation and leaves far more capacity for later tasks
    return LearnerConfig(
        method="packnet",
        grow=NO_GROWTH,
        importance=ImportanceConfig(measure="magnitude"),
        prune=PruneConfig(mode="schedule", granularity="element", retrain_epochs=1,
                          steps=StepsConfig(first_ratio=0.9, decay=1.0, step=0.5)),
        consolidation=ConsolidationConfig(rule="hard"),
        reinit_free=False,
    )


@METHODS.register("finetune", help="fine-tuning: shared weights, no protection (lower bound)")
def _finetune() -> LearnerConfig:
    # lr 0.01 beat 0.05 on validation: a smaller step forgets less of the earlier tasks
    return LearnerConfig(method="finetune", grow=NO_GROWTH, optim=OptimConfig(lr=0.01), prune=PruneConfig(mode="none"),
                         consolidation=ConsolidationConfig(rule="none"))


@METHODS.register("joint", help="joint training on all tasks seen so far (upper bound, keeps all data)")
def _joint() -> LearnerConfig:
    return LearnerConfig(method="joint", grow=NO_GROWTH, prune=PruneConfig(mode="none"),
                         consolidation=ConsolidationConfig(rule="none"), replay="all")
