"""Serving for operations, over real HTTP against `anpyc serve` subprocesses: the bearer token (401s, also under
load), /metrics in Prometheus format (counted exactly), POST /predict without a task id, metrics across workers."""

from __future__ import annotations

import asyncio
import sys

import httpx
import numpy as np
import pytest
from conftest import Served, png_bytes
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from anpyc.export import export_all, load_export
from anpyc.export.server import check_exposure, is_loopback
from anpyc.export.testing import timm_source

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export-ops")
    export_all(timm_source("test_resnet", tasks=2, num_classes=3), out)
    return out


@pytest.fixture(scope="module")
def secured(export_dir):
    """The token comes from the environment variable (the way that keeps it out of the process list)."""
    srv = Served(export_dir, "--max-body-mb", "0.25", env={"ANPYC_SERVE_TOKEN": TOKEN})
    try:
        yield srv
    finally:
        log = srv.stop()
    assert "Traceback" not in log and " 500 " not in log, log


def _metrics(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(sample name, sorted labels): value}."""
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def _count(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _assert_401(r: httpx.Response, detail: str, challenge: str) -> None:
    assert r.status_code == 401, r.text
    assert r.json() == {"error": "Unauthorized",
                        "detail": f"{detail} (send the header Authorization: Bearer <token> that the server was "
                                  "started with)"}
    assert r.headers["www-authenticate"] == challenge


def test_every_route_but_health_needs_the_token(secured, export_dir):
    x = {"inputs": np.zeros((1, 3, 32, 32), np.float32).tolist()}
    with httpx.Client(base_url=secured.base, timeout=30) as c:
        assert c.get("/health").json()["status"] == "ok"  # open: probes carry no token
        calls = [("GET", "/tasks", {}), ("GET", "/tasks/0", {}), ("POST", "/tasks/0/predict", {"json": x}),
                 ("POST", "/predict", {"json": x}), ("GET", "/metrics", {}), ("GET", "/nope", {})]
        for method, path, kw in calls:
            _assert_401(c.request(method, path, **kw), "missing bearer token", 'Bearer realm="anpyc"')
            for bad in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", "Bearer", TOKEN):
                _assert_401(c.request(method, path, headers={"Authorization": bad}, **kw), "wrong bearer token",
                            'Bearer realm="anpyc", error="invalid_token"')
        # refused before the body is read: an oversized body without the token is a 401, not a 413
        big = b"0" * (1024 * 1024)
        r = c.post("/tasks/0/predict", content=big, headers={"content-type": "application/json"})
        _assert_401(r, "missing bearer token", 'Bearer realm="anpyc"')
        r = c.post("/tasks/0/predict", content=big, headers={"content-type": "application/json", **AUTH})
        assert r.status_code == 413
        assert c.get("/tasks", headers=AUTH).json()["tasks"][1]["id"] == 1
        assert c.get("/tasks/0", headers={"authorization": f"bearer {TOKEN}"}).status_code == 200  # scheme: any case
        r = c.post("/tasks/1/predict", json=x, headers=AUTH)
        assert r.status_code == 200 and r.json()["results"][0]["predictions"] == load_export(export_dir).predict(
            1, np.asarray(x["inputs"], np.float32))[0]


def test_predict_without_a_task_id_routes(secured, export_dir):
    imgs = [png_bytes(36, 36, seed) for seed in (1, 2, 3)]
    expected = load_export(export_dir).route(imgs, top_k=2)
    with httpx.Client(base_url=secured.base, timeout=30, headers=AUTH) as c:
        r = c.post("/predict", params={"top_k": 2}, files=[("f", (f"{i}.png", b, "image/png"))
                                                            for i, b in enumerate(imgs)])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "auto" and body["criterion"].startswith("lowest normalised predictive entropy")
        assert [res["filename"] for res in body["results"]] == ["0.png", "1.png", "2.png"]
        assert [{k: v for k, v in res.items() if k != "filename"} for res in body["results"]] == expected
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
        got = c.post("/predict", json={"inputs": x.tolist()}).json()["results"]
        want = load_export(export_dir).route(x)
        assert [g["task"] for g in got] == [w["task"] for w in want]
        np.testing.assert_allclose([g["confidence"] for g in got], [w["confidence"] for w in want], atol=1e-6)
        assert c.post("/predict", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        assert c.post("/predict", json={"inputs": [[1.0]]}).status_code == 422
        assert c.post("/predict?top_k=0", json={"inputs": x.tolist()}).status_code == 422


def test_metrics_count_requests_errors_latency_and_routes(secured):
    x = {"inputs": np.zeros((2, 3, 32, 32), np.float32).tolist()}
    with httpx.Client(base_url=secured.base, timeout=30, headers=AUTH) as c:
        before = _metrics(c)
        for _ in range(3):
            assert c.post("/tasks/0/predict", json=x).status_code == 200
        assert c.post("/tasks/1/predict", json=x).status_code == 200
        for _ in range(2):
            assert c.post("/tasks/7/predict", json=x).status_code == 404
        assert c.post("/tasks/0/predict", json={"inputs": [[1.0]]}).status_code == 422
        routed = [res["task"] for _ in range(2) for res in c.post("/predict", json=x).json()["results"]]
        assert c.get("/tasks/abc").status_code == 404
        assert c.get("/missing").status_code == 404
        assert httpx.get(f"{secured.base}/tasks", timeout=30).status_code == 401
        after = _metrics(c)

    def delta(name, **labels):
        return _count(after, name, **labels) - _count(before, name, **labels)

    req, err = "anpyc_http_requests_total", "anpyc_http_errors_total"
    pred = {"method": "POST", "route": "/tasks/{task}/predict"}
    assert delta(req, **pred, status="200") == 4
    assert delta(req, **pred, status="404") == 2 and delta(err, **pred, status="404") == 2
    assert delta(req, **pred, status="422") == 1 and delta(err, **pred, status="422") == 1
    assert delta(err, **pred, status="200") == 0
    assert delta(req, method="POST", route="/predict", status="200") == 2
    assert delta(req, method="GET", route="/tasks/{task}", status="404") == 1
    assert delta(req, method="GET", route="unmatched", status="404") == 1
    assert delta(err, method="GET", route="/tasks", status="401") == 1
    assert delta(req, method="GET", route="/metrics", status="200") == 1  # the first scrape, counted once answered
    hist = "anpyc_predict_latency_seconds"
    assert delta(f"{hist}_count", task="0") == 3 and delta(f"{hist}_count", task="1") == 1
    assert delta(f"{hist}_count", task="auto") == 2 and delta(f"{hist}_count", task="unknown") == 0
    assert delta(f"{hist}_bucket", task="0", le="+Inf") == 3 and delta(f"{hist}_sum", task="0") > 0
    assert sum(delta("anpyc_routed_inputs_total", task=str(t)) for t in (0, 1)) == 4
    for t in (0, 1):
        assert delta("anpyc_routed_inputs_total", task=str(t)) == routed.count(t)


def test_unauthenticated_flood_gets_401s_and_the_server_stays_healthy(secured):
    n, concurrency = 400, 32
    x = {"inputs": np.zeros((1, 3, 32, 32), np.float32).tolist()}
    requests = [("POST", "/tasks/0/predict", {"json": x}), ("GET", "/tasks", {}), ("POST", "/predict", {"json": x}),
                ("GET", "/metrics", {})]
    headers = [{}, {"Authorization": "Bearer guess"}, {"Authorization": f"Bearer {TOKEN}0"}]

    async def flood() -> list[int]:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=secured.base, timeout=60, limits=limits) as client:
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int) -> int:
                method, path, kw = requests[i % len(requests)]
                async with sem:
                    r = await client.request(method, path, headers=headers[i % len(headers)], **kw)
                    return r.status_code

            return await asyncio.gather(*(one(i) for i in range(n)))

    with httpx.Client(base_url=secured.base, timeout=30, headers=AUTH) as c:
        before = _metrics(c)
        statuses = asyncio.run(flood())
        assert statuses == [401] * n
        assert secured.proc.poll() is None
        assert c.get("/health").status_code == 200
        assert c.post("/tasks/0/predict", json=x).status_code == 200  # authenticated requests still work
        after = _metrics(c)
    templates = [("POST", "/tasks/{task}/predict"), ("GET", "/tasks"), ("POST", "/predict"), ("GET", "/metrics")]
    refused = {r: _count(after, "anpyc_http_errors_total", method=m, route=r, status="401")
               - _count(before, "anpyc_http_errors_total", method=m, route=r, status="401") for m, r in templates}
    assert refused == {r: n // len(requests) for _, r in templates}


def test_metrics_add_up_across_workers(export_dir, tmp_path):
    prom = tmp_path / "prom"
    prom.mkdir()
    srv = Served(export_dir, "--workers", "2", "--token", TOKEN, env={"PROMETHEUS_MULTIPROC_DIR": str(prom)},
                 timeout=120)
    try:
        for _ in range(30):  # a new connection each: the kernel hands them to either worker
            assert httpx.get(f"{srv.base}/tasks", headers=AUTH, timeout=30).status_code == 200
        assert httpx.get(f"{srv.base}/tasks", timeout=30).status_code == 401
        with httpx.Client(base_url=srv.base, timeout=30) as c:
            samples = _metrics(c)
        pids = {p.stem.rsplit("_", 1)[-1] for p in prom.glob("counter_*.db")}
    finally:
        log = srv.stop()
    assert "Traceback" not in log, log
    assert len(pids) >= 2, pids  # both workers keep their counters in the shared folder
    assert _count(samples, "anpyc_http_requests_total", method="GET", route="/tasks", status="200") == 30
    assert _count(samples, "anpyc_http_errors_total", method="GET", route="/tasks", status="401") == 1


def test_exposure_rules():
    for host in ("127.0.0.1", "localhost", "127.3.2.1", "::1", "[::1]", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "example.com"):
        assert not is_loopback(host), host
    assert check_exposure("127.0.0.1", None) is None
    assert check_exposure("0.0.0.0", None, insecure=True) is None
    assert check_exposure("0.0.0.0", f"  {TOKEN}\n") == TOKEN


def test_cli_refuses_an_open_non_loopback_bind(export_dir):
    from anpyc.cli.app import app

    runner = CliRunner(env={"COLUMNS": "200", "ANPYC_SERVE_TOKEN": None})
    r = runner.invoke(app, ["serve", str(export_dir), "--host", "0.0.0.0"])
    assert r.exit_code == 2
    assert r.stderr.strip() == ("error: binding 0.0.0.0 without a token would let anyone who reaches this machine use "
                                "the models (pass --token T or set ANPYC_SERVE_TOKEN, bind 127.0.0.1, or pass "
                                "--insecure to serve openly)")
    r = runner.invoke(app, ["serve", str(export_dir), "--host", "192.168.0.1", "--token", "  "])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: the token is empty (pass a non-empty --token or ANPYC_SERVE_TOKEN)"


def test_cli_names_the_extra_when_prometheus_client_is_missing(export_dir, monkeypatch):
    from anpyc.cli.app import app

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import prometheus_client now raises ImportError
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["serve", str(export_dir)])
    assert r.exit_code == 2
    assert r.stderr.strip() == ('error: /metrics needs prometheus-client, which is not installed (pip install '
                                '"anpyc[serve]", or serve without metrics (--no-metrics))')
