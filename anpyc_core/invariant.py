"""The method's promise checked while a run goes, not only in the tests: an earlier task computes what it computed.

When a task ends, the learner records its outputs on a small fixed probe batch (seeded noise of the input's shape,
kept in the run, so every later check feeds the same inputs). After every operation that rewrites state the tasks
share -- the growth of a group, the re-initialisation of the units a new task claims, a task's training, pruning and
BatchNorm recalibration -- the finished tasks are checked again (:func:`check_tasks`):

* under a hard freeze (``consolidation.rule = "hard"`` with per-task masks) the promise is exactness: each task's
  physically sliced subnetwork (what its export is made from) is made of the same numbers, which one digest of
  every finished task's weights, heads and statistics proves in one pass (:func:`frozen_digest`; a mismatch runs every
  sliced subnetwork to name the task that changed), and the masked dense model that evaluation and training use
  agrees with the recorded outputs within the exactness tolerance (NaN or inf never does) for the newest task and a
  rotating sample of the others (a check costs a few forward passes, not one per task: a 255-task run stays cheap).
  A violation raises :class:`~anpyc.errors.InvariantViolation`, naming the task and the operation, before anything is
  saved: the run directory keeps its last good generation and the run exits non-zero. A user never reads a
  forgetting figure from a method that promises none;
* the other rules (fine-tuning, joint training, the quadratic penalties, the paper's whole-network inference) keep
  changing shared weights by design: the largest change of each task's outputs is measured and reported
  (``drift`` in the task's record and its ``task_end`` event).

The record is ``probes.safetensors`` in every generation (format ``anpyc.probes``); a run written before it existed
starts recording at its next task end.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn

from .config import LearnerConfig
from .errors import InvariantViolation, StateFileError, clip
from .structure.walk import close

__all__ = ["Probes", "ProbeSource", "check_tasks", "promises_exactness", "PROBE_SIZE", "PROBES_FORMAT"]

PROBE_SIZE = 4  # inputs: enough to see any change of a task's function, small enough to store at 224 px
PROBES_FORMAT = "anpyc.probes"
MASKED_PER_CHECK = 4  # earlier tasks whose masked model is run per check: the newest and a rotating sample


def promises_exactness(config: LearnerConfig) -> bool:
    """Whether a method promises every earlier task bit-identical outputs: a hard freeze with per-task masks."""
    return config.consolidation.rule == "hard" and config.inference != "shared"


class ProbeSource(Protocol):
    """What the check needs of a learner: its finished tasks, their sliced and masked models, and the parts a
    task's subnetwork is made of."""

    trunk: nn.Module
    space: Any  # the MaskSpace: which entries of which tensors a task index uses
    model: Any  # the MaskedModel: the heads
    state: Any  # the RunState: per-task statistics

    def task_ids(self) -> list[int]: ...                  # every finished task, in learned order (index = position)
    def subnetwork(self, task: int) -> nn.Module: ...     # the task's physically pruned model (eval mode, CPU)
    def reference_forward(self, task: int, x: torch.Tensor) -> torch.Tensor: ...  # the masked dense model's logits


@torch.no_grad()
def frozen_digest(source: ProbeSource, index: int) -> str:
    """sha256 of everything tasks 0..``index`` compute with: the trunk's entries their units span (in order; a growth
    inserts new entries, owned by later tasks, and changes no sequence), their heads (on the features they read) and
    their BatchNorm statistics (of the channels they use). Equal digests mean each of those tasks' sliced
    subnetworks is made of the same numbers, so it computes bit-identically."""
    space, h = source.space, hashlib.sha256()
    active = space.active(index)

    def add(name: str, t: torch.Tensor, mask: torch.Tensor | None) -> None:
        t = t.detach()
        if mask is not None:
            t = t[mask.to(t.device).expand(t.shape).bool()]
        h.update(f"{name}\0{t.dtype}\0{t.numel()}\0".encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())

    masks = space.tensor_masks(active)
    for name, p in source.trunk.named_parameters():
        add(name, p, masks.get(name))
    structure = getattr(space, "structure", None)
    features = space.feature_mask(active)
    for j in range(index + 1):
        head = source.model.heads[str(j)]
        add(f"head/{j}/weight", head.weight, None if features is None else features.bool()[None, :])
        add(f"head/{j}/bias", head.bias, None)
        stats = source.state.stats.get(j, {})
        stat_masks = structure.tensor_masks(active, set(stats)) if structure is not None else {}
        for name in sorted(stats):
            add(f"stats/{j}/{name}", stats[name], stat_masks.get(name))
    return h.hexdigest()


