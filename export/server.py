"""HTTP inference over an export directory: FastAPI + uvicorn + onnxruntime (no torch).

    GET  /health                  {"status": "ok", "tasks": [0, 1], ...}            (never needs the token)
    GET  /tasks                   every task's metadata (sidecar without hashes of no interest to clients)
    GET  /tasks/{id}              one task's metadata
    POST /tasks/{id}/predict      multipart images (field name free, one or several files), or JSON
                                  {"inputs": [...]} with shape [B, *input_shape] or one sample; ?top_k=K
    POST /predict                 the same inputs without a task id: every task model sees them and the one with
                                  the lowest normalised predictive entropy answers (``ExportedModels.route``)
    GET  /metrics                 Prometheus text format: requests and errors by route and status, latency of
                                  answered predictions per task, inputs routed per task

With a token (``create_app(token=...)``, ``anpyc serve --token`` or ``ANPYC_SERVE_TOKEN``) every route but
``/health`` needs ``Authorization: Bearer <token>``; ``/metrics`` too, since it tells who uses which task.

Errors are JSON ``{"error": <kind>, "detail": <one line: problem and fix>}`` with 400 (garbage payload,
unreadable image), 401 (missing or wrong token, with ``WWW-Authenticate: Bearer``), 404 (unknown task), 413 (body
over ``max_body_bytes``, refused while streaming, never read in full), 415 (content type other than
JSON/multipart), 422 (wrong shape/dtype, bad query). A bad request never takes the server down: every handler
turns input problems into one of these responses. The token is checked before the body is read.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from anpyc.errors import AnpycError, ConfigError, clip

from .errors import ImageReadError, InputShapeError, PayloadError, UnknownTaskError, UnsupportedMediaType
from .runtime import ROUTING_CRITERION, ExportedModels, load_export

__all__ = ["create_app", "serve", "check_exposure", "DEFAULT_MAX_BODY_BYTES", "TOKEN_ENV"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_FILES = 256
OPEN_PATHS = frozenset({"/health"})  # answered without the token (load balancers' and orchestrators' probes)
TOKEN_ENV = "ANPYC_SERVE_TOKEN"
_ENV_DIR, _ENV_THREADS, _ENV_MAX_BODY = "ANPYC_EXPORT_DIR", "ANPYC_SERVE_THREADS", "ANPYC_SERVE_MAX_BODY"
_ENV_METRICS = "ANPYC_SERVE_METRICS"
_PROM_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode (uvicorn --workers > 1)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_STATUS: tuple[tuple[type[AnpycError], int], ...] = (
    (UnknownTaskError, 404),
    (InputShapeError, 422),
    (ImageReadError, 400),
    (UnsupportedMediaType, 415),
    (PayloadError, 400),
)


def _status(e: AnpycError) -> int:
    for cls, code in _STATUS:
        if isinstance(e, cls):
            return code
    return 400


def _error(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413 before the app reads them.

    A declared ``Content-Length`` over the limit is refused at once; otherwise the body is buffered chunk by
    chunk and the request refused as soon as the running total passes the limit, so at most ``max_bytes`` (+ one
    chunk) is ever held. Bodies within the limit are replayed to the app unchanged.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = _error(413, "PayloadTooLarge",
                         f"request body exceeds {self.max_bytes} bytes (send fewer or smaller images per request)")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    return await too_big(scope, receive, send)
            except ValueError:
                return await _error(400, "BadRequest", "invalid Content-Length header")(scope, receive, send)
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(body)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            if replay:
                return replay.pop()
            return await receive()

        return await self.app(scope, replay_receive, send)


class BearerAuth:
    """ASGI middleware: every path but :data:`OPEN_PATHS` needs ``Authorization: Bearer <token>``.

    Refused requests get a 401 JSON error with ``WWW-Authenticate: Bearer`` before anything reads their body. The
    comparison is :func:`hmac.compare_digest` (its time does not depend on where the tokens differ).
    """

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization")
        scheme, _, value = (given or b"").partition(b" ")
        if given is not None and scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token):
            return await self.app(scope, receive, send)
        challenge = 'Bearer realm="anpyc"' + ('' if given is None else ', error="invalid_token"')
        detail = ("missing bearer token" if given is None else "wrong bearer token") + \
            " (send the header Authorization: Bearer <token> that the server was started with)"
        response = _error(401, "Unauthorized", detail)
        response.headers["WWW-Authenticate"] = challenge
        return await response(scope, receive, send)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (never the process-global one).

    Under ``uvicorn --workers N`` the workers are separate processes: with ``PROMETHEUS_MULTIPROC_DIR`` set (``serve``
    sets it to a fresh folder), every worker writes its samples there and ``/metrics`` adds them up across workers.
    """

    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError:
            raise ConfigError("/metrics needs prometheus-client, which is not installed",
                              'pip install "anpyc[serve]", or serve without metrics (--no-metrics)') from None

        self.multiprocess = bool(os.environ.get(_PROM_DIR))
        self.registry = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        kw = {"registry": self.registry}
        self.requests = Counter("anpyc_http_requests", "HTTP requests answered, by method, route template and status",
                                ["method", "route", "status"], **kw)
        self.errors = Counter("anpyc_http_errors", "HTTP requests answered with a 4xx or 5xx status, by method, "
                              "route template and status", ["method", "route", "status"], **kw)
        self.latency = Histogram("anpyc_predict_latency_seconds", "Seconds to answer a prediction request (2xx), "
                                 "by task ('auto' for POST /predict)", ["task"], buckets=LATENCY_BUCKETS, **kw)
        self.routed = Counter("anpyc_routed_inputs", "Inputs of POST /predict answered by each task", ["task"], **kw)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = self.registry
        if registry is None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware (outermost): counts every answer by route template and status, times the predictions."""

    def __init__(self, app, metrics: Metrics, routes: list, task_ids: list[int]):
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.task_ids = {str(t) for t in task_ids}

    def _route(self, scope) -> tuple[str, dict[str, Any]]:
        partial = None
        for route in self.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                return route.path, child.get("path_params", {})
            if match is Match.PARTIAL and partial is None:
                partial = route.path
        return (partial or "unmatched"), {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:  # an exception escaping the app becomes a 500 outside this middleware: count it as one
            route, params = self._route(scope)
            code, method = status[0], scope["method"]
            m = self.metrics
            m.requests.labels(method, route, str(code)).inc()
            if code >= 400:
                m.errors.labels(method, route, str(code)).inc()
            elif route.endswith("predict") and method == "POST":
                task = str(params.get("task", "auto"))
                m.latency.labels(task if task in self.task_ids or task == "auto" else "unknown").observe(
                    time.perf_counter() - t0)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (``localhost``, 127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name, or 0.0.0.0 / :: (every interface)


def check_exposure(host: str, token: str | None, insecure: bool = False) -> str | None:
    """The token to serve with (stripped), or an error: a non-loopback address needs a token unless ``insecure``."""
    if token is not None:
        token = token.strip()
        if not token:
            raise ConfigError("the token is empty", f"pass a non-empty --token or {TOKEN_ENV}")
    if token is None and not insecure and not is_loopback(host):
        raise ConfigError(f"binding {host} without a token would let anyone who reaches this machine use the models",
                          f"pass --token T or set {TOKEN_ENV}, bind 127.0.0.1, or pass --insecure to serve openly")
    return token


def _task_meta(s: dict[str, Any]) -> dict[str, Any]:
    keep = ("task", "name", "classes", "num_classes", "input_spec", "opset", "exporter", "params", "flops",
            "backbone", "onnx_sha256", "mask_sha256")
    meta = {k: s.get(k) for k in keep}
    meta["id"] = meta.pop("task")
    meta["int8"] = s.get("int8") is not None
    meta["parity_max_abs_diff"] = (s.get("parity") or {}).get("max_abs_diff")
    return meta


def _json_inputs(raw: bytes) -> np.ndarray:
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PayloadError("request body is not valid JSON",
                           'send {"inputs": [...]} as application/json, or images as multipart/form-data') from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise PayloadError('JSON body has no "inputs" field', 'send {"inputs": [[...], ...]} (shape [B, *input_shape])')
    try:
        arr = np.asarray(payload["inputs"])
    except ValueError:
        arr = np.asarray([None], dtype=object)
    if arr.dtype == object or arr.dtype.kind not in "iuf":
        raise InputShapeError("inputs must be a rectangular nested list of numbers (it is ragged or holds non-numbers)",
                              "send one float per element, shape [B, *input_shape]")
    return arr.astype(np.float32)  # JSON has no float32: ints and doubles are both numbers here


async def _read_inputs(request: Request) -> tuple[Any, list[str] | None]:
    """The inputs of a predict request: a float array (JSON) or encoded images with their file names (multipart)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        return _json_inputs(await request.body()), None
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType(f"content type {ctype or '(none)'!r} is not accepted",
                                   'send application/json {"inputs": [...]} or multipart/form-data images')
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except Exception as e:  # python-multipart / starlette parse errors
        raise PayloadError(f"unreadable multipart body ({type(e).__name__}: {clip(e, 200)})",
                           "send images as multipart/form-data file fields") from None
    uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not uploads:
        raise PayloadError("multipart body holds no file", "attach one or more images as file fields")
    names = [u.filename or f"#{i}" for i, u in enumerate(uploads)]
    inputs = [await u.read() for u in uploads]
    await form.close()
    return inputs, names


