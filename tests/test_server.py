"""The HTTP server, run for real: `anpyc serve` in a subprocess (uvicorn) on a free port, driven with httpx.

The token, /metrics and POST /predict (routing) are tested in test_server_ops.py.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from conftest import Served, png_bytes
from typer.testing import CliRunner

from anpyc.export import export_all, load_export
from anpyc.export.testing import timm_source

MAX_BODY = 256 * 1024  # the server under test refuses bodies over 256 KiB


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export-serve")
    export_all(timm_source("test_resnet", num_classes=4), out)
    return out


@pytest.fixture(scope="module")
def server(export_dir):
    srv = Served(export_dir, "--max-body-mb", str(MAX_BODY / 2**20))
    try:
        with httpx.Client(base_url=srv.base, timeout=30) as client:
            yield client, srv.proc
    finally:
        log = srv.stop()
    # Every bad request above was answered with a 4xx, none reached the 500 path.
    assert "Traceback" not in log and " 500 " not in log, log


def _assert_error(r: httpx.Response, status: int, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}
    for f in fragments:
        assert f in body["detail"], body
    return body


def test_health_and_tasks(server, export_dir):
    client, _ = server
    assert client.get("/health").json() == {"status": "ok", "tasks": [0], "anpyc_version": "0.1.0"}
    tasks = client.get("/tasks").json()["tasks"]
    sidecar = json.loads((export_dir / "task-000.json").read_text())
    assert len(tasks) == 1 and tasks[0]["id"] == 0
    assert tasks[0]["classes"] == sidecar["classes"] == ["t0c0", "t0c1", "t0c2", "t0c3"]
    assert tasks[0]["input_spec"] == sidecar["input_spec"]
    assert tasks[0]["onnx_sha256"] == sidecar["onnx_sha256"] and tasks[0]["int8"] is False
    assert client.get("/tasks/0").json() == tasks[0]
    _assert_error(client.get("/tasks/3"), 404, "unknown task '3'; this export holds tasks [0]")
    _assert_error(client.get("/tasks/abc"), 404, "unknown task 'abc'")


def test_predict_images_multipart(server, export_dir):
    client, _ = server
    imgs = [png_bytes(40, 30, 1), png_bytes(64, 64, 2)]
    files = [("files", ("a.png", imgs[0], "image/png")), ("files", ("b.png", imgs[1], "image/png"))]
    r = client.post("/tasks/0/predict", params={"top_k": 2}, files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = load_export(export_dir).predict(0, imgs, top_k=2)
    assert body["task"] == 0
    assert [res["filename"] for res in body["results"]] == ["a.png", "b.png"]
    assert [res["predictions"] for res in body["results"]] == expected
    one = client.post("/tasks/0/predict", files={"image": ("c.png", imgs[1], "image/png")}).json()
    assert one["results"][0]["predictions"] == expected[1][:1]


def test_predict_tensor_json(server, export_dir):
    client, _ = server
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expected = load_export(export_dir).predict(0, x, top_k=4)
    r = client.post("/tasks/0/predict?top_k=4", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    got = [res["predictions"] for res in r.json()["results"]]
    assert [[c["index"] for c in p] for p in got] == [[c["index"] for c in p] for p in expected]
    np.testing.assert_allclose([[c["score"] for c in p] for p in got], [[c["score"] for c in p] for p in expected],
                               atol=1e-6)
    single = client.post("/tasks/0/predict", json={"inputs": x[1].tolist()}).json()
    assert len(single["results"]) == 1 and single["results"][0]["predictions"][0]["index"] == expected[1][0]["index"]


def test_bad_requests_get_clear_4xx_and_server_stays_up(server):
    client, proc = server
    x = np.zeros((3, 32, 32), np.float32).tolist()
    # 400: garbage payloads, unreadable images
    _assert_error(client.post("/tasks/0/predict", content=b"{not json", headers={"content-type": "application/json"}),
                  400, "request body is not valid JSON")
    _assert_error(client.post("/tasks/0/predict", json={"data": x}), 400, 'JSON body has no "inputs" field')
    _assert_error(client.post("/tasks/0/predict", json=[1, 2]), 400, 'no "inputs" field')
    _assert_error(client.post("/tasks/0/predict", files={"f": ("x.png", b"garbage bytes", "image/png")}),
                  400, "image x.png cannot be read")
    _assert_error(client.post("/tasks/0/predict", data={"field": "text only"}, files={}), 415)  # urlencoded
    text_only = b'--zzz\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n--zzz--\r\n'
    r = client.post("/tasks/0/predict", content=text_only,
                    headers={"content-type": "multipart/form-data; boundary=zzz"})
    _assert_error(r, 400, "multipart body holds no file")
    r = client.post("/tasks/0/predict", content=b"\x00\x01garbage", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and r.json()["error"] == "PayloadError"
    # 404: unknown task, before the body is looked at
    _assert_error(client.post("/tasks/9/predict", json={"inputs": x}), 404, "unknown task '9'")
    # 422: wrong shape / dtype / values, bad query
    _assert_error(client.post("/tasks/0/predict", json={"inputs": [[1.0, 2.0]]}), 422,
                  "has shape [1, 2], task 0 takes [3, 32, 32] or [batch, 3, 32, 32]")
    _assert_error(client.post("/tasks/0/predict", json={"inputs": np.zeros((1, 1, 32, 32)).tolist()}), 422,
                  "it has 1 channel(s), the model takes 3")
    _assert_error(client.post("/tasks/0/predict", json={"inputs": [["a", "b"]]}), 422, "non-numbers")
    _assert_error(client.post("/tasks/0/predict", json={"inputs": [[1.0], [1.0, 2.0]]}), 422, "ragged")
    _assert_error(client.post("/tasks/0/predict", json={"inputs": np.full((3, 32, 32), 1e39).tolist()}), 422,
                  "NaN or inf")
    _assert_error(client.post("/tasks/0/predict?top_k=0", json={"inputs": x}), 422, "top_k")
    _assert_error(client.post("/tasks/0/predict?top_k=abc", json={"inputs": x}), 422, "top_k")
    # 415: other content types
    _assert_error(client.post("/tasks/0/predict", content=b"1,2,3", headers={"content-type": "text/csv"}), 415,
                  "content type 'text/csv' is not accepted")
    _assert_error(client.post("/tasks/0/predict", content=b"abc"), 415, "'(none)'")
    # 413: oversized bodies, declared or streamed (chunked, no Content-Length)
    big = b"0" * (MAX_BODY + 1)
    _assert_error(client.post("/tasks/0/predict", content=big, headers={"content-type": "application/json"}), 413,
                  f"exceeds {MAX_BODY} bytes")

    def chunks():
        for _ in range(8):
            yield b" " * (MAX_BODY // 4)

    r = client.post("/tasks/0/predict", content=chunks(), headers={"content-type": "application/json"})
    _assert_error(r, 413, f"exceeds {MAX_BODY} bytes")
    _assert_error(client.post("/tasks/0/predict", files={"f": ("big.png", big, "image/png")}), 413)
    # 405 / 404 of the framework are JSON too
    _assert_error(client.get("/tasks/0/predict"), 405)
    _assert_error(client.get("/nope"), 404)
    # still up and still right
    assert proc.poll() is None
    assert client.get("/health").status_code == 200
    r = client.post("/tasks/0/predict", json={"inputs": x})
    assert r.status_code == 200 and len(r.json()["results"]) == 1


def test_cli_serve_refuses_bad_arguments(tmp_path, export_dir):
    from anpyc.cli.app import app

    runner = CliRunner(env={"COLUMNS": "200"})
    r = runner.invoke(app, ["serve", str(tmp_path)])
    assert r.exit_code == 2 and "export manifest" in r.stderr and "is missing" in r.stderr
    r = runner.invoke(app, ["serve", str(export_dir), "--port", "70000"])
    assert r.exit_code == 2 and "port 70000 is not in 1..65535" in " ".join(r.output.replace("│", " ").split())
    r = runner.invoke(app, ["serve", str(export_dir), "--threads", "0"])
    assert r.exit_code == 2 and "threads must be >= 1" in " ".join(r.output.replace("│", " ").split())
    r = runner.invoke(app, ["serve", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.replace("│", " ").split())
