"""onnxruntime serving of an export directory: timm-exact preprocessing, predictions, bad inputs, CLI predict."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from anpyc.errors import DataError
from anpyc.export import ExportDirError, ImageReadError, InputShapeError, UnknownTaskError, export_all, load_export
from anpyc.export.runtime import preprocess_image
from anpyc.export.testing import mlp_source, timm_source
from anpyc.task import InputSpec


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def _random_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


@pytest.fixture(scope="module")
def image_export(tmp_path_factory):
    src = timm_source("test_resnet", tasks=2, num_classes=5, interpolation="bicubic", crop_pct=0.875)
    out = tmp_path_factory.mktemp("export-img")
    export_all(src, out)
    return src, out


@pytest.fixture(scope="module")
def vector_export(tmp_path_factory):
    src = mlp_source()
    out = tmp_path_factory.mktemp("export-vec")
    export_all(src, out)
    return src, out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h, fmt) in enumerate([(40, 52, "png"), (96, 64, "jpeg"), (33, 33, "png")]):
        p = d / f"img{i}.{'jpg' if fmt == 'jpeg' else fmt}"
        _random_image(w, h, seed=i).save(p, format=fmt.upper())
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- preprocessing == timm eval transform


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875, 0.95])
def test_preprocess_equals_timm_eval_transform(interpolation, crop_pct):
    from timm.data import create_transform

    spec = InputSpec(kind="image", shape=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     interpolation=interpolation, crop_pct=crop_pct, color_mode="RGB")
    tf = create_transform(spec.shape, interpolation=interpolation, mean=spec.mean, std=spec.std, crop_pct=crop_pct,
                          is_training=False)
    for i, (w, h) in enumerate([(32, 32), (37, 53), (90, 17), (64, 48), (200, 150), (20, 25)]):
        img = _random_image(w, h, seed=i)
        ours = preprocess_image(img, spec)
        ref = tf(img.convert("RGB")).numpy()
        assert ours.shape == ref.shape == (3, 32, 32) and ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("shape,color_mode,mean,std", [
    ((3, 24, 40), "RGB", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # non-square target: timm's ResizeKeepRatio path
    ((1, 28, 28), "L", (0.1307,), (0.3081,)),  # grayscale from colour images
])
def test_preprocess_equals_timm_nonsquare_and_grayscale(shape, color_mode, mean, std):
    from timm.data import create_transform

    spec = InputSpec(kind="image", shape=shape, mean=mean, std=std, interpolation="bilinear", crop_pct=0.9,
                     color_mode=color_mode)
    tf = create_transform(shape, interpolation="bilinear", mean=mean, std=std, crop_pct=0.9, is_training=False)
    for i, (w, h) in enumerate([(50, 31), (31, 50), (120, 80), (28, 28)]):
        img = _random_image(w, h, mode="RGBA", seed=10 + i)
        ours = preprocess_image(img, spec)
        ref = tf(img.convert(color_mode)).numpy()
        assert ours.shape == ref.shape == shape
        assert np.abs(ours - ref).max() <= 1e-6


# --------------------------------------------------------------------------- predictions


def test_runtime_does_not_import_torch(image_export, images):
    _, out = image_export
    code = (
        "import sys, json, numpy as np\n"
        "from PIL import Image\n"
        "from anpyc.export.runtime import load_export\n"
        f"m = load_export({str(out)!r}, threads=1)\n"
        f"p = m.predict(0, [{str(images[0])!r}, Image.open({str(images[1])!r}), np.zeros((3, 32, 32), np.float32)])\n"
        "assert len(p) == 3\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'onnx', 'timm'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_predict_matches_torch_on_timm_preprocessed_images(image_export, images):
    import torch
    from timm.data import create_transform

    src, out = image_export
    spec = src.input_spec
    tf = create_transform(spec.shape, interpolation=spec.interpolation, mean=spec.mean, std=spec.std,
                          crop_pct=spec.crop_pct, is_training=False)
    models = load_export(out, threads=1)
    for task in (0, 1):
        preds = models.predict(task, images, top_k=5)
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in images])
        probs = torch.softmax(src.reference_forward(task, x), dim=1).numpy()
        assert len(preds) == len(images)
        for pr, p in zip(preds, probs):
            assert [c["index"] for c in pr] == list(np.argsort(-p, kind="stable"))
            assert [c["label"] for c in pr] == [f"t{task}c{c['index']}" for c in pr]
            np.testing.assert_allclose([c["score"] for c in pr], np.sort(p)[::-1], atol=1e-5)
            assert sum(c["score"] for c in pr) == pytest.approx(1.0, abs=1e-9)


def test_input_forms_agree(image_export, images):
    _, out = image_export
    models = load_export(out)
    x = models.preprocess(0, images)
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32
    ref = models.logits(0, images)
    assert np.array_equal(models.logits(0, x), ref)  # one batch array
    assert np.array_equal(models.logits(0, list(x)), ref)  # a list of samples
    assert np.array_equal(models.logits(0, [Image.open(p) for p in images]), ref)  # PIL images
    assert np.array_equal(models.logits(0, [p.read_bytes() for p in images]), ref)  # encoded bytes
    assert np.array_equal(models.logits(0, str(images[0])), ref[:1])  # one path
    assert np.array_equal(models.logits(0, x[1]), ref[1:2])  # one sample
    assert np.array_equal(models.logits(0, x.astype(np.float64)), ref)  # float64 is cast
    big = np.repeat(x, 50, axis=0)  # more than one onnxruntime chunk
    assert np.allclose(models.logits(0, big)[::50], ref, atol=1e-6)


def test_top_k_and_sessions(image_export):
    _, out = image_export
    models = load_export(out, threads=2)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert [len(p) for p in models.predict(0, x)] == [1, 1]
    assert [len(p) for p in models.predict(0, x, top_k=99)] == [5, 5]  # capped at the number of classes
    scores = [c["score"] for c in models.predict(0, x, top_k=5)[0]]
    assert scores == sorted(scores, reverse=True)
    assert models.session(0) is models.session(0) and models.session(0) is not models.session(1)
    opts = models.session(0).get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert sorted(models.tasks) == [0, 1] and models.tasks[1]["classes"] == [f"t1c{i}" for i in range(5)]
    with pytest.raises(DataError, match="top_k must be a positive integer, got 0"):
        models.predict(0, x, top_k=0)


def test_vector_task(vector_export):
    src, out = vector_export
    import torch

    models = load_export(out)
    x = np.random.default_rng(1).standard_normal((4, 20)).astype(np.float32)
    ref = src.reference_forward(0, torch.from_numpy(x)).numpy()
    assert np.abs(models.logits(0, x) - ref).max() <= 1e-4
    assert [p[0]["index"] for p in models.predict(0, x)] == list(ref.argmax(1))
    with pytest.raises(InputShapeError, match=r"task 0 takes vectors of shape \[20\], not images"):
        models.predict(0, [_random_image(8, 8)])
    with pytest.raises(InputShapeError, match=r"input has shape \[4, 21\], task 0 takes \[20\] or \[batch, 20\]"):
        models.predict(0, np.zeros((4, 21), np.float32))


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_give_clear_errors(image_export, tmp_path):
    _, out = image_export
    models = load_export(out)
    with pytest.raises(UnknownTaskError, match=r"unknown task 7; this export holds tasks \[0, 1\] \(pass one of"):
        models.predict(7, np.zeros((3, 32, 32), np.float32))
    with pytest.raises(UnknownTaskError, match=r"unknown task 'x'"):
        models.sidecar("x")
    with pytest.raises(InputShapeError, match=r"has shape \[3, 16, 16\], task 0 takes \[3, 32, 32\]"):
        models.predict(0, np.zeros((3, 16, 16), np.float32))
    with pytest.raises(InputShapeError, match=r"it has 1 channel\(s\), the model takes 3"):
        models.predict(0, np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(InputShapeError, match=r"dtype uint8, task 0 takes float32 tensors"):
        models.predict(0, np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(InputShapeError, match="NaN or inf"):
        models.predict(0, np.full((3, 32, 32), np.nan, np.float32))
    with pytest.raises(InputShapeError, match=r"input #0 has shape \[1, 3, 32, 32\], task 0 takes \[3, 32, 32\]"):
        models.predict(0, [np.zeros((1, 3, 32, 32), np.float32)])  # batches inside a list are samples
    with pytest.raises(InputShapeError, match="no inputs"):
        models.predict(0, [])
    with pytest.raises(InputShapeError, match="is a dict"):
        models.predict(0, [{"a": 1}])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    with pytest.raises(ImageReadError, match=r"garbage.png cannot be read \(UnidentifiedImageError\)"):
        models.predict(0, [garbage])
    with pytest.raises(ImageReadError, match="does not exist"):
        models.predict(0, [tmp_path / "missing.png"])
    truncated = tmp_path / "truncated.png"
    buf = io.BytesIO()
    _random_image(64, 64).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:200])
    with pytest.raises(ImageReadError, match="truncated.png cannot be read"):
        models.predict(0, [truncated])


def _copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_tampered_or_escaping_exports_are_refused(image_export, tmp_path):
    _, out = image_export
    d = _copy_export(out, tmp_path / "copy")
    assert load_export(d).task_ids == [0, 1]

    with open(d / "task-001.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportDirError, match=r"task-001.onnx does not match its sidecar \(sha256 .*modified"):
        load_export(d)
    (d / "task-001.onnx").write_bytes((out / "task-001.onnx").read_bytes())

    outside = tmp_path / "outside.onnx"
    outside.write_bytes((out / "task-000.onnx").read_bytes())
    sidecar = json.loads((d / "task-000.json").read_text())
    (d / "task-000.json").write_text(json.dumps(dict(sidecar, file="../outside.onnx")))
    with pytest.raises(ExportDirError, match="points outside the export directory"):
        load_export(d)
    (d / "task-000.json").write_text(json.dumps(dict(sidecar, file=str(outside))))  # absolute path
    with pytest.raises(ExportDirError, match="points outside the export directory"):
        load_export(d)
    (d / "escape.onnx").symlink_to(outside)  # a symlink that leaves the folder
    (d / "task-000.json").write_text(json.dumps(dict(sidecar, file="escape.onnx")))
    with pytest.raises(ExportDirError, match="points outside the export directory"):
        load_export(d)
    (d / "task-000.json").write_text(json.dumps(dict(sidecar, version=99)))
    with pytest.raises(ExportDirError, match=r"sidecar version 99, this anpyc reads \[1\]"):
        load_export(d)
    (d / "task-000.json").write_text("{not json")
    with pytest.raises(ExportDirError, match="is not valid JSON"):
        load_export(d)
    (d / "task-000.json").write_text(json.dumps(sidecar))

    manifest = json.loads((d / "manifest.json").read_text())
    manifest["tasks"][0]["sidecar"] = "../../etc/passwd"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportDirError, match="the sidecar of task 0 points outside the export directory"):
        load_export(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ExportDirError, match=r"export manifest .* is missing \(export the run first"):
        load_export(d)
    with pytest.raises(ExportDirError, match="does not exist"):
        load_export(tmp_path / "nope")
    with pytest.raises(DataError, match="threads must be a positive integer"):
        load_export(out, threads=0)


# --------------------------------------------------------------------------- CLI: anpyc predict


def test_cli_predict_json_and_csv(image_export, images):
    from anpyc.cli.app import app

    _, out = image_export
    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["predict", str(out), "--task", "1", *map(str, images), "--top-k", "3", "--threads", "1"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    expected = load_export(out).predict(1, images, top_k=3)
    assert [row["input"] for row in rows] == [str(p) for p in images]
    assert [row["predictions"] for row in rows] == expected
    assert all(row["task"] == 1 for row in rows)

    r = runner.invoke(app, args + ["--format", "csv"])
    assert r.exit_code == 0, r.output
    table = list(csv.reader(io.StringIO(r.stdout)))
    assert table[0] == ["input", "rank", "index", "label", "score"]
    assert len(table) == 1 + 3 * len(images)
    assert table[1][:4] == [str(images[0]), "1", str(expected[0][0]["index"]), expected[0][0]["label"]]
    assert float(table[1][4]) == pytest.approx(expected[0][0]["score"], abs=1e-6)


def test_cli_predict_errors(image_export, vector_export, images, tmp_path):
    from anpyc.cli.app import app

    _, out = image_export
    runner = CliRunner(env={"COLUMNS": "200"})
    r = runner.invoke(app, ["predict", str(out), "--task", "4", str(images[0])])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: unknown task 4; this export holds tasks [0, 1] (pass one of those task ids)"
    garbage = tmp_path / "g.jpg"
    garbage.write_bytes(b"\xff\xd8 not really")
    r = runner.invoke(app, ["predict", str(out), "--task", "0", str(garbage)])
    assert r.exit_code == 2 and "g.jpg cannot be read" in r.stderr
    r = runner.invoke(app, ["predict", str(out), "--task", "0", str(images[0]), "--top-k", "0"])
    assert r.exit_code == 2 and "top-k must be >= 1" in _flat(r.output)
    r = runner.invoke(app, ["predict", str(out), "--task", "0", str(images[0]), "--format", "xml"])
    assert r.exit_code == 2 and "xml" in _flat(r.output)
    r = runner.invoke(app, ["predict", str(out), "--task", "0", str(tmp_path / "missing.png")])
    assert r.exit_code == 2 and "does not exist" in _flat(r.output)
    r = runner.invoke(app, ["predict", str(vector_export[1]), "--task", "0", str(images[0])])
    assert r.exit_code == 2 and "takes vectors of shape [20], not images" in r.stderr
    r = runner.invoke(app, ["predict", str(tmp_path), "--task", "0", str(images[0])])
    assert r.exit_code == 2 and "manifest" in r.stderr and "is missing" in r.stderr
    r = runner.invoke(app, ["predict", str(out), "--task", "0", str(images[0]), "--int8"])
    assert r.exit_code == 2 and "task 0 has no int8 model" in r.stderr


# --------------------------------------------------------------------------- task routing (no task id)


@pytest.fixture(scope="module")
def routing_export(tmp_path_factory):
    """Two vector tasks with fixed logits per input: 2 classes and 5 classes (entropy normalisation matters)."""
    import torch
    from torch import nn

    from anpyc.export.testing import FakeSource

    logp = {
        # columns: one per basis input e0, e1, e2
        0: [[0.7, 0.3], [0.5, 0.5], [0.99, 0.01]],
        1: [[0.7, 0.075, 0.075, 0.075, 0.075], [0.96, 0.01, 0.01, 0.01, 0.01], [0.2] * 5],
    }
    modules = {}
    for t, cols in logp.items():
        m = nn.Linear(3, len(cols[0]), bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.log(torch.tensor(cols, dtype=torch.float32)).T)
        modules[t] = m
    spec = InputSpec(kind="vector", shape=(3,), mean=(), std=(), interpolation="bilinear", crop_pct=1.0,
                     color_mode="RGB")
    src = FakeSource(modules, spec, backbone_name="linear", classes={0: ["a", "b"], 1: list("vwxyz")},
                     names={0: "two", 1: "five"})
    out = tmp_path_factory.mktemp("export-route")
    export_all(src, out)
    return out, logp


def _norm_entropy(p):
    p = np.asarray(p, dtype=np.float64)
    return float(-(p * np.log(p)).sum() / np.log(len(p)))


def test_route_picks_lowest_normalised_entropy(routing_export):
    from anpyc.export.runtime import normalized_entropy

    out, logp = routing_export
    models = load_export(out)
    x = np.concatenate([np.eye(3, dtype=np.float32), np.zeros((1, 3), np.float32)])
    routed = models.route(x, top_k=2)
    # e0: raw entropy prefers the 2-class task (0.61 < 1.03 nats), normalised entropy the 5-class one (0.88 > 0.64)
    assert [r["task"] for r in routed] == [1, 1, 0, 0]  # the last input: both uniform, the tie goes to task 0
    assert [r["name"] for r in routed] == ["five", "five", "two", "two"]
    for i, r in enumerate(routed[:3]):
        want = {t: 1 - _norm_entropy(logp[t][i]) for t in (0, 1)}
        assert r["confidence"] == pytest.approx(want[r["task"]], abs=1e-5)
        assert [c["task"] for c in r["candidates"]] == sorted(want, key=lambda t: -want[t])
        assert {c["task"]: c["confidence"] for c in r["candidates"]} == pytest.approx(want, abs=1e-5)
        assert r["predictions"] == models.predict(r["task"], x[i], top_k=2)[0]
    assert routed[3]["confidence"] == pytest.approx(0.0, abs=1e-6)
    assert routed[0]["predictions"][0]["label"] == "v" and routed[2]["predictions"][0]["label"] == "a"
    assert normalized_entropy(np.array([[0.5, 0.5], [1.0, 0.0]])) == pytest.approx([1.0, 0.0])
    assert normalized_entropy(np.array([[1.0]])) == pytest.approx([1.0])  # one class: no evidence


def test_route_agrees_with_every_task_prediction(image_export, images):
    _, out = image_export
    models = load_export(out)
    routed = models.route(images, top_k=3)
    for i, r in enumerate(routed):
        conf = {t: 1 - _norm_entropy([c["score"] for c in models.predict(t, images[i], top_k=5)[0]]) for t in (0, 1)}
        best = max(conf, key=lambda t: (conf[t], -t))
        assert r["task"] == best and r["confidence"] == pytest.approx(conf[best], abs=1e-6)
        assert r["predictions"] == models.predict(best, images[i], top_k=3)[0]
    with pytest.raises(DataError, match="top_k must be a positive integer"):
        models.route(images, top_k=0)
    with pytest.raises(InputShapeError, match="has shape"):
        models.route(np.zeros((2, 3, 8, 8), np.float32))


def test_cli_predict_task_auto(image_export, images):
    from anpyc.cli.app import app

    _, out = image_export
    runner = CliRunner(env={"COLUMNS": "200"})
    expected = load_export(out).route(images, top_k=2)
    r = runner.invoke(app, ["predict", str(out), "--task", "auto", *map(str, images), "--top-k", "2"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["task"] for row in rows] == [e["task"] for e in expected]
    assert [row["confidence"] for row in rows] == [e["confidence"] for e in expected]
    assert [row["predictions"] for row in rows] == [e["predictions"] for e in expected]
    assert all(row["routed"] is True for row in rows)
    r = runner.invoke(app, ["predict", str(out), "--task", "AUTO", str(images[0]), "--format", "csv"])
    assert r.exit_code == 0, r.output
    table = list(csv.reader(io.StringIO(r.stdout)))
    assert table[0] == ["input", "task", "confidence", "rank", "index", "label", "score"]
    assert table[1][:2] == [str(images[0]), str(expected[0]["task"])]
    assert float(table[1][2]) == pytest.approx(expected[0]["confidence"], abs=1e-6)
    r = runner.invoke(app, ["predict", str(out), "--task", "any", str(images[0])])
    assert r.exit_code == 2 and "'any' is neither a task id nor 'auto'" in _flat(r.output)
