"""HTTP inference over an export directory: FastAPI + uvicorn + onnxruntime (no torch).

    GET  /health                  {"status": "ok", "tasks": [0, 1], ...}
    GET  /tasks                   every task's metadata (sidecar without hashes of no interest to clients)
    GET  /tasks/{id}              one task's metadata
    POST /tasks/{id}/predict      multipart images (field name free, one or several files), or JSON
                                  {"inputs": [...]} with shape [B, *input_shape] or one sample; ?top_k=K

Errors are JSON ``{"error": <kind>, "detail": <one line: problem and fix>}`` with 400 (garbage payload,
unreadable image), 404 (unknown task), 413 (body over ``max_body_bytes``, refused while streaming, never read
in full), 415 (content type other than JSON/multipart), 422 (wrong shape/dtype, bad query). A bad request never
takes the server down: every handler turns input problems into one of these responses.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from anpyc.errors import AnpycError

from .errors import ImageReadError, InputShapeError, PayloadError, UnknownTaskError
from .runtime import ExportedModels, load_export

__all__ = ["create_app", "serve", "DEFAULT_MAX_BODY_BYTES"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_FILES = 256
_ENV_DIR, _ENV_THREADS, _ENV_MAX_BODY = "ANPYC_EXPORT_DIR", "ANPYC_SERVE_THREADS", "ANPYC_SERVE_MAX_BODY"

_STATUS: tuple[tuple[type[AnpycError], int], ...] = (
    (UnknownTaskError, 404),
    (InputShapeError, 422),
    (ImageReadError, 400),
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


def create_app(export_dir: str | os.PathLike, *, threads: int = 1, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """The FastAPI app serving ``export_dir``; the export is loaded (and verified) before the app is returned."""
    from anpyc import __version__

    models: ExportedModels = load_export(export_dir, threads=threads)
    app = FastAPI(title="anpyc export", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = models
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

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
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            inputs: Any = _json_inputs(await request.body())
            names = None
        elif ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
            except Exception as e:  # python-multipart / starlette parse errors
                raise PayloadError(f"unreadable multipart body ({type(e).__name__}: {' '.join(str(e).split())[:200]})",
                                   "send images as multipart/form-data file fields") from None
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not uploads:
                raise PayloadError("multipart body holds no file", "attach one or more images as file fields")
            names = [u.filename or f"#{i}" for i, u in enumerate(uploads)]
            inputs = [await u.read() for u in uploads]
            await form.close()
        else:
            return _error(415, "UnsupportedMediaType",
                          f"content type {ctype or '(none)'!r} is not accepted (send application/json "
                          '{"inputs": [...]} or multipart/form-data images)')
        preds = await run_in_threadpool(models.predict, t, inputs, top_k, names=names)
        out = [{"predictions": p} for p in preds]
        if names is not None:
            for o, n in zip(out, names):
                o["filename"] = n
        return {"task": t, "results": out}

    return app


def app_from_env():
    """uvicorn factory for ``serve(workers > 1)``: the settings come from environment variables."""
    return create_app(os.environ[_ENV_DIR], threads=int(os.environ.get(_ENV_THREADS, "1")),
                      max_body_bytes=int(os.environ.get(_ENV_MAX_BODY, str(DEFAULT_MAX_BODY_BYTES))))


def serve(export_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, threads: int = 1,
          workers: int = 1, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info") -> None:
    """Serve ``export_dir`` with uvicorn (blocks). The export is verified once before the server starts."""
    import uvicorn

    load_export(export_dir, threads=threads)  # fail fast, with an AnpycError, before binding the port
    if workers > 1:
        os.environ[_ENV_DIR] = str(os.path.abspath(export_dir))
        os.environ[_ENV_THREADS] = str(threads)
        os.environ[_ENV_MAX_BODY] = str(max_body_bytes)
        uvicorn.run("anpyc.export.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level)
    else:
        uvicorn.run(create_app(export_dir, threads=threads, max_body_bytes=max_body_bytes), host=host, port=port,
                    log_level=log_level)
