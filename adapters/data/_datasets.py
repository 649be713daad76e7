"""Map-style datasets over in-memory arrays, and the seeded stratified split every stream uses.

All datasets yield ``(float32 tensor, int label)``. Rows (and, for vectors, a feature permutation) are index views
into shared base tensors, so tasks that reuse the same data (permuted, split) cost no copies.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from anpyc.errors import ConfigError, clip


# The largest value of each option: beyond them a stream is no benchmark but a memory bomb (a run's data.json,
# which anyone may have written, is read back through here by eval and --resume).
OPTION_CAPS = {"img_size": 4096, "num_tasks": 1000, "classes_per_task": 1000, "samples_per_class": 100_000,
               "dim": 1 << 24}
# Streams encode a small source once into memory (precompute) only when it fits in this many bytes; a larger one
# encodes per item, same values.
PRECOMPUTE_BYTES = 1 << 30


def positive_int(name: str, value: object) -> int:
    """A stream option that must be a positive integer (``num_tasks``, ``limit``, ``img_size``, ...), at most its
    :data:`OPTION_CAPS` entry."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {clip(repr(value), 40)}", f"pass e.g. {name}=4")
    high = OPTION_CAPS.get(name)
    if high is not None and value > high:
        raise ConfigError(f"{name} is {clip(value, 30)}, more than {high:,}", f"pass {name} <= {high}")
    return int(value)

__all__ = [
    "MemoryDataset",
    "ImageArrayDataset",
    "LazyDataset",
    "VectorEncoder",
    "carve_counts",
    "stratified_split",
    "vectorize",
    "positive_int",
]


def _long(values: np.ndarray | torch.Tensor | Sequence[int]) -> torch.Tensor:
    """A fresh int64 tensor (copies, so read-only numpy arrays are fine)."""
    if isinstance(values, torch.Tensor):
        return values.to(torch.long)
    return torch.tensor(np.asarray(values), dtype=torch.long)


class MemoryDataset(Dataset):
    """``inputs[rows[i]]`` (optionally with its features permuted by ``perm``) and ``labels[i]``.

    ``inputs`` is a shared base tensor (N, ...); ``rows`` selects and orders the samples of this dataset (default:
    all of them); ``labels`` is aligned with ``rows``; ``perm`` reorders the last dimension of flat vectors.
    ``source_rows`` records where each item came from in its source arrays (default: ``rows``).
    """

    in_memory = True  # batches are built in the training process (anpyc.loading)

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        rows: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
        source_rows: torch.Tensor | None = None,
    ):
        rows = torch.arange(len(inputs)) if rows is None else _long(rows)
        labels = _long(labels)
        if len(labels) != len(rows):
            raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
        self.inputs, self.labels, self.rows, self.perm = inputs, labels, rows, perm
        self.source_rows = rows if source_rows is None else _long(source_rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.inputs[self.rows[i]]
        if self.perm is not None:
            x = x[self.perm]
        return x, int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole dataset as one batch ``(x, y)`` (a copy)."""
        x = self.inputs[self.rows]
        return (x[:, self.perm] if self.perm is not None else x), self.labels.clone()


class ImageArrayDataset(Dataset):
    """uint8 images ``(N, H, W)`` ("L") or ``(N, H, W, 3)`` ("RGB"), decoded per item through PIL.

    Each item takes the path of a user's image file: array -> ``PIL.Image`` -> optional rotation (bilinear, black
    fill) -> ``encode`` (an eval transform or :func:`vectorize`'s per-image form).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: torch.Tensor,
        rows: np.ndarray | torch.Tensor,
        encode: Callable[[Image.Image], torch.Tensor],
        *,
        angle: float = 0.0,
    ):
        self.images, self.encode, self.angle = images, encode, float(angle)
        self.rows, self.labels = _long(rows), _long(labels)
        if len(self.labels) != len(self.rows):
            raise ValueError(f"{len(self.labels)} labels for {len(self.rows)} rows")

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> Image.Image:
        """The PIL image of item ``i`` exactly as it is encoded (after the rotation, if any)."""
        img = Image.fromarray(self.images[int(self.rows[i])])
        return img.rotate(self.angle, resample=Image.Resampling.BILINEAR) if self.angle else img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.encode(self.image(i)), int(self.labels[i])

    def precompute(self) -> MemoryDataset:
        """Encode every item once into memory."""
        if len(self) == 0:
            raise ValueError("cannot precompute an empty dataset")
        x = torch.stack([self.encode(self.image(i)) for i in range(len(self))])
        return MemoryDataset(x, self.labels, source_rows=self.rows)


