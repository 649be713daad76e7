"""An image source: uint8 images, labels, class names and fixed seeded train/val/test splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ._datasets import stratified_split

__all__ = ["ImageSource", "SPLITS", "source_from_official_split"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class ImageSource:
    """uint8 ``images`` (N, H, W) grayscale or (N, H, W, 3) RGB with int ``labels`` into ``classes``.

    ``splits`` maps "train"/"val"/"test" to row indices in interleaved class order (any prefix is close to
    class-balanced, which is how ``limit`` caps a split). ``mean``/``std`` are the normalisation constants streams
    use for it (one value for grayscale, three for RGB). ``precompute`` says whether streams encode every image
    once into memory (small offline sets) or per item (downloaded sets). ``cache`` holds encoded base tensors per
    InputSpec; they are shared by every stream built from this source, so treat them as read-only.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    splits: Mapping[str, np.ndarray]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    precompute: bool = True
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def grayscale(self) -> bool:
        return self.images.ndim == 3

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


def source_from_official_split(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: tuple[str, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    seed: int,
    val_fraction: float = 0.1,
) -> ImageSource:
    """Keep the dataset's official test set; carve ``val_fraction`` of its train set (stratified, seeded) as val."""
    (xtr, ytr), (xte, yte) = train, test
    images = np.concatenate([xtr, xte])
    labels = np.concatenate([ytr, yte]).astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    rest, val = stratified_split(ytr, (val_fraction,), seed)
    (test_rows,) = stratified_split(yte, (), seed)
    splits = {"train": rest, "val": val, "test": test_rows + len(ytr)}
    return ImageSource(name, images, labels, classes, splits, mean, std, precompute=False)
