"""Training progress for ``anpyc train`` and ``anpyc quickstart``, driven by the learner's events.

:class:`LiveProgress` draws rich progress bars (tasks; the current train/retrain epoch with its loss; the prune loop
with the units released so far) and prints one line per finished task above them. :class:`LineProgress` prints a
few plain lines per task instead, for logs and pipes. Both are :class:`anpyc.learner.Callback` plugins: they only
read the learner's typed events (:mod:`anpyc.events`, the lines of ``RUN/events.jsonl``), so what they show is what
the run recorded.

Imported inside command bodies only (it imports torch through the learner).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from anpyc.errors import clip
from anpyc.events import Epoch, Eval, Event, PruneStep, TaskEnd, TaskStart
from anpyc.learner import Callback

__all__ = ["LiveProgress", "LineProgress", "make_progress", "task_line"]


def _pct(v: float | None) -> str:
    return "  -  " if v is None else f"{100 * v:5.1f}"


def task_line(event: TaskEnd, name: str) -> str:
    """One plain line for a finished task: the accuracy row, capacity, parameters."""
    row = event.acc_row or [None]
    earlier = " ".join(_pct(v).strip() for v in row[:-1])
    return (f"task {event.task} {name} done: test acc {_pct(row[-1]).strip()}%"
            f"{' (earlier tasks: ' + earlier + ')' if earlier else ''}, capacity used "
            f"{100 * event.capacity:.0f}%, params {event.params:,}")


def _verdict(event: PruneStep) -> str:
    return "kept" if event.accepted else "rolled back"


class _Base(Callback):
    def __init__(self, console: Console, *, num_tasks: int, epochs: int, retrain_epochs: int, done: int = 0):
        self.console = console
        self.num_tasks, self.epochs, self.retrain_epochs = num_tasks, epochs, retrain_epochs
        self.done = done
        self.names: dict[int, str] = {}
        self.last: Epoch | None = None

    def __enter__(self) -> "_Base":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class LiveProgress(_Base):
    """Three rich bars: tasks, the current epoch (fractional, per batch) and the prune loop of the current task."""

    def __init__(self, console: Console, **kw: Any):
        super().__init__(console, **kw)
        self.progress = Progress(
            TextColumn("{task.description:<20}"), BarColumn(bar_width=12), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=False,
            refresh_per_second=8,
        )
        self.tasks_bar: TaskID = self.progress.add_task("tasks", total=self.num_tasks, completed=self.done, info="")
        self.epoch_bar: TaskID = self.progress.add_task("train", total=self.epochs, info="", visible=False)
        self.prune_bar: TaskID = self.progress.add_task("prune", total=None, info="", visible=False)
        self.phase: str | None = None
        self.epochs_done = 0
        self.prune_steps = 0  # prune steps finished in the current task (the next retrain block is step number this)

    def __enter__(self) -> "LiveProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def _begin_phase(self, phase: str) -> None:
        self.phase = phase
        self.epochs_done = 0
        total = self.epochs if phase == "train" else self.retrain_epochs
        label = "  train epochs" if phase == "train" else f"  retrain (step {self.prune_steps})"
        self.progress.reset(self.epoch_bar, total=max(total, 1), completed=0, description=label, info="",
                            visible=True)

    def on_batch(self, phase: str, batch: int, total: int, loss: float) -> None:
        if phase != self.phase:
            self._begin_phase(phase)
        self.progress.update(self.epoch_bar, completed=self.epochs_done + batch / max(total, 1),
                             info=f"batch {batch}/{total} loss {loss:.3f}")

    def on_event(self, event: Event) -> None:
        p = self.progress
        if isinstance(event, TaskStart):
            self.names[event.task] = event.name
            p.update(self.tasks_bar, description=clip(f"task {event.task} {event.name}", 20),
                     info=f"{event.claimed_units:,} free units claimed")
            p.update(self.prune_bar, visible=False)
            self.phase = None
            self.prune_steps = 0
        elif isinstance(event, Epoch):
            if event.phase != self.phase:
                self._begin_phase(event.phase)
            self.epochs_done = event.epoch + 1
            label = "  train epochs" if event.phase == "train" else f"  retrain (step {event.step or 0})"
            p.update(self.epoch_bar, completed=self.epochs_done, description=label,
                     info=f"loss {event.loss:.3f} acc {event.train_acc:.3f}")
            if event.phase == "retrain" and self.epochs_done >= self.retrain_epochs:
                self.phase = None  # the next prune step starts a new retrain block
        elif isinstance(event, Eval) and event.phase == "train_end":
            p.update(self.tasks_bar, info=f"val acc after training {event.val_acc:.3f}")
            p.reset(self.prune_bar, total=None, completed=0, description="  prune (units)", info="scoring units",
                    visible=True)
        elif isinstance(event, PruneStep):
            self.prune_steps = event.k + 1
            p.update(self.prune_bar, total=max(event.claim, 1), completed=event.released_total,
                     info=f"step {event.k}: -{event.released}, val {event.val_acc:.3f}, "
                          f"{'kept' if event.accepted else 'undone'}")
        elif isinstance(event, TaskEnd):
            self.done += 1
            p.update(self.tasks_bar, completed=self.done, info="")
            p.update(self.epoch_bar, visible=False)
            p.update(self.prune_bar, visible=False)
            p.console.print(task_line(event, self.names.get(event.task, str(event.task))), markup=False,
                            highlight=False, soft_wrap=True)


class LineProgress(_Base):
    """A few plain lines per task (start, end of training, each prune step, end): for logs and pipes. Lines are
    never broken at the console width (a pipe's 80 columns would split them for grep); a terminal wraps them."""

    def on_event(self, event: Event) -> None:
        c = self.console
        if isinstance(event, TaskStart):
            self.names[event.task] = event.name
            self.last = None
            c.print(f"task {event.task} {event.name} ({self.done + 1}/{self.num_tasks}): training {self.epochs} "
                    f"epochs on {event.claimed_units:,} claimed units", markup=False, highlight=False, soft_wrap=True)
        elif isinstance(event, Epoch) and event.phase == "train":
            self.last = event
        elif isinstance(event, Eval) and event.phase == "train_end":
            loss, acc = (self.last.loss, self.last.train_acc) if self.last is not None else (float("nan"), 0.0)
            c.print(f"  trained: loss {loss:.3f}, train acc {acc:.3f}, val acc {event.val_acc:.3f}", markup=False,
                    highlight=False, soft_wrap=True)
        elif isinstance(event, PruneStep):
            c.print(f"  prune step {event.k}: released {event.released} units, val acc {event.val_acc:.3f}, "
                    f"{_verdict(event)} ({event.released_total}/{event.claim} of the claim released)", markup=False,
                    highlight=False, soft_wrap=True)
        elif isinstance(event, TaskEnd):
            self.done += 1
            c.print(task_line(event, self.names.get(event.task, str(event.task))), markup=False, highlight=False,
                    soft_wrap=True)


def make_progress(console: Console, *, live: bool, **kw: Any) -> _Base:
    """Bars on a terminal (``live``), plain lines otherwise."""
    return LiveProgress(console, **kw) if live else LineProgress(console, **kw)
