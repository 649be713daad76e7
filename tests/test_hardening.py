"""Issue 23, case by case: bounded memory for any input, every file field validated, one-line errors instead of
tracebacks and HTTP 500s. Every test that feeds hostile input runs under a memory limit (RLIMIT_AS, in this
process for the duration of the case, or in the subprocess it starts), so a regression fails the test instead of
the machine; the RSS figures are measured on `anpyc predict` and `anpyc serve` subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Served, png_bytes
from PIL import Image

from anpyc.errors import RunDirError, StateFileError
from anpyc.export.errors import ExportDirError, ImageReadError
from anpyc.export.limits import Limits
from anpyc.export.runtime import load_export

from test_bad_inputs import FAST, _state, api_error, intact, invoke, snapshot, user_error

ROOT = Path(__file__).resolve().parents[1]
GB = 1024 ** 3


@contextlib.contextmanager
def memory_limit(extra: int = 2 * GB):
    """This process may map at most ``extra`` more bytes until the block ends (a bomb is a MemoryError)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def deadline(seconds: int = 60):
    """A case that hangs (reading /dev/zero) fails after ``seconds`` instead of hanging the suite."""
    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# `anpyc ARGS` that writes its own peak RSS (KB) to $ANPYC_RSS_OUT when it exits: a direct child of this process
# would inherit this process's peak at exec (Linux keeps the old image's high-water mark), a grandchild does not
_MEASURED = ("import atexit, os, resource, runpy, sys; atexit.register(lambda: open(os.environ['ANPYC_RSS_OUT'], 'w')"
             ".write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))); sys.argv = ['anpyc', *sys.argv[1:]]; "
             "runpy.run_module('anpyc.cli', run_name='__main__')")


def run_measured(*args: str) -> tuple[int, float, str, str]:
    """(exit code, peak RSS in MB, stdout, stderr) of ``anpyc ARGS`` in a grandchild process (a shell in between)
    whose address space is limited to 4 GB."""
    with tempfile.TemporaryDirectory() as d:
        rss = Path(d) / "rss"
        script = f'ulimit -v {4 * GB // 1024}; "$0" "$@"; exit $?'  # not `exec`: python stays a grandchild
        p = subprocess.run(["sh", "-c", script, sys.executable, "-c", _MEASURED, *args], capture_output=True,
                           timeout=300, env={**os.environ, "MALLOC_ARENA_MAX": "2", "ANPYC_RSS_OUT": str(rss)})
        return p.returncode, int(rss.read_text()) / 1024, p.stdout.decode(), p.stderr.decode()




