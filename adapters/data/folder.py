"""Your own images as a task stream: a folder tree (ImageFolder layout per task and split) or a manifest file.

Folder layout (task order = sorted task folder names; class names = sorted class folder names)::

    root/
      task_a/
        train/<class>/<image files>      required
        val/<class>/<image files>        optional: else carved from train (val_fraction, stratified, seeded)
        test/<class>/<image files>       optional: else carved from train (test_fraction, stratified, seeded)
      task_b/...

Both carved splits come out of the original train images: with neither val/ nor test/, train keeps
``1 - val_fraction - test_fraction`` of every class. A carved split takes ``round(n * fraction)`` images of every
class, at least one; train must keep at least one, so each class then needs 2 (or 3 with both carved) images.
A fraction of 0 carves nothing (the split is then ``None``). The class folders of a task must be the same in every
split. Hidden files and folders (".name") are ignored; any other file must be an image PIL can read.

Manifest (CSV with a header, or JSON: a list of objects) with the fields ``task,split,path,label``; ``split`` is
train/val/test, ``path`` is relative to the manifest's folder (or absolute), ``label`` is the class name. Task order
is the order of first appearance; carving and class rules are the same as for folders.

Images are decoded with PIL and encoded by ``eval_transform`` (val, test, and train without augmentation) or
``train_transform(spec, augment=True)``. ``cache`` (default: when the encoded tensors fit in 512 MiB) decodes and
encodes every deterministic split once, up front; otherwise images are decoded per item.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from anpyc.errors import DataError
from anpyc.task import InputSpec, Task, TaskStream

from ._datasets import carve_counts, stratified_split
from ._source import SPLITS
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = ["folder_stream", "manifest_stream", "ImageFileDataset", "IMAGE_EXTENSIONS", "CACHE_BYTES"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
CACHE_BYTES = 512 * 2**20
MANIFEST_FIELDS = ("task", "split", "path", "label")

ClassFiles = dict[str, list[Path]]  # class name -> image files


def _open_image(path: Path) -> Image.Image:
    """Decode ``path`` fully; a file PIL cannot read raises a DataError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"{path} is not a readable image ({type(e).__name__}: {e})", "remove it or replace it with a valid image"
        ) from None


class ImageFileDataset(Dataset):
    """Image files with labels, decoded per item through ``transform`` or encoded once (``cache=True``)."""

    def __init__(self, paths: list[Path], labels: list[int], transform: Callable, *, cache: bool = False):
        if len(paths) != len(labels):
            raise ValueError(f"{len(labels)} labels for {len(paths)} paths")
        self.paths, self.labels, self.transform = list(paths), torch.as_tensor(labels, dtype=torch.long), transform
        self._cache = torch.stack([transform(_open_image(p)) for p in self.paths]) if cache and self.paths else None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def in_memory(self) -> bool:
        """Cached: batches are built in the training process; decoded per item: by worker processes."""
        return self._cache is not None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self._cache[i] if self._cache is not None else self.transform(_open_image(self.paths[i]))
        return x, int(self.labels[i])


# ----------------------------------------------------------------------------------------------- scanning


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _check_image_file(path: Path) -> None:
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(
            f"{path} is not an image file (extension {path.suffix or 'none'!r})",
            f"remove it; image files end in {', '.join(IMAGE_EXTENSIONS)}",
        )
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018  (reads the header only)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(
            f"{path} is not a readable image ({type(e).__name__})", "remove it or replace it with a valid image"
        ) from None


def _scan_split(split_dir: Path) -> ClassFiles:
    """``split_dir/<class>/<files>`` -> class name -> sorted image files (checked to be readable images)."""
    entries = sorted(p for p in split_dir.iterdir() if _visible(p))
    loose = [p.name for p in entries if not p.is_dir()]
    if loose:
        raise DataError(
            f"{split_dir} holds files ({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}) "
            "outside class folders",
            f"move them into one folder per class: {split_dir}/<class name>/<image>",
        )
    classes: ClassFiles = {}
    for class_dir in entries:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not _hidden_below(p, class_dir))
        if not files:
            raise DataError(f"class folder {class_dir} is empty", "add images to it or remove the folder")
        for f in files:
            _check_image_file(f)
        classes[class_dir.name] = files
    return classes


def _hidden_below(path: Path, top: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(top).parts)


