"""The prune loop's contract: the strategy registry, a strategy's typed state, and what it needs from the learner.

A task claims every free unit when it starts; a *strategy* decides what it keeps (docs/method.md, section 4).
Strategies are registered classes (:data:`PRUNING`): each declares what it needs from the learner up front
(:meth:`Strategy.dense_epochs`: how many of the task's epochs the learner trains before handing over) and runs on
two narrow views of one task:

* :class:`Ownership` -- the task's units: its claim, their importance, its capacity budget, releasing units, and
  snapshots to roll a release back;
* :class:`Training` -- the task's training: its epochs, retraining, BatchNorm recalibration, the per-sample
  evidence the guard judges on, checkpoints and events.

A strategy's progress is a :class:`PruneState` (a dataclass per strategy, versioned), saved in every checkpoint, so
an interrupted loop resumes at the step it was on. The strategies: ``gradual`` (the default,
:mod:`~anpyc.pruning.gradual`), ``search`` (:mod:`~anpyc.pruning.search`), ``guarded``, ``schedule`` and ``none``
(:mod:`~anpyc.pruning.strategies`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import torch

from ..config import PruneConfig
from ..errors import StateFileError
from ..events import PruneStep
from ..registry import Registry

__all__ = ["PRUNING", "Strategy", "PruneState", "Ownership", "Training", "PruneHost", "select_release", "tolerance",
           "STATE_VERSION"]

PRUNING: Registry = Registry("pruning mode")
STATE_VERSION = 1


class Ownership(Protocol):
    """The task's units, as a strategy sees them."""

    def claim(self) -> torch.Tensor: ...                      # bool mask of the units the task owns now
    def unit_scores(self) -> torch.Tensor: ...                # importance of every unit on the task, now
    def unit_groups(self) -> tuple[torch.Tensor, int]: ...    # group index of every unit, number of groups
    def budget(self) -> tuple[torch.Tensor, int]: ...         # units the task may keep per group and in total
    def needed(self) -> torch.Tensor: ...                     # units it must keep per group (group minimums)
    def releasable(self, order: torch.Tensor, count: int) -> torch.Tensor: ...  # pick units, minimums kept
    def release(self, units: torch.Tensor) -> None: ...       # back to the free pool (indices or a bool mask)
    def snapshot(self) -> object: ...                         # the task's weights, owners, head and statistics
    def restore(self, snap: object) -> None: ...


class Training(Protocol):
    """The task's training and its measurements, as a strategy sees them."""

    def epochs(self) -> int: ...                               # the task's training epochs
    def train_epoch(self, epoch: int) -> None: ...             # training epoch ``epoch``, under the task's masks
    def retrain(self, step: int) -> None: ...                  # ``prune.retrain_epochs`` after prune step ``step``
    def retrain_until(self, step: int, stop: Callable[[], bool], pull_from: object) -> int: ...  # epochs run
    def recalibrate(self) -> None: ...                         # re-estimate the task's BatchNorm statistics
    def val_accuracy(self) -> float: ...
    def val_size(self) -> int: ...
    def val_correct(self) -> torch.Tensor: ...                 # per-sample correctness on the validation set
    def evidence_correct(self, val: torch.Tensor | None = None) -> torch.Tensor: ...  # plus training samples
    def checkpoint(self, state: "PruneState") -> None: ...     # commit the learner with the strategy's state
    def log(self, event: PruneStep) -> None: ...               # the host fills in the task id


class PruneHost(Ownership, Training, Protocol):
    """One object that is both views (the learner's :class:`~anpyc.pruning.host.LearnerHost`, a test's fake)."""


@dataclass
class PruneState:
    """What every strategy records: the units it ``claim``-ed, how many are ``released`` so far, the prune steps
    ``taken`` (their records in ``steps``), the task's validation accuracy before pruning (``a0``), ``done``.
    A strategy with more to remember subclasses it. Reads like the dict it is saved as (``state["released"]``)."""

    claim: int
    a0: float | None = None
    released: int = 0
    taken: int = 0
    done: bool = False
    steps: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneState":
        """The state a checkpoint saved; a state written before states were versioned (its step counter was ``k``)
        reads the same."""
        d = dict(d)
        version = d.pop("version", None)
        if version not in (None, STATE_VERSION):
            raise StateFileError(f"the prune state has version {version!r}, this anpyc reads {STATE_VERSION}",
                                 "resume with the anpyc version that wrote it")
        if "k" in d:
            d["taken"] = d.pop("k")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**cls.legacy({k: v for k, v in d.items() if k in names or k in cls.LEGACY}))
        except TypeError as e:
            raise StateFileError(f"the prune state does not fit the {cls.__name__} ({e})",
                                 "restore the run directory, or re-train the task") from None

    LEGACY: ClassVar[tuple[str, ...]] = ()  # keys of older states that :meth:`legacy` renames

    @classmethod
    def legacy(cls, d: dict[str, Any]) -> dict[str, Any]:
        return d

    def record(self, training: Training, record: dict[str, Any], *, val_acc: float, accepted: bool) -> None:
        """Append a prune step's ``record``, log it as a :class:`PruneStep` event and count it."""
        record = {"k": self.taken, **record}
        self.steps.append(record)
        training.log(PruneStep(k=self.taken, released=record["released"], val_acc=val_acc, accepted=accepted,
                               claim=self.claim, released_total=self.released,
                               extra={key: v for key, v in record.items()
                                      if key not in PruneStep.__dataclass_fields__}))
        self.taken += 1


class Strategy:
    """A pruning strategy (registered in :data:`PRUNING` under its ``name``)."""

    name: ClassVar[str] = ""
    state_type: ClassVar[type[PruneState]] = PruneState

    def dense_epochs(self, cfg: PruneConfig, epochs: int) -> int:
        """The task's epochs the learner trains before it hands over to :meth:`run` (all of them by default: the
        strategy prunes after training)."""
        return epochs

    def start(self, own: Ownership, a0: float | None) -> PruneState:
        """The state of a task that has not started pruning."""
        return self.state_type(claim=int(own.claim().sum()), a0=a0)

    def state(self, saved: dict[str, Any] | None, own: Ownership, a0: float | None) -> PruneState:
        """The state to run with: the one a checkpoint saved, or a fresh one."""
        return self.state_type.from_dict(saved) if saved else self.start(own, a0)

    def run(self, own: Ownership, training: Training, cfg: PruneConfig, state: PruneState, *,
            task_index: int) -> PruneState:
        raise NotImplementedError


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: register one instance of ``cls`` under ``cls.name`` (its docstring's first line is its
    help)."""
    PRUNING.register(cls.name, cls(), help=(cls.__doc__ or "").strip().splitlines()[0])
    return cls


def select_release(own: Ownership, count: int) -> torch.Tensor:
    """The ``count`` least important units of the claim that may be released (group minimums respected)."""
    scores = own.unit_scores()
    claim = own.claim()
    order = torch.argsort(torch.where(claim, scores, torch.full_like(scores, math.inf)), stable=True)
    order = order[: int(claim.sum())]
    return own.releasable(order, count)


def tolerance(cfg: PruneConfig, val_size: int) -> float:
    """The allowed validation-accuracy drop: ``cfg.tolerance``, but never less than one validation sample (a
    tolerance finer than the validation set can measure would reject every step)."""
    return max(cfg.tolerance, 1.0 / max(val_size, 1) + 1e-9)
