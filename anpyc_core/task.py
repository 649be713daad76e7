"""What a continual-learning stream is made of: tasks with their data, and the input contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["InputSpec", "Task", "TaskStream"]


@dataclass(frozen=True)
class InputSpec:
    """How raw inputs become the tensor the backbone sees; copied into every export's sidecar.

    ``kind`` is ``"image"`` (PIL image -> resize -> centre crop -> [0, 1] -> normalise) or ``"vector"``
    (a flat float vector, used as is). ``shape`` is the tensor shape without the batch dimension.
    """

    kind: str = "image"
    shape: tuple[int, ...] = (3, 32, 32)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    color_mode: str = "RGB"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "color_mode": self.color_mode,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        return cls(
            kind=str(d.get("kind", "image")),
            shape=tuple(int(v) for v in d["shape"]),
            mean=tuple(float(v) for v in d.get("mean", ())),
            std=tuple(float(v) for v in d.get("std", ())),
            interpolation=str(d.get("interpolation", "bilinear")),
            crop_pct=float(d.get("crop_pct", 1.0)),
            color_mode=str(d.get("color_mode", "RGB")),
        )


@dataclass(frozen=True)
class Task:
    """One task of a task-incremental stream: its own label space, its own head.

    ``train``/``val``/``test`` are map-style datasets yielding ``(tensor, int label)`` with labels in
    ``range(len(classes))``. ``val`` drives every decision (pruning tolerance, hyperparameters); ``test`` is only
    reported.
    """

    id: int
    name: str
    classes: tuple[str, ...]
    train: Any
    val: Any = None
    test: Any = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class TaskStream:
    """An ordered sequence of tasks sharing one input contract."""

    name: str
    tasks: tuple[Task, ...]
    input_spec: InputSpec

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    def take(self, n: int) -> "TaskStream":
        return TaskStream(self.name, tuple(self.tasks[:n]), self.input_spec)

    @staticmethod
    def of(name: str, tasks: Sequence[Task], input_spec: InputSpec) -> "TaskStream":
        return TaskStream(name, tuple(tasks), input_spec)
