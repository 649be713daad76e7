"""Downloadable sources read from small fake files in the exact on-disk formats (no network)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from anpyc.adapters.data import download as dl
from anpyc.adapters.data import load_cifar10, load_cifar100, load_mnist, make_stream
from anpyc.errors import DataError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _digit_images(labels: np.ndarray, offset: int) -> np.ndarray:
    """Image i has pixel (i % 28, 3) = label * 20 + 1 and the corner holds (i + offset) % 256."""
    images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, i % 28, 3] = y * 20 + 1
        images[i, 0, 0] = (i + offset) % 256
    return images


def fake_mnist(root: Path, gz: bool = False, per_class: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for prefix, n, offset in (("train", per_class, 0), ("t10k", 2, 100)):
        labels = np.tile(np.arange(10, dtype=np.uint8), n)
        images = _digit_images(labels, offset)
        _idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", images, gz)
        _idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[prefix] = (images, labels)
    return out


def _cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _records(label_bytes: np.ndarray, images: np.ndarray) -> bytes:
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane, row-major
    return np.concatenate([label_bytes.reshape(len(images), -1).astype(np.uint8), planes], axis=1).tobytes()


def fake_cifar10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    out, train_x, train_y = {}, [], []
    for b in range(1, 6):
        labels = ((np.arange(8) + b) % 10).astype(np.uint8)  # 8 records per batch, every class over the 5 batches
        images = _cifar_images(len(labels), b)
        (folder / f"data_batch_{b}.bin").write_bytes(_records(labels, images))
        train_x.append(images), train_y.append(labels)
    test_labels = np.arange(10, dtype=np.uint8)
    test_images = _cifar_images(10, 99)
    (folder / "test_batch.bin").write_bytes(_records(test_labels, test_images))
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    out["train"] = (np.concatenate(train_x), np.concatenate(train_y))
    out["test"] = (test_images, test_labels)
    return out


def fake_cifar100(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    out = {}
    for split, reps, seed in (("train", 3, 1), ("test", 1, 2)):
        fine = np.tile(np.arange(100, dtype=np.uint8), reps)
        coarse = (fine // 5).astype(np.uint8)
        images = _cifar_images(len(fine), seed)
        (folder / f"{split}.bin").write_bytes(_records(np.stack([coarse, fine], axis=1), images))
        out[split] = (images, coarse, fine)
    (folder / "fine_label_names.txt").write_text("\n".join(f"fine_{i:02d}" for i in range(100)) + "\n")
    (folder / "coarse_label_names.txt").write_text("\n".join(f"coarse_{i}" for i in range(20)) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_parse_to_pixels_and_labels(tmp_path: Path, gz: bool):
    fake = fake_mnist(tmp_path, gz=gz)
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = load_mnist(tmp_path, train=train)
        assert images.dtype == np.uint8 and images.shape == fake[prefix][0].shape
        assert np.array_equal(images, fake[prefix][0]) and np.array_equal(labels, fake[prefix][1])
        assert labels.dtype == np.int64


def test_mnist_streams_from_fake_files(tmp_path: Path):
    fake = fake_mnist(tmp_path)
    split = make_stream("mnist-split", root=tmp_path)
    assert len(split) == 5 and split.input_spec.shape == (1, 32, 32)
    # 6 train images per class: val carves round(0.6) = 1; test = the official 2 per class
    assert [(len(t.train), len(t.val), len(t.test)) for t in split] == [(10, 2, 4)] * 5
    x, y = split[2].test[0]
    assert x.shape == (1, 32, 32) and split[2].classes == ("4", "5") and y in (0, 1)
    perm = make_stream("mnist-permuted", root=tmp_path, num_tasks=3, limit=7)
    assert len(perm[2].train) == 7 and perm.input_spec.shape == (784,)
    xs = [perm[k].test[1][0] for k in range(3)]
    test_images, test_labels = fake["t10k"]
    row = int(perm[0].test.rows[1]) - 60  # test rows follow the 60 train rows in the source
    assert perm[0].test[1][1] == int(test_labels[row])
    expected = (torch.from_numpy(test_images[row].reshape(-1).astype(np.float32)) / 255 - 0.1307) / 0.3081
    assert torch.allclose(xs[0], expected) and not torch.equal(xs[0], xs[1])
    rot = make_stream("mnist-rotated", root=tmp_path, num_tasks=2, vector=True)
    assert [t.meta["angle"] for t in rot] == [0.0, 90.0]
    a, b = rot[0].val[0][0].reshape(28, 28), rot[1].val[0][0].reshape(28, 28)
    assert torch.equal(torch.rot90(a, 1), b)  # PIL rotates counter-clockwise


def test_mnist_missing_without_download_says_where_and_how(tmp_path: Path):
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, train=True, download=False)
    msg = info.value.one_line
    assert "MNIST not found" in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert "--download" in msg and "download=True" in msg
    with pytest.raises(DataError, match="MNIST not found"):
        make_stream("mnist-split", root=tmp_path)


def test_mnist_corrupt_files_are_named(tmp_path: Path):
    fake_mnist(tmp_path)
    bad = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(DataError, match=f"{bad} holds .* bytes of data, its header promises"):
        load_mnist(tmp_path)
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="is not an idx file"):
        load_mnist(tmp_path)


def test_mnist_download_uses_torchvision_resources(tmp_path: Path, monkeypatch):
    from torchvision.datasets import MNIST
    from torchvision.datasets import utils as tv_utils

    fake = fake_mnist(tmp_path / "staging", gz=True)
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kw):
        calls.append((url, filename, md5))
        if "ossci" in url:  # first mirror fails, second succeeds
            raise RuntimeError("mirror down")
        src = tmp_path / "staging" / "MNIST" / "raw" / filename
        with gzip.open(src) as f:
            (Path(download_root) / filename.removesuffix(".gz")).write_bytes(f.read())

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    images, labels = load_mnist(tmp_path / "root", train=False, download=True)
    assert np.array_equal(images, fake["t10k"][0]) and np.array_equal(labels, fake["t10k"][1])
    assert [(f, m) for _, f, m in calls[1::2]] == list(MNIST.resources)
    assert all(u.startswith(MNIST.mirrors[0]) for u, _, _ in calls[0::2])

    def offline(url, download_root, filename=None, md5=None, **kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="could not download MNIST train-images-idx3-ubyte.gz .*network unreachable"):
        load_mnist(tmp_path / "other", download=True)


# ---------------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_binary_records_parse(tmp_path: Path):
    fake = fake_cifar10(tmp_path)
    images, labels, names = load_cifar10(tmp_path, train=True)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, fake["train"][0]) and np.array_equal(labels, fake["train"][1])
    assert names == tuple(CIFAR10_NAMES)
    raw = (tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin").read_bytes()
    assert images[0, 0, 1, 0] == raw[1 + 1] and images[0, 0, 0, 1] == raw[1 + 1024]  # R then G planes
    assert images[0, 31, 31, 2] == raw[3072] and labels[0] == raw[0]
    test_images, test_labels, _ = load_cifar10(tmp_path, train=False)
    assert np.array_equal(test_images, fake["test"][0]) and test_labels.tolist() == list(range(10))


def test_cifar10_split_stream(tmp_path: Path):
    fake = fake_cifar10(tmp_path)
    stream = make_stream("cifar10-split", root=tmp_path)
    assert len(stream) == 5 and stream.input_spec.shape == (3, 32, 32) and stream.input_spec.color_mode == "RGB"
    assert [t.classes for t in stream][:2] == [("airplane", "automobile"), ("bird", "cat")]
    assert [len(t.test) for t in stream] == [2] * 5
    x, y = stream[1].test[0]
    from PIL import Image

    from anpyc.adapters.data import eval_transform

    row = int(stream[1].test.rows[0]) - 40
    assert fake["test"][1][row] == 2 + y
    assert torch.equal(x, eval_transform(stream.input_spec)(Image.fromarray(fake["test"][0][row])))


def test_cifar100_fine_and_coarse_labels(tmp_path: Path):
    fake = fake_cifar100(tmp_path)
    images, labels, names = load_cifar100(tmp_path, train=True)
    assert np.array_equal(images, fake["train"][0]) and np.array_equal(labels, fake["train"][2])
    assert names[7] == "fine_07" and len(names) == 100
    _, coarse, coarse_names = load_cifar100(tmp_path, train=False, coarse=True)
    assert np.array_equal(coarse, fake["test"][1]) and coarse_names[3] == "coarse_3"
    stream = make_stream("cifar100-split", root=tmp_path, limit=5)
    assert len(stream) == 10 and stream[3].classes == tuple(f"fine_{i:02d}" for i in range(30, 40))
    assert len(stream[3].train) == 5 and len(stream[9].test) == 5
    assert len(make_stream("cifar100-split", root=tmp_path, num_tasks=20)[0].classes) == 5


def test_cifar_missing_truncated_and_download(tmp_path: Path, monkeypatch):
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path)
    msg = info.value.one_line
    assert "CIFAR-10 not found: missing data_batch_1.bin" in msg and str(tmp_path / "cifar-10-batches-bin") in msg
    assert "--download" in msg and "cifar-10-binary.tar.gz" in msg
    with pytest.raises(DataError, match="CIFAR-100 not found: missing test.bin, fine_label_names.txt"):
        load_cifar100(tmp_path, train=False)

    fake_cifar10(tmp_path / "ok")
    bad = tmp_path / "ok" / "cifar-10-batches-bin" / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(DataError, match="is not a whole number of 3073-byte CIFAR records"):
        load_cifar10(tmp_path / "ok")

    from torchvision.datasets import utils as tv_utils

    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kw):
        calls.append((url, filename, md5))
        fake_cifar100(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    _, labels, _ = load_cifar100(tmp_path / "dl", download=True)
    assert len(labels) == 300
    assert calls == [(dl.CIFAR100.url, "cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8")]
    assert dl.CIFAR10.url == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert dl.CIFAR10.md5 == "c32a1d4ab5d03f1284b67883e8d87530"


def test_default_root_follows_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("ANPYC_DATA", str(tmp_path))
    assert dl.default_root() == tmp_path
    monkeypatch.delenv("ANPYC_DATA")
    assert dl.default_root() == Path("~/.cache/anpyc/data").expanduser()