def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """Small files that decode (or would resize) to gigabytes, and large ones within the limits."""
    d = tmp_path_factory.mktemp("hostile")
    files = {
        "wide.png": _encode(Image.new("L", (1_000_000, 1), 7)),  # 1 KB, 1,000,000 x 1
        "wider.png": _encode(Image.new("L", (4_000_000, 1), 7)),  # 4 KB: a MemoryError before
        "big.png": _encode(Image.new("RGB", (12_000, 12_000), (1, 2, 3))),  # 450 KB, 144 megapixels
        "big.jpg": _encode(Image.new("RGB", (12_000, 12_000), (1, 2, 3)), "JPEG", quality=30),
        "rgba.png": _encode(Image.new("RGBA", (4000, 4000), (1, 2, 3, 4))),  # 16 MP, at the limit: decoded
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


def _rewrite(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _rehash(run: Path, name: str) -> None:
    """Put the sha256 of state file ``name`` into run.json, as a crafted run would."""
    f = _state(run) / name
    _rewrite(run / "run.json", lambda m: m["files"].__setitem__(name, hashlib.sha256(f.read_bytes()).hexdigest()))


def _copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ================================================================================================ 1. images

@pytest.mark.parametrize("name, needle", [("wide.png", "aspect ratio of 1,000,000:1 over the limit of 32:1"),
                                          ("wider.png", "aspect ratio of 4,000,000:1"),
                                          ("big.png", "12000x12000 pixels (144.0 megapixels), over the limit of 16")])
def test_01_a_small_image_that_decodes_to_gigabytes_is_refused_in_little_memory(export_dir, hostile, name, needle):
    rc, peak, _, err = run_measured("predict", str(export_dir), str(hostile[name]), "--task", "0")
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert peak < 500, peak


@pytest.mark.parametrize("name", ["big.jpg", "rgba.png"])
def test_01_large_images_within_the_limits_are_answered_in_bounded_memory(export_dir, hostile, name):
    rc, peak, out, err = run_measured("predict", str(export_dir), str(hostile[name]), "--task", "0")
    assert rc == 0, err
    assert json.loads(out)[0]["predictions"][0]["score"] > 0
    assert peak < 500, peak


def test_01_a_jpeg_over_the_pixel_limit_is_decoded_at_reduced_scale(hostile):
    from anpyc.export.preprocess import open_image

    with memory_limit():
        assert open_image(hostile["big.jpg"], "big.jpg").size == (3000, 3000)  # 1/4 scale: the least that fits
        assert open_image(hostile["big.jpg"], "big.jpg", Limits(max_pixels=2_250_000)).size == (1500, 1500)
        with pytest.raises(ImageReadError, match=r"12000x12000 pixels \(144.0 megapixels\), over the limit of 1 "):
            open_image(hostile["big.jpg"], "big.jpg", Limits(max_pixels=1_000_000))  # not even 1/8 fits
        with warnings.catch_warnings():  # Pillow's own warning above 89 megapixels (the limit is raised here)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            assert open_image(hostile["big.png"], "big.png", Limits(max_pixels=150_000_000)).size == (12000, 12000)


def test_01_the_limits_are_settings(export_dir, hostile):
    r = invoke("predict", export_dir, hostile["wide.png"], "--task", "0", "--max-aspect", "2000000")
    assert r.exit_code == 0, r.output
    r = invoke("predict", export_dir, hostile["wide.png"], "--task", "0", "--max-aspect", "0.5")
    assert r.exit_code == 2 and "max_aspect is 0.5, not a number in 1..1e+09" in r.stderr
    with pytest.raises(ImageReadError, match="megapixels"):
        load_export(export_dir, limits=Limits(max_pixels=100)).predict(0, [png_bytes(40, 30)])


def test_01_a_panorama_is_resized_in_its_crop_window_with_the_same_pixels(monkeypatch):
    """Above the resize budget only the centre crop is resized (Pillow's resize with box): bilinear gives the same
    pixels as the full resize up to one level of rounding."""
    import anpyc.export.preprocess as pp
    from anpyc.task import InputSpec

    rng = np.random.default_rng(0)
    for w, h, out, crop in [(300, 40, 24, 0.875), (50, 400, 30, 1.0), (120, 90, 16, 2.0), (400, 30, 20, 0.5)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        spec = InputSpec("image", (3, out, out), (0.0,) * 3, (1.0,) * 3, "bilinear", crop, "RGB")
        full = pp.preprocess_image(img, spec)
        monkeypatch.setattr(pp, "_RESIZE_BUDGET", 1)
        window = pp.preprocess_image(img, spec)
        monkeypatch.setattr(pp, "_RESIZE_BUDGET", 1 << 24)
        assert window.shape == full.shape == (3, out, out)
        assert np.abs(window - full).max() <= 1 / 255 + 1e-6, (w, h, out, crop)


def test_01_the_server_stays_under_1gb_with_32_concurrent_adversarial_images(export_dir, hostile):
    payloads = [hostile[n].read_bytes() for n in ("big.png", "big.jpg", "rgba.png", "wide.png")]
    srv = Served(export_dir, env={"MALLOC_ARENA_MAX": "2"})
    try:
        async def flood() -> list[int]:
            async with httpx.AsyncClient(base_url=srv.base, timeout=120,
                                         limits=httpx.Limits(max_connections=32)) as c:
                async def one(i: int) -> int:
                    files = {"f": (f"{i}.png", payloads[i % len(payloads)], "image/png")}
                    return (await c.post("/tasks/0/predict", files=files)).status_code

                return await asyncio.gather(*(one(i) for i in range(32)))

        statuses = asyncio.run(flood())
        hwm = next(int(line.split()[1]) / 1024 for line in Path(f"/proc/{srv.proc.pid}/status").read_text()
                   .splitlines() if line.startswith("VmHWM:"))
        assert httpx.get(f"{srv.base}/health", timeout=10).status_code == 200
    finally:
        log = srv.stop()
    assert "Traceback" not in log and " 500 " not in log, log[-2000:]
    assert sorted(statuses) == [200] * 16 + [400] * 16, statuses  # big.png and wide.png refused, the others answered
    assert hwm < 1024, f"server peak RSS {hwm:.0f} MB"


def test_01_predictions_beyond_the_slots_wait_and_beyond_the_queue_get_503(export_dir):
    from anpyc.export.server import create_app

    app = create_app(export_dir, limits=Limits(max_inferences=1, max_waiting=1))
    models = app.state.models
    entered, release = threading.Event(), threading.Event()
    real = models.predict

    def held(*args, **kwargs):
        entered.set()
        release.wait(60)
        return real(*args, **kwargs)

    models.predict = held
    x = {"inputs": np.zeros(models.input_spec(0).shape, np.float32).tolist()}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://anpyc") as c:
            first = asyncio.create_task(c.post("/tasks/0/predict", json=x))
            await asyncio.to_thread(entered.wait, 60)  # the first holds the only slot
            second = asyncio.create_task(c.post("/tasks/0/predict", json=x))  # waits in the queue
            for _ in range(1000):
                if app.middleware_stack is not None and _gate(app).waiting == 1:
                    break
                await asyncio.sleep(0.01)
            third = await c.post("/predict", json=x)  # slot and queue full: 503 at once
            health = await c.get("/health")  # not a prediction: never gated
            release.set()
            return await first, await second, third, health

    first, second, third, health = asyncio.run(scenario())
    assert (first.status_code, second.status_code, health.status_code) == (200, 200, 200)
    assert third.status_code == 503 and third.headers["retry-after"] == "1"
    assert third.json() == {"error": "Busy", "detail": "the server is busy: 1 predictions running and 1 waiting "
                                                       "(retry in a moment, or raise --max-inferences/--max-waiting)"}


def _gate(app):
    from anpyc.export.middleware import InferenceGate

    layer = app.middleware_stack
    while not isinstance(layer, InferenceGate):
        layer = layer.app
    return layer


# ================================================================================================ 2. input specs

SPECS = {
    "huge shape": ({"shape": [1, 100000, 100000]}, "field 'input_spec.shape' [1, 100000, 100000] holds "
                                                   "10,000,000,000 values per sample, more than 16,777,216"),
    "zero size": ({"shape": [3, 0, 16]}, "field 'input_spec.shape[1]' is the integer 0, outside 1..16777216"),
    "negative size": ({"shape": [3, -16, 16]}, "field 'input_spec.shape[1]' is the integer -16, outside"),
    "string spec": ("224", "field 'input_spec' is the string '224', not an object"),
    "crop_pct 0": ({"crop_pct": 0}, "field 'input_spec.crop_pct' is the integer 0, outside 0.1..2"),
    "crop_pct negative": ({"crop_pct": -1.0}, "field 'input_spec.crop_pct' is the number -1.0, outside 0.1..2"),
    "std 0": ({"std": [0.0, 0.3, 0.3]}, "field 'input_spec.std[0]' is the number 0.0, outside 0.0001..10000"),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_02_a_sidecar_input_spec_out_of_bounds_is_refused(export_dir, tmp_path, case):
    change, needle = SPECS[case]
    exp = _copy_export(export_dir, tmp_path / "exp")
    _rewrite(exp / "task-000.json", lambda s: s.__setitem__("input_spec", change if isinstance(change, str) else
                                                             {**s["input_spec"], **change}))
    before = snapshot(exp)
    with memory_limit():
        r = invoke("predict", exp, ROOT / "tests" / "conftest.py", "--task", "0")
    line = user_error(r, needle, "re-export the run with anpyc export")
    assert line.startswith(f"error: {exp / 'task-000.json'}: "), line
    intact(before)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_02_a_run_json_input_spec_out_of_bounds_is_refused(run_copy, case):
    change, needle = SPECS[case]
    _rewrite(run_copy / "run.json", lambda m: m.__setitem__("input_spec", change if isinstance(change, str) else
                                                            {**m["input_spec"], **change}))
    before = snapshot(run_copy)
    for command in ("eval", "export", "inspect"):
        with memory_limit():
            line = user_error(invoke(command, run_copy), needle, "restore run.json")
        assert line.startswith(f"error: run manifest {run_copy / 'run.json'}: "), line
    intact(before)


def test_02_a_sidecar_with_fewer_classes_than_model_outputs_is_refused(export_dir, tmp_path):
    exp = _copy_export(export_dir, tmp_path / "exp")
    _rewrite(exp / "task-000.json", lambda s: s.update(classes=s["classes"][:1], num_classes=1))
    with pytest.raises(ExportDirError) as e:
        load_export(exp, preload=True)
    api_error(e.value, "the ONNX model of task 0 gives", "its sidecar says 'logits' [batch, 1] (1 classes)")
    models = load_export(exp)  # sessions on first use: the same check, before any input is decoded
    with pytest.raises(ExportDirError, match=r"\[batch, 1\] \(1 classes\)"):
        models.predict(0, [png_bytes()])


@pytest.mark.parametrize("width, needle", [
    ("x", "cannot create 'cnn' with {'width': 'x'} (ValueError"),
    (10 ** 9, "backbone cnn cannot be built with {'width': 1000000000} (RuntimeError: Storage size calculation"),
    (100_000, "backbone cnn with {'width': 100000} does not build the trunk init.safetensors holds"),
    (-3, "negative dimension"),
])
def test_02_run_json_backbone_options_are_built_on_meta_before_anything_is_allocated(run_copy, width, needle):
    _rewrite(run_copy / "run.json", lambda m: m["backbone"]["kwargs"].__setitem__("width", width))
    before = snapshot(run_copy)
    with memory_limit(GB):  # width=100000 built for real would need gigabytes
        for args in (("eval", run_copy), ("export", run_copy, "--out", run_copy.parent / "exp")):
            line = user_error(invoke(*args), needle, "restore run.json")
            assert line.startswith(f"error: run manifest {run_copy / 'run.json'}: "), line
    intact(before)


def test_02_evaluation_batches_are_bounded_in_bytes(monkeypatch):
    import torch

    import anpyc.training as training

    monkeypatch.setattr(training, "EVAL_BATCH_BYTES", 3 * 10 * 4)  # three samples of 10 float32 values
    data = torch.utils.data.TensorDataset(torch.zeros(10, 10), torch.zeros(10, dtype=torch.long))
    sizes = []

    def forward(x):
        sizes.append(len(x))
        return torch.zeros(len(x), 2)

    assert training.correctness(forward, data, 256, torch.device("cpu")).tolist() == [True] * 10
    assert sizes == [3, 3, 3, 1]


def test_02_a_config_file_naming_no_model_is_one_line(tmp_path):
    for doc, needle in (({"model": {"name": ["cnn"]}}, "config key 'model.name' must be a model name, got ['cnn']"),
                        ({"model": "cnn", "data": {"source": 3}}, "config key 'data.source' must be a benchmark"),
                        ({"model": {"name": "cnn", "width": "x"}, "data": "synthetic"}, "cannot create 'cnn'")):
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps(doc))
        args = ("--data-opt", "samples_per_class=4") if doc.get("data") == "synthetic" else ()
        user_error(invoke("train", "--config", cfg, "--out", tmp_path / "run", *args, *FAST), needle)
        assert not (tmp_path / "run" / "run.json").exists()


# ================================================================================================ 3. metrics

def test_03_made_up_methods_and_paths_add_no_metric_series(export_dir):
    from starlette.testclient import TestClient

    from anpyc.export.server import create_app

    client = TestClient(create_app(export_dir, token="t"), raise_server_exceptions=False)

    def series() -> int:
        text = client.get("/metrics", headers={"Authorization": "Bearer t"}).text
        return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    client.request("FOO", "/x")  # the one series all of them fall into exists before the count
    before = series()
    for i in range(3000):
        assert client.request(f"FOO{i}", f"/x{i}").status_code == 401  # unauthenticated, made-up method and path
    assert series() == before + 2  # the /metrics scrape's own 200s (requests_total, one new status), nothing else
    text = client.get("/metrics", headers={"Authorization": "Bearer t"}).text
    assert 'anpyc_http_requests_total{method="other",route="unmatched",status="401"} 3001.0' in text
    assert "FOO" not in text and "/x1" not in text


# ================================================================================================ 4. file names

@pytest.mark.parametrize("name", ["/etc/passwd", "/dev/zero", "../run.json", "..", ".hidden", "a/b"])
def test_04_run_json_files_name_only_plain_files_in_the_generation(run_copy, name):
    digest = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() if name == "/etc/passwd" else "0" * 64
    _rewrite(run_copy / "run.json", lambda m: m["files"].__setitem__(name, digest))
    before = snapshot(run_copy)
    with deadline(60), memory_limit():
        for command in ("inspect", "eval"):
            user_error(invoke(command, run_copy), "run.json", "field 'files'", "not of the form")
    intact(before)


def test_04_a_generation_file_that_is_a_device_or_a_link_out_is_refused(run_copy):
    f = _state(run_copy) / "masks.safetensors"
    f.unlink()
    f.symlink_to("/dev/zero")
    with deadline(60), memory_limit():
        user_error(invoke("inspect", run_copy), "masks.safetensors", "is not a regular file")
    f.unlink()
    f.symlink_to("/etc/passwd")
    with deadline(60):
        user_error(invoke("eval", run_copy), "masks.safetensors", "is not a regular file")


def test_04_a_generation_file_run_json_does_not_list_is_refused(run_copy):
    (_state(run_copy) / "notes.txt").write_text("not part of the generation")
    before = snapshot(run_copy)
    user_error(invoke("eval", run_copy), "holds 'notes.txt', which run.json does not list")
    intact(before)


# ================================================================================================ 5. check at use

def test_05_an_onnx_file_swapped_after_loading_is_refused_not_served(export_dir, tmp_path):
    exp = _copy_export(export_dir, tmp_path / "exp")
    models = load_export(exp)  # hashes checked here; sessions not made yet
    (exp / "task-000.onnx").write_bytes((exp / "task-001.onnx").read_bytes())
    with pytest.raises(ExportDirError) as e:
        models.predict(0, [png_bytes()])
    api_error(e.value, "task-000.onnx does not match its sidecar", "modified or replaced")


def test_05_the_server_serves_the_bytes_it_checked_at_start(export_dir, tmp_path):
    from starlette.testclient import TestClient

    from anpyc.export.server import create_app

    exp = _copy_export(export_dir, tmp_path / "exp")
    x = {"inputs": np.random.default_rng(0).standard_normal(load_export(exp).input_spec(0).shape).tolist()}
    client = TestClient(create_app(exp))  # every session made at start
    want = client.post("/tasks/0/predict", json=x).json()
    (exp / "task-000.onnx").write_bytes((exp / "task-001.onnx").read_bytes())
    assert client.post("/tasks/0/predict", json=x).json() == want  # the swapped file is never read


# ================================================================================================ 6. owners

def _masks(run: Path, change) -> None:
    """Rewrite the run's mask file through ``change(owners, schema) -> (owners, schema)``, hash recorded."""
    import torch
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = _state(run) / "masks.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    owners, schema = change(load_file(str(path))["owners"], json.loads(meta["schema"]))
    save_file({"owners": owners.contiguous() if isinstance(owners, torch.Tensor) else owners}, str(path),
              metadata={**meta, "schema": json.dumps(schema)})
    _rehash(run, "masks.safetensors")


def test_06_an_owner_past_the_task_count_is_refused(run_copy, tmp_path):
    def task_200(owners, schema):
        owners = owners.clone()
        owners[3] = 200
        return owners, schema

    _masks(run_copy, task_200)
    before = snapshot(run_copy)
    needle = "unit 3 is owned by task index 200, but the file records 2 task(s)"
    for args in (("eval", run_copy), ("inspect", run_copy), ("export", run_copy, "--out", tmp_path / "exp")):
        user_error(invoke(*args), needle, "restore the run directory")
    intact(before)
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("case, needle", [
    ("short", "field 'schema.num_units' is 28, but the owner tensor holds 27"),
    ("int16", "field 'schema.dtype' says uint8, but the owners are int16 of shape [28]"),
    ("2-d", "field 'schema.dtype' says uint8, but the owners are uint8 of shape [4, 7]"),
    ("tasks", "records 5 task(s), the run state 2"),
])
def test_06_masks_of_the_wrong_length_dtype_or_task_count_are_refused(run_copy, case, needle):
    import torch

    def change(owners, schema):
        if case == "short":
            return owners[:-1].clone(), schema
        if case == "int16":
            return owners.to(torch.int16), schema
        if case == "2-d":
            return owners.reshape(4, 7).clone(), schema
        return owners, {**schema, "num_tasks": 5}

    _masks(run_copy, change)
    for command in ("inspect", "eval"):
        line = user_error(invoke(command, run_copy), needle)
        assert "(verified)" not in line


# ================================================================================================ 7. one-line errors

def test_07_an_onnx_file_of_random_bytes_with_a_matching_hash(export_dir, tmp_path):
    exp = _copy_export(export_dir, tmp_path / "exp")
    junk = np.random.default_rng(0).bytes(4096)
    (exp / "task-000.onnx").write_bytes(junk)
    _rewrite(exp / "task-000.json", lambda s: s.__setitem__("onnx_sha256", hashlib.sha256(junk).hexdigest()))
    img = tmp_path / "x.png"
    img.write_bytes(png_bytes())
    user_error(invoke("predict", exp, img, "--task", "0"), "task-000.onnx (task 0) cannot be loaded by onnxruntime",
               "re-export the task")
    user_error(invoke("serve", exp), "cannot be loaded by onnxruntime")  # refused at start, before binding


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.__setitem__("generation", str(m["generation"])), "field 'generation' is the string"),
    (lambda m: m.__setitem__("files", list(m["files"])), "field 'files' is a list of 7 items, not an object"),
    (lambda m: m.__setitem__("generation", -3), "field 'generation' is the integer -3, outside 1..1000000000"),
    (lambda m: m.__setitem__("version", True), "has format version True"),
    (lambda m: m["tasks"][0].__setitem__("classes", "t0c0"), "field 'tasks[0].classes' is the string 't0c0'"),
    (lambda m: m["config"].__setitem__("method", "nonexistent"),
     "config key 'method' has unknown value 'nonexistent' (choose one of: anpyc, anpyc-element"),
])
def test_07_run_json_fields_of_the_wrong_type(run_copy, change, needle):
    _rewrite(run_copy / "run.json", change)
    before = snapshot(run_copy)
    commands = [("eval", run_copy), ("export", run_copy, "--out", run_copy.parent / "exp"), ("inspect", run_copy),
                ("train", "--out", run_copy, "--resume", "--no-progress", "--no-plots")]
    for args in commands:
        if args[0] == "inspect" and "config key" in needle:
            continue  # inspect shows the recorded config, it builds nothing from it
        user_error(invoke(*args), needle)
    intact(before)
    assert not (run_copy.parent / "exp").exists()