def _with_names(out: list[dict[str, Any]], names: list[str] | None) -> list[dict[str, Any]]:
    if names is not None:
        for o, n in zip(out, names):
            o["filename"] = n
    return out


def create_app(export_dir: str | os.PathLike, *, threads: int = 1, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               token: str | None = None, metrics: bool = True):
    """The FastAPI app serving ``export_dir``; the export is loaded (and verified) before the app is returned.

    ``token``: every route but ``/health`` needs ``Authorization: Bearer <token>``. ``metrics``: serve ``/metrics``
    (Prometheus text format, needs prometheus-client).
    """
    from anpyc import __version__

    models: ExportedModels = load_export(export_dir, threads=threads)
    app = FastAPI(title="anpyc export", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = models
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if token is not None:
        app.add_middleware(BearerAuth, token=token)  # added after BodyLimit, so it runs first: no body is read
    m = Metrics() if metrics else None
    app.state.metrics = m
    if m is not None:
        app.add_middleware(MetricsMiddleware, metrics=m, routes=app.router.routes, task_ids=models.task_ids)

    @app.exception_handler(AnpycError)
    async def _anpyc_error(request: Request, e: AnpycError):
        return _error(_status(e), type(e).__name__, e.one_line)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "path"))
            parts.append(f"{loc}: {err.get('msg')}")
        return _error(422, "InvalidParameter", "; ".join(parts) + " (fix the request parameter)")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, "HTTPError", str(e.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):  # a bug in anpyc: keep serving, say so
        return _error(500, "InternalError", f"{type(e).__name__} while handling the request (a bug in anpyc)")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "tasks": models.task_ids, "anpyc_version": __version__}

    @app.get("/tasks")
    def tasks() -> dict[str, Any]:
        return {"tasks": [_task_meta(s) for s in models.tasks.values()]}

    @app.get("/tasks/{task}")
    def task(task: str) -> dict[str, Any]:
        return _task_meta(models.sidecar(task))

    @app.post("/tasks/{task}/predict")
    async def predict(task: str, request: Request, top_k: int = Query(1, ge=1, le=1000)) -> dict[str, Any]:
        t = models.sidecar(task)["task"]  # unknown task -> 404 before the body is parsed
        inputs, names = await _read_inputs(request)
        preds = await run_in_threadpool(models.predict, t, inputs, top_k, names=names)
        return {"task": t, "results": _with_names([{"predictions": p} for p in preds], names)}

    @app.post("/predict")
    async def predict_routed(request: Request, top_k: int = Query(1, ge=1, le=1000)) -> dict[str, Any]:
        inputs, names = await _read_inputs(request)
        routed = await run_in_threadpool(models.route, inputs, top_k, names=names)
        if m is not None:
            for r in routed:
                m.routed.labels(str(r["task"])).inc()
        return {"task": "auto", "criterion": ROUTING_CRITERION, "results": _with_names(routed, names)}

    if m is not None:
        @app.get("/metrics")
        def metrics_route() -> Response:
            body, ctype = m.exposition()
            return Response(body, media_type=ctype)

    return app