@dataclass
class Probes:
    """The probe inputs and, per task index, the outputs recorded when that task ended."""

    inputs: torch.Tensor
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    digest: str | None = None  # frozen_digest of the newest finished task (under a hard freeze)
    digest_index: int = -1
    checks: int = 0  # checks made in this session: rotates the tasks whose masked model is run

    @classmethod
    def for_shape(cls, shape: tuple[int, ...], seed: int) -> "Probes":
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn((PROBE_SIZE, *shape), generator=g))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs, **{f"outputs/{k}": v for k, v in self.outputs.items()}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], where: str,
                     schema: Any = None) -> "Probes":
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
        schema = schema if isinstance(schema, dict) else {}
        digest, at = schema.get("digest"), schema.get("digest_index", -1)
        if not (digest is None or (isinstance(digest, str) and len(digest) == 64)) or not isinstance(at, int) \
                or isinstance(at, bool) or not -1 <= at < len(outputs) + 1:
            raise StateFileError(f"probe file {where} has a malformed digest record", "restore the run directory")
        return cls(inputs, outputs, digest, at)

    def schema(self) -> dict[str, Any]:
        """What the probe file's metadata keeps beside the tensors."""
        return {"digest": self.digest, "digest_index": self.digest_index}

    def record(self, source: ProbeSource, index: int, task: int, exact: bool) -> None:
        """Record the outputs of task ``task`` (index ``index``) as it ends: its sliced model's under a hard freeze
        (and the digest of every task's weights so far), else the masked model's (the one its accuracy is measured
        with)."""
        self.outputs[index] = _outputs(source, task, self.inputs, exact)[0]
        if exact:
            self.digest, self.digest_index = frozen_digest(source, index), index


@torch.no_grad()
def _outputs(source: ProbeSource, task: int, x: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs to compare with the record, the masked model's outputs)``."""
    masked = source.reference_forward(task, x).detach().float().cpu()
    if not exact:
        return masked, masked
    return source.subnetwork(task)(x).detach().float().cpu(), masked


def _sample(n: int, checks: int) -> list[int]:
    """The earlier tasks whose masked model a check runs: the newest and a rotating sample, every one when few."""
    if n <= MASKED_PER_CHECK:
        return list(range(n))
    return sorted({n - 1, *(((checks * (MASKED_PER_CHECK - 1) + i) % (n - 1)) for i in range(MASKED_PER_CHECK - 1))})


def _violation(task_id: int, operation: str, diff: float) -> InvariantViolation:
    return InvariantViolation(
        f"task {task_id} changed during {operation}: its subnetwork's outputs on the probe batch moved by "
        f"{diff:.3g}, under a method that freezes it; the run stopped before saving, the last good "
        "generation is kept", "this is a bug in anpyc: report it with the run's events.jsonl; "
                              "--no-grow or --set reinit_free=false may avoid the operation")


def _diff(y: torch.Tensor, ref: torch.Tensor) -> float:
    if y.shape != ref.shape:
        return float("inf")
    diff = float((y - ref).abs().max()) if ref.numel() else 0.0
    return diff if bool(torch.isfinite(y).all()) else float("nan")


def check_tasks(source: ProbeSource, probes: Probes, operation: str, *, exact: bool) -> dict[int, float]:
    """Check every finished task after ``operation``; returns the largest change of each task's outputs on the probe
    batch, by task index.

    Under a hard freeze (``exact``) the check is exact and costs one pass over the weights: the digest of every
    earlier task's weights, heads and statistics (:func:`frozen_digest`) must be the one recorded when the newest of
    them ended (on a mismatch every task's sliced subnetwork is run to name the first that changed), and the masked
    model of the newest task and of a rotating sample of the others must agree with its recorded outputs (the network
    its accuracy is measured on). Either failure raises :class:`InvariantViolation`. Otherwise every task's masked
    model is run and its drift reported."""
    done = source.task_ids()
    if not exact:
        drift = {}
        for index, task_id in enumerate(done):
            if (ref := probes.outputs.get(index)) is not None:
                drift[index] = _diff(_outputs(source, task_id, probes.inputs, False)[0], ref)
        return drift
    if probes.digest is not None and 0 <= probes.digest_index < len(done) \
            and frozen_digest(source, probes.digest_index) != probes.digest:
        for index, task_id in enumerate(done[: probes.digest_index + 1]):
            ref = probes.outputs.get(index)
            y = _outputs(source, task_id, probes.inputs, True)[0]
            if ref is not None and not torch.equal(y, ref):
                raise _violation(task_id, operation, _diff(y, ref))
        raise InvariantViolation(
            f"the weights, heads or statistics of tasks {done[0]}..{done[probes.digest_index]} changed during "
            f"{operation}, under a method that freezes them; the run stopped before saving, the last good generation "
            "is kept", "this is a bug in anpyc: report it with the run's events.jsonl")
    for index in _sample(len(done), probes.checks):
        ref = probes.outputs.get(index)
        if ref is None:  # recorded before the run kept probes
            continue
        masked = _outputs(source, done[index], probes.inputs, False)[1]
        ok, gap = close(ref, masked)
        if not ok:
            raise InvariantViolation(
                f"task {done[index]}'s masked model left its subnetwork during {operation} (max abs diff {gap:.3g}): "
                "its accuracy would be measured on a network it does not ship; the run stopped before saving, the "
                "last good generation is kept", "this is a bug in anpyc: report it with the run's events.jsonl")
    probes.checks += 1
    return {index: 0.0 for index in range(len(done)) if index in probes.outputs}
