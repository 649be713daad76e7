"""Datasets fetched from the internet on request: MNIST (idx files) and CIFAR-10/100 (binary versions).

Nothing here unpickles: MNIST is read from its idx files (plain or ``.gz``) and CIFAR from the fixed-length records
of ``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz``. Downloads use torchvision's
``download_and_extract_archive`` with the published MD5 and happen only with ``download=True``. The default root is
``$ANPYC_DATA`` or ``~/.cache/anpyc/data``. On-disk layout (what ``download=True`` produces)::

    root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]     (torchvision's layout)
    root/cifar-10-batches-bin/data_batch_{1..5}.bin, test_batch.bin, batches.meta.txt
    root/cifar-100-binary/train.bin, test.bin, fine_label_names.txt, coarse_label_names.txt
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np

from anpyc.errors import DataError

from ._source import ImageSource, source_from_official_split
from .offline import DIGIT_CLASSES, MNIST_MEAN, MNIST_STD

__all__ = [
    "default_root",
    "load_mnist",
    "load_cifar10",
    "load_cifar100",
    "mnist_source",
    "cifar10_source",
    "cifar100_source",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_DOWNLOAD_ERRORS = (RuntimeError, URLError, OSError)


def default_root() -> Path:
    """``$ANPYC_DATA`` if set, else ``~/.cache/anpyc/data``."""
    return Path(os.environ.get("ANPYC_DATA") or "~/.cache/anpyc/data").expanduser()


def _root(root: str | os.PathLike | None) -> Path:
    return default_root() if root is None else Path(root).expanduser()


# --------------------------------------------------------------------------------------------------------- MNIST


def _read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (magic 0x00 0x00 0x08 ndim, big-endian uint32 dims, payload)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}", "delete it and download again (download=True)") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] < 1:
        raise DataError(f"{path} is not an idx file of unsigned bytes", "delete it and download again (download=True)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (incomplete idx header)", "delete it and download again (download=True)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    payload = np.frombuffer(data, dtype=np.uint8, offset=header)
    if payload.size != int(np.prod(dims)):
        raise DataError(
            f"{path} holds {payload.size} bytes of data, its header promises {int(np.prod(dims))}",
            "delete it and download again (download=True)",
        )
    return payload.reshape(dims)


def _mnist_files(raw: Path, train: bool) -> list[Path] | None:
    prefix = "train" if train else "t10k"
    found = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        candidates = [raw / stem, raw / f"{stem}.gz"]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found


def _download_mnist(raw: Path) -> None:
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import download_and_extract_archive

    raw.mkdir(parents=True, exist_ok=True)
    for filename, md5 in MNIST.resources:
        errors = []
        for mirror in MNIST.mirrors:
            try:
                download_and_extract_archive(f"{mirror}{filename}", download_root=str(raw), filename=filename, md5=md5)
                break
            except _DOWNLOAD_ERRORS as e:
                errors.append(f"{mirror}: {e}")
        else:
            raise DataError(
                f"could not download MNIST {filename} ({'; '.join(errors)})",
                f"check the internet connection, or put the MNIST idx files in {raw}",
            )


def load_mnist(
    root: str | os.PathLike | None = None, *, train: bool = True, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of MNIST's train (60,000) or test (10,000) set."""
    raw = _root(root) / "MNIST" / "raw"
    files = _mnist_files(raw, train)
    if files is None and download:
        _download_mnist(raw)
        files = _mnist_files(raw, train)
    if files is None:
        prefix = "train" if train else "t10k"
        raise DataError(
            f"MNIST not found: expected {prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte (or .gz) in {raw}",
            "pass --download / download=True to fetch it, or set root to the folder that holds MNIST/raw",
        )
    images, labels = _read_idx(files[0]), _read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"MNIST files in {raw} disagree: images {images.shape}, labels {labels.shape}",
            "delete them and download again (download=True)",
        )
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class CifarFormat:
    """Where a CIFAR binary version lives and how its records are laid out."""

    title: str
    url: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int
    names_file: str
    size: str


CIFAR10 = CifarFormat(
    "CIFAR-10",
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "c32a1d4ab5d03f1284b67883e8d87530",
    "cifar-10-batches-bin",
    tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    ("test_batch.bin",),
    1,
    "batches.meta.txt",
    "162 MB",
)
CIFAR100 = CifarFormat(
    "CIFAR-100",
    "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    "03b5dce01913d631647c71ecec9e9cb8",
    "cifar-100-binary",
    ("train.bin",),
    ("test.bin",),
    2,
    "fine_label_names.txt",
    "161 MB",
)
_IMAGE_BYTES = 3 * 32 * 32