def _task_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist", "pass the folder that holds one folder per task")
    tasks = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if (root / "train").is_dir():
        raise DataError(
            f"{root} holds train/ directly, but the root must hold one folder per task",
            f"move train/ (and val/, test/) into a task folder, e.g. {root / 'task1'}/train",
        )
    if not tasks:
        raise DataError(f"{root} holds no task folders", "add one folder per task, each with train/<class>/<images>")
    return tasks


# ----------------------------------------------------------------------------------------------- building


def _default_spec(img_size: int, input_spec: InputSpec | None) -> InputSpec:
    if input_spec is not None:
        if not isinstance(input_spec, InputSpec) or input_spec.kind != "image":
            raise DataError("input_spec must be an InputSpec of kind 'image'", "build one with input_spec_for(...)")
        eval_transform(input_spec)  # validates it
        return input_spec
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise DataError(f"img_size must be a positive number of pixels, got {img_size!r}", "pass e.g. img_size=32")
    return InputSpec("image", (3, img_size, img_size), IMAGENET_MEAN, IMAGENET_STD, "bilinear", 1.0, "RGB")


def _check_fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise DataError(f"{name} must be in [0, 1), got {value!r}", f"pass e.g. {name}=0.1")
    return float(value)


def _carve(task: str, train: ClassFiles, fractions: dict[str, float], seed: int, task_id: int) -> dict[str, ClassFiles]:
    """Split the train files of every class into train plus the carved splits (keys of ``fractions``)."""
    names = list(fractions)
    fr = [fractions[s] for s in names]
    for cls, files in train.items():
        taken = sum(carve_counts(len(files), fr, 1))
        if taken >= len(files):
            raise DataError(
                f"task {task!r}: class {cls!r} has {len(files)} training image(s), "
                f"too few to carve {' and '.join(names)}",
                f"add images, or add {'/ and '.join(names)}/ folders to the task",
            )
    paths = [p for files in train.values() for p in files]
    labels = np.array([i for i, files in enumerate(train.values()) for _ in files])
    parts = stratified_split(labels, fr, [seed, task_id], min_per_class=1)
    classes = list(train)
    out = {}
    for split, idx in zip(["train", *names], parts, strict=True):
        carved: ClassFiles = {c: [] for c in classes}
        for i in sorted(idx):
            carved[classes[labels[i]]].append(paths[i])
        out[split] = carved
    return out


def _build_task(
    task_id: int,
    name: str,
    given: Mapping[str, ClassFiles],
    spec: InputSpec,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    augment: bool,
    cache: bool,
    where: str,
) -> Task:
    if "train" not in given:
        raise DataError(f"task {name!r} has no train split ({where})", "add train/<class>/<images> for the task")
    if not given["train"]:
        raise DataError(f"task {name!r} has no training images ({where})", "add train/<class>/<images> for the task")
    classes = sorted(given["train"])
    for split, files in given.items():
        if sorted(files) != classes:
            raise DataError(
                f"task {name!r}: classes of {split} {sorted(files)} differ from those of train {classes}",
                "use the same class folders (labels) in every split of a task",
            )
    carve = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in given and f > 0}
    splits = dict(given)
    if carve:
        splits.update(_carve(name, given["train"], carve, seed, task_id))
    index = {c: i for i, c in enumerate(classes)}
    datasets: dict[str, Any] = {}
    for split in SPLITS:
        if split not in splits:
            datasets[split] = None
            continue
        files = splits[split]
        paths = [p for c in classes for p in files[c]]
        labels = [index[c] for c in classes for _ in files[c]]
        augmenting = augment and split == "train"
        tf = train_transform(spec, augment=True, hflip=0.5) if augmenting else eval_transform(spec)
        datasets[split] = ImageFileDataset(paths, labels, tf, cache=cache and not augmenting)
    meta = {
        "source": where,
        "carved": sorted(carve),
        "counts": {s: len(d) for s, d in datasets.items() if d is not None},
    }
    return Task(task_id, name, tuple(classes), **datasets, meta=meta)


def _auto_cache(cache: bool | None, num_images: int, spec: InputSpec) -> bool:
    if cache is not None:
        return bool(cache)
    return num_images * int(np.prod(spec.shape)) * 4 <= CACHE_BYTES


