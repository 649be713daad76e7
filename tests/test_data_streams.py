"""Benchmark streams, transforms and the offline sources of anpyc.adapters.data."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from anpyc.adapters.data import (
    digits_arrays,
    eval_transform,
    input_spec_for,
    list_streams,
    make_stream,
    mnist5k_arrays,
    offline,
    permutation,
    train_transform,
)
from anpyc.adapters.data._datasets import LazyDataset, stratified_split, vectorize
from anpyc.errors import ConfigError, DataError
from anpyc.task import InputSpec, TaskStream

GRAY32 = InputSpec("image", (1, 32, 32), (0.3053,), (0.3759,), "bilinear", 1.0, "L")


def _all(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def _rows(stream: TaskStream, split: str) -> np.ndarray:
    return np.concatenate([getattr(t, split).rows.numpy() for t in stream])


# ------------------------------------------------------------------------------------------------ transforms


def test_eval_transform_is_timm_eval_pipeline_after_convert():
    from timm.data import create_transform

    spec = InputSpec("image", (3, 40, 40), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic", 0.875, "RGB")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (57, 83), dtype=np.uint8))  # mode "L"
    timm_tf = create_transform(
        input_size=(3, 40, 40), interpolation="bicubic", mean=spec.mean, std=spec.std, crop_pct=0.875, is_training=False
    )
    out = eval_transform(spec)(img)
    assert out.dtype == torch.float32 and out.shape == (3, 40, 40)
    assert torch.equal(out, timm_tf(img.convert("RGB")))
    # by hand: shorter side to floor(40 / 0.875) = 45 (longer side int(45 * 83 / 57) = 65), centre crop 40
    resized = img.convert("RGB").resize((int(45 * 83 / 57), 45), Image.Resampling.BICUBIC)
    left, top = int(round((resized.width - 40) / 2)), int(round((resized.height - 40) / 2))
    crop = np.asarray(resized.crop((left, top, left + 40, top + 40)), dtype=np.float32) / 255.0
    manual = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(
        spec.std
    )[:, None, None]
    assert torch.allclose(out, manual, atol=1e-5)


@pytest.mark.parametrize(
    "spec, text",
    [
        (InputSpec("vector", (64,), (0.0,), (1.0,)), "kind 'image'"),
        (InputSpec("image", (3, 32, 32), (0.5,), (0.5,), color_mode="L"), "does not fit color_mode"),
        (InputSpec("image", (3, 32, 32), (0.5,), (0.5,)), "mean/std have 1/1 values for 3 channel"),
        (InputSpec("image", (3, 32, 32), color_mode="CMYK"), "unsupported color_mode"),
    ],
)
def test_eval_transform_rejects_bad_specs(spec, text):
    with pytest.raises(DataError, match=text):
        eval_transform(spec)


def test_train_transform_plain_is_eval_and_augment_is_random():
    spec = InputSpec("image", (3, 32, 32))
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert torch.equal(train_transform(spec)(img), eval_transform(spec)(img))
    aug = train_transform(spec, augment=True)
    torch.manual_seed(0)
    outs = [aug(img) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert "RandomResizedCrop" in repr(aug) and "ColorJitter" not in repr(aug)


def test_input_spec_for_timm_and_plain_modules():
    import timm

    spec = input_spec_for(timm.create_model("resnet18", pretrained=False, num_classes=2), 48)
    assert spec.shape == (3, 48, 48) and spec.interpolation == "bicubic" and spec.crop_pct == 0.95
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    vit = input_spec_for(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32), 32)
    assert vit.mean == (0.5, 0.5, 0.5) and vit.crop_pct == 0.9
    plain = input_spec_for(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2)), 32, color_mode="L")
    assert plain.shape == (1, 32, 32) and plain.interpolation == "bilinear" and plain.crop_pct == 1.0
    assert plain.mean == pytest.approx((np.mean([0.485, 0.456, 0.406]),))
    eval_transform(plain)  # consistent
    with pytest.raises(DataError, match="unsupported color_mode"):
        input_spec_for(torch.nn.Linear(2, 2), 32, color_mode="P")


# ------------------------------------------------------------------------------------------------- splitting


def test_stratified_split_is_stratified_interleaved_and_seeded():
    labels = np.repeat(np.arange(4), [50, 30, 20, 100])
    rest, val, test = stratified_split(labels, (0.1, 0.2), seed=3)
    assert sorted(np.concatenate([rest, val, test]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[val], minlength=4).tolist() == [5, 3, 2, 10]
    assert np.bincount(labels[test], minlength=4).tolist() == [10, 6, 4, 20]
    # any prefix is close to class-balanced: the first 20 of rest hold every class in proportion
    assert np.bincount(labels[rest[:20]], minlength=4).tolist() == [5, 3, 2, 10]
    again = stratified_split(labels, (0.1, 0.2), seed=3)
    other = stratified_split(labels, (0.1, 0.2), seed=4)
    assert all(np.array_equal(a, b) for a, b in zip((rest, val, test), again, strict=True))
    assert not np.array_equal(np.sort(val), np.sort(other[1]))


# ---------------------------------------------------------------------------------------------------- digits


def test_digits_arrays_are_real_load_digits():
    from sklearn.datasets import load_digits

    images, labels = digits_arrays()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and labels.shape == (1797,)
    d = load_digits()
    assert np.array_equal(labels, d.target)
    assert np.array_equal(images, np.round(d.images * 255 / 16).astype(np.uint8))
    assert images.max() == 255 and not images.flags.writeable


def test_digits_split_shapes_labels_and_disjoint_splits():
    t0 = time.perf_counter()
    stream = make_stream("digits-split")
    x, y = stream[0].train[0]
    assert time.perf_counter() - t0 < 5.0
    assert stream.name == "digits-split" and len(stream) == 5
    assert stream.input_spec == GRAY32
    assert [t.classes for t in stream] == [(str(2 * t), str(2 * t + 1)) for t in range(5)]
    labels = digits_arrays()[1]
    for t, task in enumerate(stream):
        assert task.num_classes == 2 and task.id == t
        for split in ("train", "val", "test"):
            xs, ys = _all(getattr(task, split))
            assert xs.dtype == torch.float32 and xs.shape[1:] == (1, 32, 32)
            assert set(ys.tolist()) == {0, 1}
            # local label k is source class 2t + k
            assert np.array_equal(labels[getattr(task, split).rows.numpy()], ys.numpy() + 2 * t)
    train, val, test = (_rows(stream, s) for s in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == 1797
    assert len(set(train) | set(val) | set(test)) == 1797  # disjoint and complete
    assert abs(len(test) - 0.2 * 1797) < 10 and abs(len(val) - 0.2 * 1797) < 10


def test_digits_tensors_are_the_eval_transform_of_the_array_and_of_its_png(tmp_path):
    stream = make_stream("digits-split")
    images, _ = digits_arrays()
    tf = eval_transform(stream.input_spec)
    for task in (stream[0], stream[4]):
        ds = task.test
        for i in (0, len(ds) - 1):
            x, _ = ds[i]
            array = images[int(ds.rows[i])]
            assert torch.equal(x, tf(Image.fromarray(array)))
            path = tmp_path / f"digit_{task.id}_{i}.png"
            Image.fromarray(array).save(path)
            with Image.open(path) as png:
                assert png.mode == "L"
                assert torch.equal(x, tf(png))


def test_digits_split_is_deterministic_per_seed_and_differs_across_seeds():
    offline.digits_source.cache_clear()
    a = make_stream("digits-split", seed=0)
    offline.digits_source.cache_clear()
    b = make_stream("digits-split", seed=0)
    assert a[2].train.inputs is not b[2].train.inputs  # rebuilt, not the cached object
    assert torch.equal(_all(a[2].train)[0], _all(b[2].train)[0])
    assert torch.equal(_all(a[2].val)[1], _all(b[2].val)[1])
    c = make_stream("digits-split", seed=1)
    assert not np.array_equal(np.sort(a[2].val.rows.numpy()), np.sort(c[2].val.rows.numpy()))


def test_digits_vector_and_rgb_variants():
    vec = make_stream("digits-split", vector=True)
    assert vec.input_spec == InputSpec("vector", (64,), (0.3053,), (0.3759,), "bilinear", 1.0, "L")
    x, y = vec[1].train[3]
    array = digits_arrays()[0][int(vec[1].train.rows[3])]
    assert x.shape == (64,) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy((array.reshape(-1) / 255.0 - 0.3053) / 0.3759).float(), atol=1e-6)
    rgb = make_stream("digits-split", color_mode="RGB", img_size=24)
    assert rgb.input_spec.shape == (3, 24, 24) and rgb.input_spec.mean == (0.3053,) * 3
    x, _ = rgb[0].train[0]
    assert x.shape == (3, 24, 24) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_input_spec_override_and_limit():
    spec = InputSpec("image", (3, 28, 28), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875, "RGB")
    stream = make_stream("digits-split", input_spec=spec, limit=10)
    assert stream.input_spec == spec
    for task in stream:
        assert len(task.train) == len(task.val) == len(task.test) == 10
        assert sorted(_all(task.train)[1].tolist()) == [0] * 5 + [1] * 5  # a limited split stays balanced
    x, _ = stream[0].val[0]
    assert x.shape == (3, 28, 28)
    assert torch.equal(x, eval_transform(spec)(Image.fromarray(digits_arrays()[0][int(stream[0].val.rows[0])])))


def test_datasets_work_with_a_dataloader():
    stream = make_stream("digits-split", limit=20)
    xb, yb = next(iter(DataLoader(stream[0].train, batch_size=8, shuffle=True)))
    assert xb.shape == (8, 1, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64


# -------------------------------------------------------------------------------------------------- MNIST-5k


def test_mnist5k_arrays_are_real_mnist():
    images, labels = mnist5k_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0
    assert 0.10 < images.mean() / 255 < 0.16  # MNIST ink density, not noise


def test_mnist5k_split_counts_and_labels():
    stream = make_stream("mnist5k-split")
    assert len(stream) == 5 and stream.input_spec.shape == (1, 32, 32)
    counts = {s: sum(len(getattr(t, s)) for t in stream) for s in ("train", "val", "test")}
    assert counts == {"train": 3500, "val": 500, "test": 1000}
    for t, task in enumerate(stream):
        assert task.classes == (str(2 * t), str(2 * t + 1))
        assert set(_all(task.val)[1].tolist()) == {0, 1}
    vec = make_stream("mnist5k-split", vector=True, num_tasks=1, limit=7)
    assert vec.input_spec.shape == (784,) and vec[0].num_classes == 10 and len(vec[0].train) == 7


def test_mnist5k_permuted_tasks_are_pixel_permutations():
    stream = make_stream("mnist5k-permuted", num_tasks=4, seed=5)
    assert stream.input_spec == InputSpec("vector", (784,), (0.1307,), (0.3081,), "bilinear", 1.0, "L")
    images = mnist5k_arrays()[0]
    base = stream[0].train
    x0, y0 = base[11]
    assert torch.equal(x0, vectorize(images[int(base.rows[11])], 0.1307, 0.3081))  # task 0 = identity
    assert stream[0].meta["identity"] and not stream[2].meta["identity"]
    for k in (1, 2, 3):
        perm = permutation(5, k, 784)
        assert sorted(perm.tolist()) == list(range(784)) and not torch.equal(perm, torch.arange(784))
        xk, yk = stream[k].train[11]
        assert yk == y0 and torch.equal(xk, x0[perm])
        assert torch.equal(stream[k].train.perm, perm)
    assert not torch.equal(stream[1].train.perm, stream[2].train.perm)
    assert len(stream[3].test) == 1000 and stream[3].num_classes == 10
    assert not torch.equal(permutation(5, 1, 784), permutation(6, 1, 784))


def test_mnist5k_permuted_50_tasks_share_base_tensors():
    make_stream("mnist5k-permuted", num_tasks=1)  # warm the source cache
    t0 = time.perf_counter()
    stream = make_stream("mnist5k-permuted", num_tasks=60)
    assert time.perf_counter() - t0 < 2.0
    assert len(stream) == 60
    ptrs = {getattr(t, s).inputs.data_ptr() for t in stream for s in ("train", "val", "test")}
    assert len(ptrs) == 1  # one shared (5000, 784) tensor; each task only adds a permutation
    x, y = stream[59].val[0]
    assert x.shape == (784,) and 0 <= y < 10


def test_mnist5k_rotated_tasks_differ_by_angle():
    stream = make_stream("mnist5k-rotated", num_tasks=4, limit=30)
    assert [t.meta["angle"] for t in stream] == [0.0, 45.0, 90.0, 135.0]
    assert isinstance(stream[1].train, LazyDataset) and len(stream[1].train) == 30
    images = mnist5k_arrays()[0]
    tf = eval_transform(stream.input_spec)
    x0, y0 = stream[0].train[0]
    x1, y1 = stream[1].train[0]
    x2, _ = stream[2].train[0]
    assert y0 == y1 and not torch.equal(x0, x1) and not torch.equal(x1, x2)
    row = int(stream[0].train.source_rows[0])
    assert int(stream[1].train.data.source_rows[0]) == row  # every task rotates the same split rows
    src = images[row]
    assert torch.equal(x0, tf(Image.fromarray(src)))
    rotated = Image.fromarray(src).rotate(45.0, resample=Image.Resampling.BILINEAR)
    assert torch.equal(x1, tf(rotated))
    # 180 degrees: the image turned upside down equals the flipped array
    flip = make_stream("mnist5k-rotated", num_tasks=2, max_angle=360.0, vector=True, limit=5)
    xa, _ = flip[0].test[2]
    xb, _ = flip[1].test[2]
    assert torch.equal(xa.reshape(28, 28).flip(0).flip(1), xb.reshape(28, 28))


# ------------------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(
    "kw, shape",
    [({}, (3, 32, 32)), ({"img_size": 20, "color_mode": "L"}, (1, 20, 20)), ({"vector": True, "dim": 16}, (16,))],
)
def test_synthetic_shapes_and_counts(kw, shape):
    stream = make_stream("synthetic", num_tasks=2, classes_per_task=3, samples_per_class=8, **kw)
    assert len(stream) == 2 and stream.input_spec.shape == shape
    for task in stream:
        assert task.num_classes == 3
        xs, ys = _all(task.train)
        assert xs.shape == (24, *shape) and xs.dtype == torch.float32
        assert np.bincount(ys.numpy()).tolist() == [8, 8, 8]
        assert len(task.val) == len(task.test) == 6


def test_synthetic_is_learnable_and_seeded():
    stream = make_stream("synthetic", num_tasks=2, samples_per_class=32, img_size=16)
    for task in stream:
        xs, ys = _all(task.train)
        centroids = torch.stack([xs[ys == c].mean(0) for c in range(task.num_classes)]).flatten(1)
        xt, yt = _all(task.test)
        pred = torch.cdist(xt.flatten(1), centroids).argmin(1)
        assert (pred == yt).float().mean() > 0.9
    again = make_stream("synthetic", num_tasks=2, samples_per_class=32, img_size=16)
    other = make_stream("synthetic", num_tasks=2, samples_per_class=32, img_size=16, seed=1)
    assert torch.equal(_all(stream[1].val)[0], _all(again[1].val)[0])
    assert not torch.equal(_all(stream[1].val)[0], _all(other[1].val)[0])
    # synthetic images are real images: the tensor is the eval transform of a uint8 picture
    x = _all(stream[0].train)[0][0]
    pixels = (x * 0.3 + 0.5).mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert torch.allclose(eval_transform(stream.input_spec)(Image.fromarray(pixels)), x, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_streams():
    names = list_streams()
    for name in (
        "digits-split",
        "mnist5k-permuted",
        "mnist5k-split",
        "mnist5k-rotated",
        "mnist-permuted",
        "mnist-split",
        "mnist-rotated",
        "cifar10-split",
        "cifar100-split",
        "synthetic",
        "folder",
    ):
        assert name in names
    assert list_streams("mnist5k-*") == ["mnist5k-permuted", "mnist5k-rotated", "mnist5k-split"]


def test_bad_names_and_keywords_say_what_is_valid():
    with pytest.raises(ConfigError, match="unknown benchmark stream 'digit-split'.*digits-split"):
        make_stream("digit-split")
    with pytest.raises(ConfigError, match=r"does not take img_sise \(valid options: num_tasks, img_size"):
        make_stream("digits-split", img_sise=32)
    with pytest.raises(ConfigError, match="does not take vector"):
        make_stream("mnist5k-permuted", vector=True)
    with pytest.raises(ConfigError, match=r"10 classes cannot be split into 3 tasks.*num_tasks in \[1, 2, 5\]"):
        make_stream("digits-split", num_tasks=3)
    with pytest.raises(ConfigError, match="num_tasks must be a positive integer"):
        make_stream("mnist5k-permuted", num_tasks=0)
    with pytest.raises(ConfigError, match="limit must be a positive integer"):
        make_stream("digits-split", limit=0)
    with pytest.raises(ConfigError, match="vector=True takes no input_spec or color_mode"):
        make_stream("digits-split", vector=True, color_mode="RGB")