def _read_cifar_records(path: Path, label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-length records ``label byte(s) + 1024 R + 1024 G + 1024 B`` -> (N, 32, 32, 3) uint8, labels."""
    data = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + _IMAGE_BYTES
    if data.size == 0 or data.size % record:
        raise DataError(
            f"{path} is not a whole number of {record}-byte CIFAR records ({data.size} bytes)",
            "delete it and download again (download=True)",
        )
    data = data.reshape(-1, record)
    images = data[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), data[:, label_index].astype(np.int64)


def _read_names(path: Path, expected: int) -> tuple[str, ...]:
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(names) != expected:
        raise DataError(f"{path} lists {len(names)} class names, expected {expected}", "download the dataset again")
    return names


def _load_cifar(
    fmt: CifarFormat,
    root: str | os.PathLike | None,
    train: bool,
    download: bool,
    label_index: int,
    names_file: str,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    base = _root(root)
    folder = base / fmt.folder
    wanted = [*(fmt.train_files if train else fmt.test_files), names_file]
    missing = [f for f in wanted if not (folder / f).is_file()]
    if missing and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(fmt.url, download_root=str(base), filename=Path(fmt.url).name, md5=fmt.md5)
        except _DOWNLOAD_ERRORS as e:
            raise DataError(
                f"could not download {fmt.title} from {fmt.url} ({e})",
                f"check the internet connection, or extract {Path(fmt.url).name} into {base}",
            ) from None
        missing = [f for f in wanted if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{fmt.title} not found: missing {', '.join(missing)} in {folder}",
            f"pass --download / download=True to fetch {Path(fmt.url).name} ({fmt.size}), or extract it into {base}",
        )
    parts = [_read_cifar_records(folder / f, fmt.label_bytes, label_index) for f in wanted[:-1]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    names = _read_names(folder / names_file, num_classes)
    if labels.max() >= num_classes:
        raise DataError(f"{fmt.title} label {int(labels.max())} is out of range in {folder}", "download it again")
    return images, labels, names


def load_cifar10(
    root: str | os.PathLike | None = None, *, train: bool = True, download: bool = False
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``(images uint8 (N, 32, 32, 3), labels int64, class names)``: train 50,000 / test 10,000."""
    return _load_cifar(CIFAR10, root, train, download, 0, CIFAR10.names_file, 10)


def load_cifar100(
    root: str | os.PathLike | None = None, *, train: bool = True, download: bool = False, coarse: bool = False
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Like :func:`load_cifar10`, with the 100 fine labels (or the 20 coarse ones with ``coarse=True``)."""
    if coarse:
        return _load_cifar(CIFAR100, root, train, download, 0, "coarse_label_names.txt", 20)
    return _load_cifar(CIFAR100, root, train, download, 1, CIFAR100.names_file, 100)


# ------------------------------------------------------------------------------------------------------- sources


def mnist_source(root: str | os.PathLike | None = None, *, download: bool = False, seed: int = 0) -> ImageSource:
    """Full MNIST: official test set; val = 10% of the official train set (stratified, seeded)."""
    train = load_mnist(root, train=True, download=download)
    test = load_mnist(root, train=False, download=download)
    return source_from_official_split("mnist", train, test, DIGIT_CLASSES, (MNIST_MEAN,), (MNIST_STD,), seed=seed)


def cifar10_source(root: str | os.PathLike | None = None, *, download: bool = False, seed: int = 0) -> ImageSource:
    """CIFAR-10: official test set; val = 10% of the official train set (stratified, seeded)."""
    xtr, ytr, names = load_cifar10(root, train=True, download=download)
    xte, yte, _ = load_cifar10(root, train=False, download=download)
    return source_from_official_split("cifar10", (xtr, ytr), (xte, yte), names, CIFAR10_MEAN, CIFAR10_STD, seed=seed)


def cifar100_source(root: str | os.PathLike | None = None, *, download: bool = False, seed: int = 0) -> ImageSource:
    """CIFAR-100 (fine labels): official test set; val = 10% of the official train set (stratified, seeded)."""
    xtr, ytr, names = load_cifar100(root, train=True, download=download)
    xte, yte, _ = load_cifar100(root, train=False, download=download)
    return source_from_official_split("cifar100", (xtr, ytr), (xte, yte), names, CIFAR100_MEAN, CIFAR100_STD, seed=seed)