@pytest.mark.parametrize("change, needle", [
    (lambda s: s.__setitem__("cursor", "done"), "field 'cursor' is the string 'done', not an object"),
    (lambda s: s["cursor"].__setitem__("task", "1"), "field 'cursor.task' is the string '1'"),
    (lambda s: s.__setitem__("acc_test", [[0.5], [0.5]]), "field 'acc_test[1]' is a list of 1 item, not a list of 2"),
    (lambda s: s["history"][0].__setitem__("params", "many"), "field 'history[0].params' is the string 'many'"),
    (lambda s: s["tasks"][1].__setitem__("index", 5), "field 'tasks[1].index' is 5, but the record is number 1"),
    (lambda s: s.__setitem__("acc_val", [[float("nan")]]), "is not valid JSON (NaN is not a JSON value)"),
])
def test_07_state_json_of_the_wrong_types(run_copy, change, needle):
    path = _state(run_copy) / "state.json"
    _rewrite(path, change)
    _rehash(run_copy, "state.json")
    before = snapshot(run_copy)
    for command in ("inspect", "eval"):
        user_error(invoke(command, run_copy), f"run state {path}" if "NaN" not in needle else "state.json", needle)
    intact(before)


@pytest.mark.parametrize("task", ["²", "1" * 5000, "٣", "0x1", "1e3"])
def test_07_task_ids_that_are_not_ascii_digits(export_dir, run_dir, task, tmp_path):
    from starlette.testclient import TestClient

    from anpyc.export.server import create_app

    client = TestClient(create_app(export_dir), raise_server_exceptions=False)
    x = {"inputs": np.zeros(load_export(export_dir).input_spec(0).shape).tolist()}
    for r in (client.get(f"/tasks/{task}"), client.post(f"/tasks/{task}/predict", json=x)):
        assert r.status_code == 404 and r.json()["error"] == "UnknownTaskError", r.text
        assert r.json()["detail"].startswith("unknown task '") and len(r.json()["detail"]) < 200
    img = tmp_path / "x.png"
    img.write_bytes(png_bytes())
    r = invoke("predict", export_dir, img, "--task", task)
    assert r.exit_code == 2 and "is neither a task id nor 'auto'" in " ".join(r.output.replace("│", " ").split())
    for command in ("eval", "export"):
        r = invoke(command, run_dir, "--task", task, "--out" if command == "export" else "--json",
                    *([tmp_path / "exp"] if command == "export" else []))
        assert r.exit_code == 2 and "Traceback" not in r.output and r.exception is None or \
            isinstance(r.exception, SystemExit), r.output
        assert not (tmp_path / "exp").exists()


