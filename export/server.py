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
unreadable or oversized image), 401 (missing or wrong token, with ``WWW-Authenticate: Bearer``), 404 (unknown
task), 405 (with ``Allow``), 413 (body over ``max_body_bytes``, refused while streaming, never read in full), 415
(content type other than JSON/multipart), 422 (wrong shape/dtype, bad query), 503 (busy: ``max_inferences``
running and ``max_waiting`` queued, with ``Retry-After``). A bad request never takes the server down: every handler
turns input problems into one of these responses. The token is checked before the body is read. What one request
may cost is bounded by :class:`~anpyc.export.limits.Limits` (pixels, aspect ratio, body, concurrency); every ONNX
session is made at start from the bytes whose sha256 was checked.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from anpyc.errors import AnpycError, ConfigError, clip

from .errors import (ExportDirError, ImageReadError, InputShapeError, PayloadError, UnknownTaskError,
                     UnsupportedMediaType)
from .limits import DEFAULT_MAX_BODY_BYTES, Limits
from .middleware import (OPEN_PATHS, BearerAuth, BodyLimit, InferenceGate, Metrics, MetricsMiddleware,
                         error_response)
from .runtime import ROUTING_CRITERION, ExportedModels, load_export

__all__ = ["create_app", "serve", "check_exposure", "DEFAULT_MAX_BODY_BYTES", "TOKEN_ENV", "OPEN_PATHS"]

MAX_FILES = 256
TOKEN_ENV = "ANPYC_SERVE_TOKEN"
_ENV_DIR, _ENV_THREADS, _ENV_METRICS = "ANPYC_EXPORT_DIR", "ANPYC_SERVE_THREADS", "ANPYC_SERVE_METRICS"
_PROM_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode (uvicorn --workers > 1)

_STATUS: tuple[tuple[type[AnpycError], int], ...] = (
    (UnknownTaskError, 404),
    (InputShapeError, 422),
    (ImageReadError, 400),
    (UnsupportedMediaType, 415),
    (PayloadError, 400),
    (ExportDirError, 503),  # the export cannot answer (a model that fails to run): the server's problem, not the
)                           # request's; sessions are made and tried at start, so this is rare


def _status(e: AnpycError) -> int:
    for cls, code in _STATUS:
        if isinstance(e, cls):
            return code
    return 400


_error = error_response


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
    except RecursionError:
        raise PayloadError("request body is JSON nested too deeply", 'send {"inputs": [...]} of shape [B, '
                           '*input_shape]') from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise PayloadError("request body is not valid JSON",
                           'send {"inputs": [...]} as application/json, or images as multipart/form-data') from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise PayloadError('JSON body has no "inputs" field', 'send {"inputs": [[...], ...]} (shape [B, *input_shape])')
    try:
        arr = np.asarray(payload["inputs"])
    except (ValueError, TypeError, OverflowError, RecursionError):
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


def create_app(export_dir: str | os.PathLike, *, threads: int = 1, max_body_bytes: int | None = None,
               token: str | None = None, metrics: bool = True, limits: Limits | None = None):
    """The FastAPI app serving ``export_dir``; the export is loaded and verified, and every task's session made
    and tried once, before the app is returned.

    ``token``: every route but ``/health`` needs ``Authorization: Bearer <token>``. ``metrics``: serve ``/metrics``
    (Prometheus text format, needs prometheus-client). ``limits``: what one image and one request may cost, and
    how many predictions run at once (:class:`~anpyc.export.limits.Limits`; ``max_body_bytes`` overrides its
    body limit).
    """
    import dataclasses

    from anpyc import __version__

    limits = limits or Limits()
    if max_body_bytes is not None:
        limits = dataclasses.replace(limits, max_body_bytes=int(max_body_bytes))
    models: ExportedModels = load_export(export_dir, threads=threads, limits=limits, preload=True)
    app = FastAPI(title="anpyc export", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = models
    app.state.limits = limits
    # added innermost first: Metrics -> BearerAuth -> InferenceGate -> BodyLimit -> app, so a request without the
    # token is refused before it waits for a slot, and a waiting request's body is not read until it has one
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(InferenceGate, max_active=limits.max_inferences, max_waiting=limits.max_waiting)
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
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
        return _error(422, "InvalidParameter", clip("; ".join(parts), 300) + " (fix the request parameter)")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):  # 404, 405 (with its Allow header), ...
        return _error(e.status_code, "HTTPError", clip(e.detail, 300), headers=dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):  # a bug in anpyc: keep serving, say so
        return _error(500, "InternalError", f"{type(e).__name__} while handling the request (a bug in anpyc)")

    @app.api_route("/health", methods=["GET", "HEAD"])  # probes use HEAD too
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
    return create_app(os.environ[_ENV_DIR], threads=int(os.environ.get(_ENV_THREADS, "1")), limits=Limits.from_env(),
                      token=os.environ.get(TOKEN_ENV) or None, metrics=os.environ.get(_ENV_METRICS, "1") == "1")


def serve(export_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, threads: int = 1,
          workers: int = 1, *, max_body_bytes: int | None = None, log_level: str = "info",
          token: str | None = None, insecure: bool = False, metrics: bool = True, limits: Limits | None = None
          ) -> None:
    """Serve ``export_dir`` with uvicorn (blocks). The export is verified once before the server starts.

    A ``host`` other than loopback needs a ``token`` unless ``insecure`` (:func:`check_exposure`). ``limits``
    bounds each request and the predictions running at once (:class:`~anpyc.export.limits.Limits`). With
    ``workers > 1`` the metrics of all workers are gathered in a temporary folder (prometheus-client's multiprocess
    mode), removed when the server stops; each worker has its own ``max_inferences``.
    """
    import dataclasses

    import uvicorn

    token = check_exposure(host, token, insecure)
    limits = limits or Limits()
    if max_body_bytes is not None:
        limits = dataclasses.replace(limits, max_body_bytes=int(max_body_bytes))
    if metrics:
        Metrics()  # a missing prometheus-client fails here, in one line, not in every worker
    if workers == 1:
        uvicorn.run(create_app(export_dir, threads=threads, token=token, metrics=metrics, limits=limits),
                    host=host, port=port, log_level=log_level)
        return
    load_export(export_dir, threads=threads, limits=limits, preload=True)  # fail fast, in one line, before binding
    env = {_ENV_DIR: str(os.path.abspath(export_dir)), _ENV_THREADS: str(threads), **limits.to_env(),
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
