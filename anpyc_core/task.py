"""What a continual-learning stream is made of: tasks with their data, and the input contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import AnpycError, DataError
from .validate import Fields

__all__ = ["InputSpec", "Task", "TaskStream", "check_task", "MAX_INPUT_ELEMENTS", "CROP_PCT"]

# Bounds of an input spec read from a file (run.json, a sidecar): one sample is at most 16,777,216 values (64 MiB as
# float32; 3 x 2364 x 2364 images, larger than any timm model's input), so a file cannot make a reader allocate
# more than that per sample; crop_pct within timm's use (0.875, 0.9, 0.95, 1.0, ...) with room both ways.
MAX_INPUT_ELEMENTS = 1 << 24
CROP_PCT = (0.1, 2.0)
KINDS = ("image", "vector")


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
    def from_dict(cls, d: Any, where: str = "input spec", *, error: type[AnpycError] = DataError,
                  fix: str = "pass an input spec as InputSpec.to_dict() writes it", path: str = "input_spec"
                  ) -> "InputSpec":
        """The spec a file records, every field checked (types, finite values, a sample of at most
        :data:`MAX_INPUT_ELEMENTS` values): a bad one raises ``error`` naming ``where`` and the field."""
        f = Fields(d, where, error=error, fix=fix, path=path)
        kind = f.string("kind", choices=KINDS, optional=True, default="image")
        image = kind == "image"
        shape = f.ints("shape", low=1, high=MAX_INPUT_ELEMENTS, min_len=3 if image else 1, max_len=3 if image else 4)
        if image and not 1 <= shape[0] <= 4:
            f.fail("shape", f"has {shape[0]} channels; an image has 1 to 4")
        size = 1
        for v in shape:
            size *= v
        if size > MAX_INPUT_ELEMENTS:
            f.fail("shape", f"{list(shape)} holds {size:,} values per sample, more than {MAX_INPUT_ELEMENTS:,}")
        width = shape[0] if image else MAX_INPUT_ELEMENTS
        mean = f.numbers("mean", low=-1e4, high=1e4, max_len=width, optional=True, default=[])
        std = f.numbers("std", low=1e-4, high=1e4, max_len=width, optional=True, default=[])
        if image and (len(mean) != shape[0] or len(std) != shape[0]):
            f.fail("mean", f"and std have {len(mean)} and {len(std)} values for {shape[0]} channels")
        return cls(kind=kind, shape=tuple(shape), mean=tuple(mean), std=tuple(std),
                   interpolation=f.string("interpolation", max_len=32, optional=True, default="bilinear"),
                   crop_pct=f.number("crop_pct", low=CROP_PCT[0], high=CROP_PCT[1], optional=True, default=1.0),
                   color_mode=f.string("color_mode", max_len=16, optional=True, default="RGB"))


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


def check_task(task: Any, spec: InputSpec, known: dict | None = None) -> None:
    """``task`` is an anpyc :class:`Task` with training data whose inputs match ``spec`` in every split, and with
    the classes it had when it was learned (``known``: its record, if it was)."""
    if not isinstance(task, Task):
        raise DataError(f"expected an anpyc Task, got {type(task).__name__}", "build tasks with anpyc.Task(...)")
    if task.train is None or len(task.train) == 0:
        raise DataError(f"task {task.id} ({task.name}) has no training samples", "give every task training data")
    if task.num_classes < 1:
        raise DataError(f"task {task.id} has no classes", "give every task at least one class")
    x, _ = task.train[0][:2]
    if tuple(x.shape) != tuple(spec.shape):
        raise DataError(f"task {task.id} inputs have shape {tuple(x.shape)}, the model expects {tuple(spec.shape)}",
                        "use the same input size for every task")
    if known is not None and list(known["classes"]) != list(task.classes):
        raise DataError(f"task {task.id} has {len(task.classes)} classes now but {len(known['classes'])} when it "
                        f"was trained ({known['classes'][:5]}...)", "resume with the same data and class folders")
    for split in (task.val, task.test):
        if split is not None and len(split) > 0:
            xs = split[0][0]
            if tuple(xs.shape) != tuple(spec.shape):
                raise DataError(f"task {task.id} val/test inputs have shape {tuple(xs.shape)}",
                                "use the same input size for every split")