def app_from_env():
    """uvicorn factory for ``serve(workers > 1)``: the settings come from environment variables."""
    return create_app(os.environ[_ENV_DIR], threads=int(os.environ.get(_ENV_THREADS, "1")),
                      max_body_bytes=int(os.environ.get(_ENV_MAX_BODY, str(DEFAULT_MAX_BODY_BYTES))),
                      token=os.environ.get(TOKEN_ENV) or None, metrics=os.environ.get(_ENV_METRICS, "1") == "1")


def serve(export_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, threads: int = 1,
          workers: int = 1, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info",
          token: str | None = None, insecure: bool = False, metrics: bool = True) -> None:
    """Serve ``export_dir`` with uvicorn (blocks). The export is verified once before the server starts.

    A ``host`` other than loopback needs a ``token`` unless ``insecure`` (:func:`check_exposure`). With
    ``workers > 1`` the metrics of all workers are gathered in a temporary folder (prometheus-client's multiprocess
    mode), removed when the server stops.
    """
    import uvicorn

    token = check_exposure(host, token, insecure)
    load_export(export_dir, threads=threads)  # fail fast, with an AnpycError, before binding the port
    if metrics:
        Metrics()  # a missing prometheus-client fails here, in one line, not in every worker
    if workers == 1:
        uvicorn.run(create_app(export_dir, threads=threads, max_body_bytes=max_body_bytes, token=token,
                               metrics=metrics), host=host, port=port, log_level=log_level)
        return
    env = {_ENV_DIR: str(os.path.abspath(export_dir)), _ENV_THREADS: str(threads), _ENV_MAX_BODY: str(max_body_bytes),
           _ENV_METRICS: "1" if metrics else "0", TOKEN_ENV: token or ""}
    own_dir = None
    if metrics and not os.environ.get(_PROM_DIR):
        own_dir = env[_PROM_DIR] = tempfile.mkdtemp(prefix="anpyc-metrics-")
    os.environ.update(env)  # the workers are spawned processes: they read their settings from here
    try:
        uvicorn.run("anpyc.export.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