class LazyDataset(Dataset):
    """A dataset of known length that is built on first access (e.g. one rotated task of a long stream)."""

    def __init__(self, length: int, build: Callable[[], Dataset]):
        self._length, self._build, self._data = length, build, None

    @property
    def data(self) -> Dataset:
        if self._data is None:
            self._data = self._build()
            if len(self._data) != self._length:
                raise RuntimeError(f"lazy dataset built {len(self._data)} items, expected {self._length}")
        return self._data

    def __len__(self) -> int:
        return self._length

    @property
    def in_memory(self) -> bool:
        from anpyc.loading import in_memory

        return in_memory(self.data)

    def __getitem__(self, i: int):
        return self.data[i]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.tensors()


def vectorize(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 images (..., H, W) -> flat float32 vectors (..., H*W): ``(pixel / 255 - mean) / std``.

    The same arithmetic serves a whole array at once and one decoded image, so both give identical vectors.
    """
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(torch.float32).div_(255.0)
    x = x.sub_(mean).div_(std)
    return x.reshape(*x.shape[:-2], -1)


class VectorEncoder:
    """Per-image form of :func:`vectorize` (a picklable callable for :class:`ImageArrayDataset`)."""

    def __init__(self, mean: float, std: float):
        self.mean, self.std = float(mean), float(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return vectorize(np.asarray(img.convert("L")), self.mean, self.std)

    def __repr__(self) -> str:
        return f"VectorEncoder(mean={self.mean}, std={self.std})"


def carve_counts(n: int, fractions: Sequence[float], min_per_part: int = 0) -> list[int]:
    """How many of ``n`` items of one class each carved part takes: ``round(n * f)``, at least ``min_per_part``."""
    return [max(int(round(n * f)), min_per_part) if f > 0 else 0 for f in fractions]


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int | Sequence[int], *, min_per_class: int = 0
) -> list[np.ndarray]:
    """Seeded stratified split of ``range(len(labels))`` into ``[rest, *carved]``.

    Carved part ``j`` takes ``round(n_c * fractions[j])`` items of every class ``c`` (at least ``min_per_class`` when
    its fraction is > 0); ``rest`` keeps the others. Each part is returned in interleaved class order, so any
    prefix of it (``limit``) stays close to class-balanced.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[tuple[float, np.ndarray]]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        counts = carve_counts(len(idx), fractions, min_per_class)
        if sum(counts) > len(idx):
            raise ValueError(f"class {c} has {len(idx)} items, too few to carve {counts}")
        bounds = np.cumsum([0, *counts])
        chunks = [idx[bounds[-1] :]] + [idx[bounds[j] : bounds[j + 1]] for j in range(len(counts))]
        for part, chunk in zip(parts, chunks, strict=True):
            part.append((float(c), chunk))
    out = []
    for part in parts:
        keys = [((np.arange(len(ch)) + 0.5) / max(len(ch), 1), np.full(len(ch), c)) for c, ch in part]
        if not keys:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        pos = np.concatenate([k[0] for k in keys])
        cls = np.concatenate([k[1] for k in keys])
        idx = np.concatenate([ch for _, ch in part]).astype(np.int64)
        out.append(idx[np.lexsort((cls, pos))])
    return out
