"""Your own data: folder trees and manifests (anpyc.adapters.data.folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anpyc.adapters.data import eval_transform, folder_stream, make_stream, manifest_stream
from anpyc.errors import DataError
from anpyc.task import InputSpec


def _png(path: Path, value: int, size=(12, 10), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    array = np.clip(rng.integers(0, 60, shape) + value, 0, 255).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def _classes(root: Path, per_class: dict[str, int], start: int = 0) -> None:
    for c, (name, n) in enumerate(per_class.items()):
        for i in range(n):
            _png(root / name / f"img_{i:02d}.png", start + 40 * c + i)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """b_letters: train only (carved); a_shapes: train/val/test given."""
    root = tmp_path / "data"
    _classes(root / "b_letters" / "train", {"x": 10, "y": 10})
    _classes(root / "a_shapes" / "train", {"square": 4, "circle": 3, "triangle": 5})
    _classes(root / "a_shapes" / "val", {"square": 1, "circle": 2, "triangle": 1}, start=100)
    _classes(root / "a_shapes" / "test", {"square": 2, "circle": 2, "triangle": 2}, start=150)
    (root / ".hidden_task").mkdir()
    (root / "a_shapes" / "train" / "square" / ".DS_Store").write_bytes(b"\x00\x01")
    return root


def _labels(ds) -> list[int]:
    return [ds[i][1] for i in range(len(ds))]


def test_folder_stream_classes_counts_and_tensors(tree: Path):
    stream = folder_stream(tree, img_size=16)
    assert stream.name == "folder:data" and [t.name for t in stream] == ["a_shapes", "b_letters"]
    assert stream.input_spec == InputSpec(
        "image", (3, 16, 16), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 1.0, "RGB"
    )
    shapes, letters = stream
    assert shapes.classes == ("circle", "square", "triangle") and letters.classes == ("x", "y")
    assert (len(shapes.train), len(shapes.val), len(shapes.test)) == (12, 4, 6)
    assert sorted(_labels(shapes.train)) == [0] * 3 + [1] * 4 + [2] * 5
    assert sorted(_labels(shapes.val)) == [0, 0, 1, 2]
    assert shapes.meta["carved"] == []
    # carved: val round(10 * 0.1) = 1, test round(10 * 0.2) = 2 per class; train keeps 7
    assert (len(letters.train), len(letters.val), len(letters.test)) == (14, 2, 4)
    assert sorted(_labels(letters.test)) == [0, 0, 1, 1] and letters.meta["carved"] == ["test", "val"]
    files = [set(getattr(letters, s).paths) for s in ("train", "val", "test")]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    assert len(files[0] | files[1] | files[2]) == 20
    # items are the eval transform of the file, labelled by sorted class name
    ds = shapes.test
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert ds.paths[i].parent.name == shapes.classes[y]
        with Image.open(ds.paths[i]) as img:
            assert torch.equal(x, eval_transform(stream.input_spec)(img))


def test_carving_is_seeded(tree: Path):
    a = folder_stream(tree, seed=0)[1]
    b = folder_stream(tree, seed=0)[1]
    c = folder_stream(tree, seed=1)[1]
    assert a.val.paths == b.val.paths and a.test.paths == b.test.paths
    assert (a.val.paths, a.test.paths) != (c.val.paths, c.test.paths)


def test_fractions_augment_cache_and_input_spec(tree: Path):
    stream = folder_stream(tree, val_fraction=0.2, test_fraction=0.0, augment=True, cache=False)
    letters = stream[1]
    assert letters.test is None and (len(letters.train), len(letters.val)) == (16, 4)
    assert "RandomResizedCrop" in repr(letters.train.transform) and letters.train._cache is None
    assert "RandomResizedCrop" not in repr(letters.val.transform)
    x, _ = letters.train[0]
    assert x.shape == (3, 32, 32)
    spec = InputSpec("image", (1, 8, 8), (0.5,), (0.25,), "bicubic", 0.875, "L")
    gray = folder_stream(tree, input_spec=spec)
    assert gray.input_spec == spec and gray[0].val[0][0].shape == (1, 8, 8)
    assert make_stream("folder", root=str(tree), img_size=8)[0].train[0][0].shape == (3, 8, 8)


def _error(root: Path, **kw) -> str:
    with pytest.raises(DataError) as info:
        folder_stream(root, **kw)
    return info.value.one_line


def test_folder_errors_name_the_problem_and_the_fix(tmp_path: Path):
    assert "does not exist" in _error(tmp_path / "nope") and "one folder per task" in _error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "holds no task folders (add one folder per task" in _error(tmp_path / "empty")

    flat = tmp_path / "flat"
    _classes(flat / "train", {"a": 2})
    assert "holds train/ directly" in _error(flat) and "move train/" in _error(flat)

    no_train = tmp_path / "no_train"
    _classes(no_train / "t1" / "val", {"a": 2})
    assert f"task folder {no_train / 't1'} has no train/ folder" in _error(no_train)

    empty_task = tmp_path / "empty_task"
    (empty_task / "t1" / "train").mkdir(parents=True)
    assert "is empty: train/ holds no class folders" in _error(empty_task)

    empty_class = tmp_path / "empty_class"
    _classes(empty_class / "t1" / "train", {"a": 3})
    (empty_class / "t1" / "train" / "b").mkdir()
    assert f"class folder {empty_class / 't1' / 'train' / 'b'} is empty" in _error(empty_class)

    loose = tmp_path / "loose"
    _classes(loose / "t1" / "train", {"a": 3})
    _png(loose / "t1" / "train" / "stray.png", 3)
    assert "holds files (stray.png) outside class folders" in _error(loose)


def test_bad_files_are_named(tmp_path: Path):
    root = tmp_path / "text"
    _classes(root / "t1" / "train", {"a": 3, "b": 3})
    notes = root / "t1" / "train" / "a" / "notes.txt"
    notes.write_text("not an image")
    msg = _error(root)
    assert f"{notes} is not an image file" in msg and "remove it" in msg

    root = tmp_path / "broken"
    _classes(root / "t1" / "train", {"a": 3, "b": 3})
    broken = root / "t1" / "train" / "b" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    msg = _error(root)
    assert f"{broken} is not a readable image" in msg and "replace it with a valid image" in msg


def test_truncated_image_is_named_when_decoded(tmp_path: Path):
    root = tmp_path / "trunc"
    _classes(root / "t1" / "train", {"a": 3, "b": 3})
    path = root / "t1" / "train" / "a" / "img_00.png"
    big = _png(tmp_path / "big.png", 1, size=(64, 64))
    path.write_bytes(big.read_bytes()[:200])  # header intact, data cut
    msg = _error(root, cache=True)
    assert f"{path} is not a readable image" in msg
    stream = folder_stream(root, cache=False)  # lazily decoded: the error comes with the item
    ds = next(getattr(stream[0], s) for s in ("train", "val", "test") if path in getattr(stream[0], s).paths)
    with pytest.raises(DataError, match="is not a readable image"):
        ds[ds.paths.index(path)]


def test_class_sets_must_match_and_carving_needs_images(tmp_path: Path):
    root = tmp_path / "mismatch"
    _classes(root / "t1" / "train", {"cat": 3, "dog": 3})
    _classes(root / "t1" / "val", {"cat": 1, "cow": 1})
    msg = _error(root)
    assert "classes of val ['cat', 'cow'] differ from those of train ['cat', 'dog']" in msg
    assert "same class folders" in msg

    root = tmp_path / "tiny"
    _classes(root / "t1" / "train", {"cat": 2, "dog": 5})
    msg = _error(root)
    assert "class 'cat' has 2 training image(s), too few to carve val and test" in msg and "add images" in msg
    assert len(folder_stream(root, test_fraction=0.0)[0].val) == 2  # one per class carved


# ------------------------------------------------------------------------------------------------- manifest


def _manifest_rows(tmp_path: Path) -> list[dict]:
    rows = []
    for task, classes in (("zeta", ("cat", "dog")), ("alpha", ("red", "blue"))):
        for c, name in enumerate(classes):
            for i in range(6):
                p = _png(tmp_path / "imgs" / task / f"{name}_{i}.png", 30 * c + i)
                rows.append({"task": task, "split": "train", "path": str(p.relative_to(tmp_path)), "label": name})
            p = _png(tmp_path / "imgs" / task / f"{name}_val.png", 7 + c)
            rows.append({"task": task, "split": "val", "path": str(p.relative_to(tmp_path)), "label": name})
    return rows


def _write_csv(path: Path, rows: list[dict], header: str = "task,split,path,label") -> Path:
    fields = header.split(",")
    lines = [header] + [",".join(str(r.get(f, "")) for f in fields) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_csv_and_json(tmp_path: Path):
    rows = _manifest_rows(tmp_path)
    csv_stream = manifest_stream(_write_csv(tmp_path / "m.csv", rows), img_size=8)
    assert csv_stream.name == "manifest:m" and [t.name for t in csv_stream] == ["zeta", "alpha"]  # first appearance
    zeta, alpha = csv_stream
    assert zeta.classes == ("cat", "dog") and alpha.classes == ("blue", "red")
    assert (len(zeta.train), len(zeta.val), len(zeta.test)) == (10, 2, 2)  # test carved: round(6 * 0.2) = 1 each
    assert zeta.meta["carved"] == ["test"]
    x, y = alpha.val[0]
    assert x.shape == (3, 8, 8) and alpha.val.paths[0].name.startswith(alpha.classes[y])
    (tmp_path / "m.json").write_text(json.dumps(rows))
    json_stream = make_stream("manifest", path=tmp_path / "m.json", img_size=8)
    assert [t.classes for t in json_stream] == [t.classes for t in csv_stream]
    assert json_stream[1].train.paths == alpha.train.paths


def test_manifest_errors(tmp_path: Path):
    rows = _manifest_rows(tmp_path)
    with pytest.raises(DataError, match=r"lacks column\(s\) label \(start it with the header line task,split,path"):
        manifest_stream(_write_csv(tmp_path / "a.csv", rows, header="task,split,path"))
    bad = [dict(rows[0], split="training")] + rows[1:]
    with pytest.raises(DataError, match="record 1 has unknown split 'training' \\(use one of: train, val, test\\)"):
        manifest_stream(_write_csv(tmp_path / "b.csv", bad))
    gone = rows + [dict(rows[0], path="imgs/missing.png")]
    with pytest.raises(DataError, match=f"image {tmp_path / 'imgs' / 'missing.png'} does not exist"):
        manifest_stream(_write_csv(tmp_path / "c.csv", gone))
    (tmp_path / "d.json").write_text(json.dumps([{"task": "t", "split": "train", "path": "x.png"}]))
    with pytest.raises(DataError, match="record 0 lacks label"):
        manifest_stream(tmp_path / "d.json")
    only_val = [r for r in rows if r["split"] == "val"]
    with pytest.raises(DataError, match="task 'zeta' has no train split"):
        manifest_stream(_write_csv(tmp_path / "e.csv", only_val))
    with pytest.raises(DataError, match="unsupported extension '.txt'"):
        manifest_stream(_write_csv(tmp_path / "f.txt", rows))
    with pytest.raises(DataError, match="does not exist"):
        manifest_stream(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="has no records"):
        manifest_stream(_write_csv(tmp_path / "g.csv", []))
