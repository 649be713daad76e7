"""Made-up, learnable data for fast tests and the model-coverage benchmark.

Each class of each task has its own prototype; samples are the prototype plus Gaussian noise. Image prototypes are
smooth random patterns (a random 4x4 grid per channel, bilinearly upsampled) in [0, 1]; samples are clipped to
[0, 1], stored as uint8 images and encoded through ``eval_transform`` like any user image. Vector prototypes are
uniform in [0, 1]^dim; vectors are normalised as ``(x - 0.5) / 0.3``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from anpyc.errors import ConfigError
from anpyc.task import InputSpec, Task, TaskStream

from ._datasets import ImageArrayDataset, MemoryDataset, positive_int
from .transforms import CHANNELS, eval_transform

__all__ = ["synthetic_stream", "SYNTHETIC_MEAN", "SYNTHETIC_STD"]

SYNTHETIC_MEAN, SYNTHETIC_STD = 0.5, 0.3
_GRID = 4


def _prototype_images(rng: np.random.Generator, channels: int, h: int, w: int) -> np.ndarray:
    grid = torch.from_numpy(rng.uniform(0.0, 1.0, (1, channels, _GRID, _GRID)).astype(np.float32))
    proto = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0]
    return proto.permute(1, 2, 0).numpy()  # (h, w, channels)


SYNTHETIC_VALUES = 1 << 27  # a synthetic stream is generated in memory (float64 noise, uint8, float32): ~1.5 GB at most


def synthetic_stream(
    *,
    num_tasks: int = 3,
    classes_per_task: int = 2,
    samples_per_class: int = 64,
    img_size: int = 32,
    vector: bool = False,
    dim: int = 32,
    color_mode: str = "RGB",
    input_spec: InputSpec | None = None,
    noise: float = 0.25,
    seed: int = 0,
    limit: int | None = None,
) -> TaskStream:
    """``num_tasks`` tasks of ``classes_per_task`` classes; per class ``samples_per_class`` training samples and
    ``max(2, samples_per_class // 4)`` each for val and test. ``noise`` is the noise std in [0, 1] pixel units."""
    num_tasks, k = positive_int("num_tasks", num_tasks), positive_int("classes_per_task", classes_per_task)
    n_train = positive_int("samples_per_class", samples_per_class)
    limit = None if limit is None else positive_int("limit", limit)
    if not noise >= 0:
        raise ConfigError(f"noise must be >= 0, got {noise!r}", "pass e.g. noise=0.25")
    if k < 2:
        raise ConfigError(f"classes_per_task must be at least 2, got {k}", "pass classes_per_task=2 or more")
    if vector:
        if input_spec is not None:
            raise ConfigError("vector=True takes no input_spec", "drop input_spec, or drop vector=True")
        spec = InputSpec("vector", (positive_int("dim", dim),), (SYNTHETIC_MEAN,), (SYNTHETIC_STD,), "bilinear", 1.0, "L")
    elif input_spec is not None:
        eval_transform(input_spec)  # validates it
        spec = input_spec
    else:
        if color_mode not in CHANNELS:
            raise ConfigError(f"unsupported color_mode {color_mode!r}", f"use one of: {', '.join(CHANNELS)}")
        c, size = CHANNELS[color_mode], positive_int("img_size", img_size)
        spec = InputSpec(
            "image", (c, size, size), (SYNTHETIC_MEAN,) * c, (SYNTHETIC_STD,) * c, "bilinear", 1.0, color_mode
        )

    n_eval = max(2, n_train // 4)
    per_class = n_train + 2 * n_eval
    values = num_tasks * k * per_class * int(np.prod(spec.shape))
    if values > SYNTHETIC_VALUES:
        raise ConfigError(f"a synthetic stream of {num_tasks} tasks x {k} classes x {per_class} samples of shape "
                          f"{list(spec.shape)} holds {values:,} values, more than {SYNTHETIC_VALUES:,}",
                          "pass fewer tasks, classes or samples, or a smaller img_size/dim")
    rng = np.random.default_rng(seed)
    # rows of each split, interleaved by class so that any prefix (limit) is balanced
    offsets = {"train": (0, n_train), "val": (n_train, n_eval), "test": (n_train + n_eval, n_eval)}
    split_rows = {
        s: (np.arange(k)[None, :] * per_class + start + np.arange(n)[:, None]).reshape(-1)[:limit]
        for s, (start, n) in offsets.items()
    }
    labels = torch.arange(k).repeat_interleave(per_class)
    tasks = []
    for t in range(num_tasks):
        if spec.kind == "vector":
            protos = rng.uniform(0.0, 1.0, (k, 1, spec.shape[0]))
            x = protos + noise * rng.standard_normal((k, per_class, spec.shape[0]))
            base = torch.from_numpy(((x - SYNTHETIC_MEAN) / SYNTHETIC_STD).reshape(k * per_class, -1)).float()
        else:
            c, h, w = spec.shape
            protos = np.stack([_prototype_images(rng, c, h, w) for _ in range(k)])[:, None]
            x = np.clip(protos + noise * rng.standard_normal((k, per_class, h, w, c)), 0.0, 1.0)
            images = np.round(x * 255.0).astype(np.uint8).reshape(k * per_class, h, w, c)
            images = images[..., 0] if c == 1 else images
            everything = np.arange(len(images))
            base = ImageArrayDataset(images, labels, everything, eval_transform(spec)).precompute().inputs
        splits = {s: MemoryDataset(base, labels[rows], rows=torch.from_numpy(rows)) for s, rows in split_rows.items()}
        classes = tuple(f"t{t}c{j}" for j in range(k))
        tasks.append(Task(t, f"synthetic {t}", classes, **splits, meta={"seed": seed}))
    return TaskStream.of("synthetic", tasks, spec)
