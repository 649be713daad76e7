"""The method's promise checked while a run goes, not only in the tests: an earlier task computes what it computed.

When a task ends, the learner records its outputs on a small fixed probe batch (seeded noise of the input's shape,
kept in the run, so every later check feeds the same inputs). After every operation that rewrites state the tasks
share -- the growth of a group, the re-initialisation of the units a new task claims, a task's training, pruning and
BatchNorm recalibration -- every recorded task runs again:

* under a hard freeze (``consolidation.rule = "hard"`` with per-task masks) the promise is exactness: the task's
  physically sliced subnetwork (what its export is made from) gives bit-identical outputs, and the masked dense model
  that evaluation and training use agrees with it within the exactness tolerance (NaN or inf never does). A
  violation raises :class:`~anpyc.errors.InvariantViolation`, naming the task and the operation, before anything is
  saved: the run directory keeps its last good generation and the run exits non-zero. A user never reads a
  forgetting figure from a method that promises none;
* the other rules (fine-tuning, joint training, the quadratic penalties, the paper's whole-network inference) keep
  changing shared weights by design: the largest change of each task's outputs is measured and reported
  (``drift`` in the task's record and its ``task_end`` event).

The record is ``probes.safetensors`` in every generation (format ``anpyc.probes``); a run written before it existed
starts recording at its next task end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn

from .config import LearnerConfig
from .errors import InvariantViolation, StateFileError, clip
from .structure.walk import close

__all__ = ["Probes", "ProbeSource", "check_tasks", "promises_exactness", "PROBE_SIZE", "PROBES_FORMAT"]

PROBE_SIZE = 4  # inputs: enough to see any change of a task's function, small enough to store at 224 px
PROBES_FORMAT = "anpyc.probes"


def promises_exactness(config: LearnerConfig) -> bool:
    """Whether a method promises every earlier task bit-identical outputs: a hard freeze with per-task masks."""
    return config.consolidation.rule == "hard" and config.inference != "shared"


class ProbeSource(Protocol):
    """What the check needs of a learner: its finished tasks, their sliced and masked models."""

    def task_ids(self) -> list[int]: ...                  # every finished task, in learned order (index = position)
    def subnetwork(self, task: int) -> nn.Module: ...     # the task's physically pruned model (eval mode, CPU)
    def reference_forward(self, task: int, x: torch.Tensor) -> torch.Tensor: ...  # the masked dense model's logits


@dataclass
class Probes:
    """The probe inputs and, per task index, the outputs recorded when that task ended."""

    inputs: torch.Tensor
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_shape(cls, shape: tuple[int, ...], seed: int) -> "Probes":
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn((PROBE_SIZE, *shape), generator=g))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs, **{f"outputs/{k}": v for k, v in self.outputs.items()}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], where: str) -> "Probes":
        inputs = tensors.get("inputs")
        if inputs is None or inputs.dtype != torch.float32 or tuple(inputs.shape[1:]) != tuple(shape) \
                or not 0 < inputs.shape[0] <= 64:
            dims = ", ".join(map(str, shape))
            raise StateFileError(f"probe file {where} does not hold probe inputs of shape [n, {dims}]",
                                 "restore the run directory")
        outputs = {}
        for key, v in tensors.items():
            if key == "inputs":
                continue
            head, _, index = key.partition("/")
            if head != "outputs" or not index.isdigit() or v.ndim != 2 or v.shape[0] != inputs.shape[0]:
                raise StateFileError(f"probe file {where} has an unexpected entry {clip(key, 60)!r}",
                                     "restore the run directory")
            outputs[int(index)] = v
        return cls(inputs, outputs)

    def record(self, source: ProbeSource, index: int, task: int, exact: bool) -> None:
        """Record the outputs of task ``task`` (index ``index``) as it ends: its sliced model's under a hard freeze,
        else the masked model's (the one its accuracy is measured with)."""
        self.outputs[index] = _outputs(source, task, self.inputs, exact)[0]


@torch.no_grad()
def _outputs(source: ProbeSource, task: int, x: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs to compare with the record, the masked model's outputs)``."""
    masked = source.reference_forward(task, x).detach().float().cpu()
    if not exact:
        return masked, masked
    return source.subnetwork(task)(x).detach().float().cpu(), masked


def check_tasks(source: ProbeSource, probes: Probes, operation: str, *, exact: bool) -> dict[int, float]:
    """Run every recorded task on the probe batch after ``operation``; returns the largest change of each task's
    outputs by task index. With ``exact`` a change (or masked outputs that leave the sliced ones) raises
    :class:`InvariantViolation`."""
    drift: dict[int, float] = {}
    for index, task_id in enumerate(source.task_ids()):
        ref = probes.outputs.get(index)
        if ref is None:  # recorded before the run kept probes
            continue
        y, masked = _outputs(source, task_id, probes.inputs, exact)
        if y.shape != ref.shape:
            diff = float("inf")
        else:
            diff = float((y - ref).abs().max()) if ref.numel() else 0.0
            diff = diff if bool(torch.isfinite(y).all()) else float("nan")
        drift[index] = diff
        if not exact:
            continue
        if not torch.equal(y, ref):
            raise InvariantViolation(
                f"task {task_id} changed during {operation}: its subnetwork's outputs on the probe batch moved by "
                f"{diff:.3g}, under a method that freezes it; the run stopped before saving, the last good "
                "generation is kept", "this is a bug in anpyc: report it with the run's events.jsonl; "
                                      "--no-grow or --set reinit_free=false may avoid the operation")
        ok, gap = close(y, masked)
        if not ok:
            raise InvariantViolation(
                f"task {task_id}'s masked model left its subnetwork during {operation} (max abs diff {gap:.3g}): "
                "its accuracy would be measured on a network it does not ship; the run stopped before saving, the "
                "last good generation is kept", "this is a bug in anpyc: report it with the run's events.jsonl")
    return drift