def test_07_a_deeply_nested_json_body_is_a_400(export_dir):
    from starlette.testclient import TestClient

    from anpyc.export.server import create_app

    client = TestClient(create_app(export_dir), raise_server_exceptions=False)
    for body in (b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", b'{"inputs": [' + b"9" * 6000 + b"]}"):
        r = client.post("/tasks/0/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "PayloadError", r.text


# ================================================================================================ 8. small ones

def test_08_head_health_and_the_allow_header(export_dir):
    from starlette.testclient import TestClient

    from anpyc.export.server import create_app

    client = TestClient(create_app(export_dir, token="t"))
    r = client.head("/health")
    assert r.status_code == 200 and r.content == b""
    r = client.get("/tasks/0/predict", headers={"Authorization": "Bearer t"})
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json() == {"error": "HTTPError", "detail": "Method Not Allowed"}


def test_08_terminal_escapes_in_class_names_are_not_written_raw(export_dir, tmp_path):
    exp = _copy_export(export_dir, tmp_path / "exp")
    _rewrite(exp / "task-000.json", lambda s: s.__setitem__("classes", ["\x1b[31mred\x1b[0m", "a\nb"]))
    img = tmp_path / "x\x07.png"
    img.write_bytes(png_bytes())
    r = invoke("predict", exp, img, "--task", "0", "--format", "csv", "--top-k", "2")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    rows = r.stdout.splitlines()[1:]
    assert sorted(row.split(",")[3] for row in rows) == ["\\x1b[31mred\\x1b[0m", "a\\x0ab"]
    assert rows[0].split(",")[0] == str(tmp_path / "x\\x07.png")


def test_08_run_json_method_must_be_a_known_preset(run_copy):
    _rewrite(run_copy / "run.json", lambda m: m["config"].__setitem__("method", "nonexistent"))
    with pytest.raises(RunDirError) as e:
        import anpyc

        anpyc.ContinualLearner.load(run_copy)
    api_error(e.value, f"run manifest {run_copy / 'run.json'}: config key 'method' has unknown value 'nonexistent'")


def test_08_the_readme_states_the_versions_the_files_carry():
    from anpyc.export.formats import MANIFEST_VERSION, SIDECAR_VERSION
    from anpyc.maskfile import MASKS_VERSION
    from anpyc.rundir import RUN_VERSION

    text = (ROOT / "README.md").read_text()
    assert f"`format` `anpyc.run`, `version` {RUN_VERSION}," in text
    assert f"For `masks.safetensors` (version {MASKS_VERSION};" in text
    assert f"`format` `anpyc.export`, `version` {SIDECAR_VERSION}," in text
    assert MANIFEST_VERSION == 1 and "`manifest.json` (format `anpyc.export.manifest`, version 1)" in text


def test_08_state_errors_name_the_file_and_leave_it_alone(run_copy):
    path = _state(run_copy) / "state.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    _rehash(run_copy, "state.json")
    before = snapshot(run_copy)
    with pytest.raises(StateFileError) as e:
        import anpyc

        anpyc.ContinualLearner.load(run_copy)
    api_error(e.value, "state.json is nested too deeply")
    intact(before)
