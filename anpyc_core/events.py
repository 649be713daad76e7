"""What a run reports while it learns: one typed event per task start, epoch, evaluation, prune step and task end.

The learner hands every event to its callbacks (:class:`anpyc.learner.Callback`) and appends it to
``RUN/events.jsonl`` as one JSON line (:meth:`Event.to_dict`, with the time first). Producers (the loop, the pruning
strategies) and consumers (the CLI's progress display, a TensorBoard writer) share these types instead of agreeing
on dict keys; an event still reads like the dict it is written as (``event["task"]``, ``event.get("loss")``), so
callbacks written against the JSON lines keep working.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["Callback", "Event", "TaskStart", "Grow", "Epoch", "Eval", "PruneStep", "TaskEnd", "EVENTS"]


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base class: ``kind`` is the ``"event"`` field of the JSON line."""

    kind: ClassVar[str] = ""
    task: int | None = None  # the task id (a pruning strategy leaves it to its host to fill in)
    time: float | None = field(default=None, metadata={"optional": True})  # wall time, set when the learner logs it

    def to_dict(self) -> dict[str, Any]:
        """The JSON line: ``time`` (once logged) and ``event`` first, then the fields, ``extra`` merged in."""
        out: dict[str, Any] = {} if self.time is None else {"time": self.time}
        out["event"] = self.kind
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                out.update(value)
            elif f.name != "time" and (value is not None or not f.metadata.get("optional")):
                out[f.name] = value
        return out

    # read like the JSON line
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


def _optional() -> Any:
    return field(default=None, metadata={"optional": True})


@dataclass(frozen=True, kw_only=True)
class TaskStart(Event):
    kind: ClassVar[str] = "task_start"
    name: str
    index: int
    claimed_units: int


@dataclass(frozen=True, kw_only=True)
class Grow(Event):
    """Group ``group`` was widened by ``units`` units (to ``width``) before the task claimed its units."""

    kind: ClassVar[str] = "grow"
    group: str
    units: int
    width: int
    free: int  # its free units before
    reason: str


@dataclass(frozen=True, kw_only=True)
class Epoch(Event):
    """One training epoch: ``phase`` is ``train`` (before pruning) or ``retrain`` (after prune step ``step``);
    ``seconds`` its wall time, ``data_wait`` the seconds the loop waited for batches and ``data_wait_share`` their
    share of the epoch (an input-bound run has a high share: add --workers)."""

    kind: ClassVar[str] = "epoch"
    phase: str
    epoch: int
    loss: float
    train_acc: float
    penalty: float
    step: int | None = _optional()
    seconds: float | None = _optional()
    data_wait: float | None = _optional()
    data_wait_share: float | None = _optional()


@dataclass(frozen=True, kw_only=True)
class Eval(Event):
    kind: ClassVar[str] = "eval"
    phase: str
    val_acc: float


@dataclass(frozen=True, kw_only=True)
class PruneStep(Event):
    """One step of the prune loop: ``released`` units released (and kept released when ``accepted``), the
    validation accuracy after retraining, the task's claim and what is released of it so far; ``extra`` carries
    what the strategy adds (its step size or ratio, the guard's statistics)."""

    kind: ClassVar[str] = "prune_step"
    k: int
    released: int
    val_acc: float
    accepted: bool
    claim: int
    released_total: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TaskEnd(Event):
    kind: ClassVar[str] = "task_end"
    acc_row: list[float | None]
    capacity: float
    params: int
    flops: int
    drift: dict[str, float] | None = _optional()  # per earlier task id: the largest change of its probe outputs


class Callback:
    """Hooks for progress display (the learner calls them); every method is a no-op by default."""

    def on_event(self, event: Event) -> None:
        """Called for every logged event (epoch, prune step, evaluation, task start/end)."""

    def on_batch(self, phase: str, batch: int, total: int, loss: float) -> None:
        """Called after every training batch."""


EVENTS: dict[str, type[Event]] = {cls.kind: cls for cls in (TaskStart, Grow, Epoch, Eval, PruneStep, TaskEnd)}