def folder_stream(
    root: str | os.PathLike,
    *,
    img_size: int = 32,
    input_spec: InputSpec | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    augment: bool = False,
    cache: bool | None = None,
) -> TaskStream:
    """A stream from ``root/<task>/{train,val,test}/<class>/<images>`` (see the module docstring).

    ``input_spec`` (e.g. ``input_spec_for(model, 64)``) replaces the default: RGB at ``img_size``, ImageNet
    mean/std, bilinear, crop_pct 1.0.
    """
    root = Path(root).expanduser()
    spec = _default_spec(img_size, input_spec)
    val_fraction, test_fraction = (
        _check_fraction("val_fraction", val_fraction),
        _check_fraction("test_fraction", test_fraction),
    )
    scanned = []
    for task_dir in _task_dirs(root):
        if not (task_dir / "train").is_dir():
            raise DataError(f"task folder {task_dir} has no train/ folder", f"add {task_dir}/train/<class>/<images>")
        given = {s: _scan_split(task_dir / s) for s in SPLITS if (task_dir / s).is_dir()}
        if not given["train"]:
            raise DataError(
                f"task folder {task_dir} is empty: train/ holds no class folders",
                f"add {task_dir}/train/<class>/<images>, or remove the task folder",
            )
        scanned.append((task_dir, given))
    total = sum(len(files) for _, given in scanned for split in given.values() for files in split.values())
    use_cache = _auto_cache(cache, total, spec)
    tasks = [
        _build_task(
            t,
            d.name,
            given,
            spec,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            augment=augment,
            cache=use_cache,
            where=str(d),
        )
        for t, (d, given) in enumerate(scanned)
    ]
    return TaskStream.of(f"folder:{root.name}", tasks, spec)


# ----------------------------------------------------------------------------------------------- manifest


def _manifest_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist", "pass the path of a .csv or .json manifest")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in MANIFEST_FIELDS if c not in fields]
            if missing:
                raise DataError(
                    f"manifest {path} lacks column(s) {', '.join(missing)}",
                    f"start it with the header line {','.join(MANIFEST_FIELDS)}",
                )
            return [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    if suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"manifest {path} is not valid JSON ({e})", "fix the JSON syntax") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise DataError(
                f"manifest {path} must be a JSON list of objects",
                'write [{"task": ..., "split": ..., "path": ..., "label": ...}, ...]',
            )
        for i, r in enumerate(records):
            missing = [c for c in MANIFEST_FIELDS if c not in r]
            if missing:
                raise DataError(
                    f"manifest {path} record {i} lacks {', '.join(missing)}",
                    f"give every record the fields {', '.join(MANIFEST_FIELDS)}",
                )
        return records
    raise DataError(f"manifest {path} has an unsupported extension {path.suffix!r}", "use a .csv or .json manifest")


def manifest_stream(
    path: str | os.PathLike,
    *,
    img_size: int = 32,
    input_spec: InputSpec | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    augment: bool = False,
    cache: bool | None = None,
) -> TaskStream:
    """A stream from a manifest of ``task,split,path,label`` records (see the module docstring)."""
    path = Path(path).expanduser()
    spec = _default_spec(img_size, input_spec)
    val_fraction, test_fraction = (
        _check_fraction("val_fraction", val_fraction),
        _check_fraction("test_fraction", test_fraction),
    )
    records = _manifest_records(path)
    if not records:
        raise DataError(f"manifest {path} has no records", "add one row per image: task,split,path,label")
    tasks: dict[str, dict[str, ClassFiles]] = {}
    for i, r in enumerate(records):
        row = f"manifest {path} record {i + 1}"
        task, split, file, label = (str(r[c]).strip() if r[c] is not None else "" for c in MANIFEST_FIELDS)
        if split not in SPLITS:
            raise DataError(f"{row} has unknown split {split!r}", f"use one of: {', '.join(SPLITS)}")
        if not task or not file or not label:
            raise DataError(f"{row} has an empty task, path or label", "fill in every field of every record")
        image = Path(file).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DataError(f"{row}: image {image} does not exist", "fix the path (relative to the manifest's folder)")
        _check_image_file(image)
        tasks.setdefault(task, {}).setdefault(split, {}).setdefault(label, []).append(image)
    use_cache = _auto_cache(cache, len(records), spec)
    built = [
        _build_task(
            t,
            name,
            given,
            spec,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            augment=augment,
            cache=use_cache,
            where=str(path),
        )
        for t, (name, given) in enumerate(tasks.items())
    ]
    return TaskStream.of(f"manifest:{path.stem}", built, spec)
