"""The continual-learning suites of the benchmarks: streams, backbones, budgets, the method rows and the validation
grids behind them (the data; :mod:`forgetting` runs them, :mod:`forgetting_report` writes their tables).

A row is a registered preset plus only what this suite's validation search chose differently from it (the search
is :data:`SEARCH`; a row never restates a preset's value: the presets in ``anpyc_core/presets.py`` are the one
source of every setting, a test checks it). Suites:

* ``permuted10`` -- permuted MNIST-5k, 10 tasks, MLP 784-256-256 (the paper mode on its own 784-64-32);
* ``permuted50`` -- the same stream at 50 tasks: anpyc against the best baseline of ``permuted10``;
* ``split-mnist`` -- split MNIST-5k, 5 two-class tasks, timm ``resnet18`` on 32x32 grayscale;
* ``split-digits`` -- split sklearn digits, 5 two-class tasks, timm ``resnet18`` on 32x32 grayscale.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from _bench import RunSpec

BASELINES = ("finetune", "ewc", "mas", "si", "packnet")  # continual-learning baselines (joint is an upper bound)


@dataclass(frozen=True)
class Method:
    """A table row: a registered preset plus the overrides the validation search chose (see :data:`SEARCH`)."""

    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] | None = None  # replaces the suite's (the paper mode's own MLP)
    note: str = ""


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    stream: str
    stream_kwargs: dict[str, Any]
    backbone: str
    backbone_kwargs: dict[str, Any]
    methods: dict[str, Method]
    # budget settings shared by every method of the suite; they win over a row's own overrides (a CNN suite runs the
    # permuted10 winners with its own epoch counts)
    common: dict[str, Any] = field(default_factory=dict)
    quick_stream: dict[str, Any] = field(default_factory=dict)
    quick_backbone: tuple[str, dict[str, Any]] | None = None


PAPER_MLP = {"hidden": [64, 32], "dropout": 0.5}  # the original 784-64-32 with dropout 0.5 after each hidden layer

# ---------------------------------------------------------------------------------------------- method rows
# The presets hold every method's settings, chosen on permuted10's validation splits (the search winners of
# SEARCH["permuted10"], results in BENCHMARKS.md). A row overrides only where its own suite's search chose otherwise.
PERMUTED = {
    "anpyc": Method("anpyc", note="the preset as it ships"),
    # the preset is the permuted50 winner (geometric steps: room for a long stream); a short stream keeps more per task
    "anpyc-element": Method("anpyc-element", {"prune.tolerance": 0.01, "prune.geometric": False, "prune.step": 0.2}),
    "anpyc-soft": Method("anpyc-soft"),
    "paper": Method("paper", backbone_kwargs=PAPER_MLP, note="784-64-32, dropout 0.5"),
    "finetune": Method("finetune"),
    "joint": Method("joint"),
    "ewc": Method("ewc"),
    "mas": Method("mas"),
    "si": Method("si"),
    "packnet": Method("packnet"),
}
# permuted50: the winners of the search on the 50-task stream's own validation splits (SEARCH["permuted50"])
LONG = {
    "anpyc": Method("anpyc", note="the preset as it ships"),
    "anpyc-element": Method("anpyc-element"),
    "packnet": Method("packnet", {"prune.first_ratio": 0.97}),
}
# CNN suites: no anpyc-soft row (its gate doubles the cost of a CPU run), no element-mask rows (the paper mode is an
# MLP method; anpyc-element's per-element masks over 11M weights cost as much) -- anpyc is structured there
# The quadratic baselines use the winners of their split-digits search (SEARCH below) on both CNN suites.
SPLIT = {k: v for k, v in PERMUTED.items() if k not in ("paper", "anpyc-soft", "anpyc-element")} | {
    "ewc": Method("ewc", {"consolidation.strength": 1000.0}),
    "mas": Method("mas", {"optim.name": "adam", "optim.lr": 0.001, "consolidation.strength": 1.0}),
    "si": Method("si", {"optim.lr": 0.01}),
}
# Reduced for the CPU budget (a resnet18 epoch on 700 images takes ~10 s on the shared 2-core machine); binary
# tasks reach ~100% train accuracy within 2 epochs at these settings.
CNN_MNIST = {"optim.epochs": 3, "prune.retrain_epochs": 1}
CNN_DIGITS = {"optim.epochs": 5, "optim.batch_size": 32, "prune.retrain_epochs": 1}

SUITES: dict[str, Suite] = {
    "permuted10": Suite(
        "permuted10", "Permuted MNIST-5k, 10 tasks, MLP 784-256-256", "mnist5k-permuted", {"num_tasks": 10},
        "mlp", {"hidden": [256, 256]}, PERMUTED,
        quick_stream={"num_tasks": 3, "limit": 120}, quick_backbone=("mlp", {"hidden": [32, 32]})),
    "permuted50": Suite(
        "permuted50", "Permuted MNIST-5k, 50 tasks, MLP 784-256-256 (long-term forgetting)", "mnist5k-permuted",
        {"num_tasks": 50}, "mlp", {"hidden": [256, 256]},
        {k: LONG.get(k, PERMUTED[k]) for k in ("anpyc", "anpyc-element", *BASELINES)},
        quick_stream={"num_tasks": 4, "limit": 60}, quick_backbone=("mlp", {"hidden": [32, 32]})),
    "split-mnist": Suite(
        "split-mnist", "Split MNIST-5k, 5 tasks, timm resnet18 (32x32 grayscale)", "mnist5k-split",
        {"num_tasks": 5, "img_size": 32}, "resnet18", {}, SPLIT, common=CNN_MNIST,
        quick_stream={"num_tasks": 2, "limit": 40}, quick_backbone=("test_resnet", {})),
    "split-digits": Suite(
        "split-digits", "Split digits (sklearn), 5 tasks, timm resnet18 (32x32 grayscale)", "digits-split",
        {"num_tasks": 5, "img_size": 32}, "resnet18", {}, SPLIT, common=CNN_DIGITS,
        quick_stream={"num_tasks": 2, "limit": 40}, quick_backbone=("test_resnet", {})),
}
DEFAULT_SUITES = ("permuted10", "permuted50", "split-mnist", "split-digits")
QUICK = {"optim.epochs": 1, "prune.retrain_epochs": 1, "importance.max_batches": 2, "optim.batch_size": 32,
         "importance.batch_size": 32}


# ------------------------------------------------------------------------------------------- validation search
# Per suite and method: the grid searched on the validation splits (seed 0), as a list of blocks whose value lists
# are crossed; a point is laid over the method's preset (see specs), so it spells out every setting it changes. The
# winner (highest validation ACC: mean validation accuracy over all tasks after the last one) is what the method rows
# above use. Quadratic rules are searched with SGD and with Adam: SGD on a quadratic penalty
# is unstable for elements with lr * strength * omega~ > 1 + momentum (omega~ = omega / its mean; its tail reaches
# 100x-500x the mean), Adam's per-element step size is not.
_SGD = {"optim.name": ["sgd"], "optim.lr": [0.05]}
_ADAM = {"optim.name": ["adam"], "optim.lr": [0.001]}
SEARCH: dict[str, dict[str, list[dict[str, list]]]] = {
    "permuted10": {
        # the default's growth share (the winner is the preset's grow.min_free), then the former default (the
        # prune-retrain loop at a fixed width, its winner of the earlier search) for reference
        "anpyc": [{"grow.min_free": [0.125, 0.25, 0.375, 0.5, 0.75]},
                  {"grow.enabled": [False]},
                  {"prune.mode": ["guarded"], "prune.tolerance": [0.02], "prune.max_ratio": [0.9],
                   "prune.retrain_epochs": [4], "grow.enabled": [False]}],
        "anpyc-element": [{"prune.tolerance": [0.01, 0.02, 0.03], "prune.max_ratio": [0.99],
                           "prune.retrain_epochs": [4], "prune.geometric": [False], "prune.step": [0.2]},
                          {"prune.tolerance": [0.02], "prune.max_ratio": [0.98], "prune.retrain_epochs": [2],
                           "prune.geometric": [False], "prune.step": [0.2]},
                          {"prune.tolerance": [0.01, 0.02], "prune.max_ratio": [0.99], "prune.retrain_epochs": [4],
                           "prune.geometric": [True], "prune.step": [0.5]}],
        "anpyc-soft": [{"consolidation.strength": [1.0, 10.0, 100.0, 1000.0]}],
        "finetune": [{"optim.lr": [0.01, 0.05]}],
        "joint": [{"optim.lr": [0.01, 0.05]}],
        "ewc": [{**_SGD, "consolidation.strength": [0.001, 0.003, 0.01, 0.1, 1.0, 10.0]},
                {**_ADAM, "consolidation.strength": [0.001, 0.003, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]}],
        "mas": [{**_SGD, "consolidation.strength": [0.0003, 0.001, 0.01, 0.1, 1.0, 10.0]},
                {**_ADAM, "consolidation.strength": [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]}],
        "si": [{**_SGD, "consolidation.strength": [0.0001, 0.0003, 0.001, 0.01, 0.1, 1.0, 10.0]},
               {**_ADAM, "consolidation.strength": [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]}],
        "packnet": [{"prune.first_ratio": [0.5, 0.75, 0.9]}],
        "paper": [{"consolidation.strength": [0.07, 0.7]}],
    },
    # The CNN suites: the quadratic baselines again (their permuted-MNIST winners, tuned on an MLP, forgot more than
    # fine-tuning here); anpyc keeps its permuted10 settings. split-mnist uses these winners too.
    "split-digits": {**{m: [{"optim.name": ["sgd"], "optim.lr": [0.01],
                             "consolidation.strength": [0.001, 0.01, 0.1, 1.0]},
                            {**_ADAM, "consolidation.strength": [1.0, 10.0, 100.0, 1000.0, 10000.0]}]
                        for m in ("ewc", "mas", "si")}},
    # 50 tasks: how much each task keeps decides what is left for the tasks after it, so the capacity settings are
    # searched again on this stream's own validation splits (the 10-task winners are among the points)
    "permuted50": {
        "anpyc": [{"prune.tolerance": [0.02], "prune.max_ratio": [0.9], "prune.retrain_epochs": [4],
                   "prune.geometric": [False], "prune.step": [0.2]},
                  {"prune.tolerance": [0.02], "prune.max_ratio": [0.95], "prune.retrain_epochs": [4],
                   "prune.geometric": [True], "prune.step": [0.5]},
                  {"prune.tolerance": [0.03, 0.05], "prune.max_ratio": [0.99], "prune.retrain_epochs": [4],
                   "prune.geometric": [True], "prune.step": [0.5]}],
        "anpyc-element": [{"prune.tolerance": [0.01], "prune.max_ratio": [0.99], "prune.retrain_epochs": [4],
                           "prune.geometric": [False], "prune.step": [0.2]},
                          {"prune.tolerance": [0.01, 0.02, 0.03], "prune.max_ratio": [0.99],
                           "prune.retrain_epochs": [4], "prune.geometric": [True], "prune.step": [0.5]}],
        "packnet": [{"prune.first_ratio": [0.75, 0.9, 0.95, 0.97, 0.98]}],
    },
}


def grid(space: list[dict[str, list]]) -> list[dict[str, Any]]:
    points = []
    for block in space:
        keys = list(block)
        points += [dict(zip(keys, values)) for values in itertools.product(*(block[k] for k in keys))]
    return points


def specs(suite: Suite, method: str, seeds: list[int], *, quick: bool, point: dict | None = None) -> list[RunSpec]:
    """Runs of one row, or of one search ``point``: a point is laid over the method's preset and the suite's budget
    settings, never over the row's overrides, so it means the same run whichever point won."""
    m = suite.methods[method]
    backbone, bkw = suite.backbone, dict(suite.backbone_kwargs)
    if m.backbone_kwargs is not None:
        bkw = dict(m.backbone_kwargs)
    stream_kwargs = dict(suite.stream_kwargs)
    overrides = {**(m.overrides if point is None else point), **suite.common}
    if quick:
        stream_kwargs.update(suite.quick_stream)
        if suite.quick_backbone is not None:
            backbone, qkw = suite.quick_backbone
            bkw = {**qkw, **({"dropout": bkw["dropout"]} if "dropout" in bkw else {})}
        overrides.update(QUICK)
    return [RunSpec(suite=suite.name, method=method, preset=m.preset, stream=suite.stream, backbone=backbone,
                    seed=s, overrides=overrides, stream_kwargs=stream_kwargs, backbone_kwargs=bkw) for s in seeds]
