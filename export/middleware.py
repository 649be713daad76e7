"""The server's ASGI middleware, outermost first: :class:`MetricsMiddleware` (counts every answer under a fixed
set of labels), :class:`BearerAuth` (the token, before any body is read), :class:`InferenceGate` (at most
``max_inferences`` predictions at once, ``max_waiting`` queued, 503 beyond), :class:`BodyLimit` (413 over
``max_body_bytes``, refused while streaming). :mod:`anpyc.export.server` assembles them around the FastAPI app.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
import time
from typing import Any

from starlette.responses import JSONResponse
from starlette.routing import Match

from anpyc.errors import ConfigError

__all__ = ["BodyLimit", "BearerAuth", "InferenceGate", "Metrics", "MetricsMiddleware", "error_response",
           "OPEN_PATHS", "LATENCY_BUCKETS", "HTTP_METHODS"]

OPEN_PATHS = frozenset({"/health"})  # answered without the token (load balancers' and orchestrators' probes)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# the method label of /metrics: any other method a client makes up is counted as "other", so no client can grow
# the number of series (route labels are the app's route templates or "unmatched", statuses the app's own)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_PROM_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode (uvicorn --workers > 1)
_PREDICT = re.compile(r"/predict|/tasks/[^/]+/predict")


def error_response(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


_error = error_response


class InferenceGate:
    """ASGI middleware: at most ``max_active`` prediction requests (``POST /predict``, ``POST /tasks/{id}/predict``)
    are read, decoded and run at once; up to ``max_waiting`` more wait for a slot without their bodies being read,
    and any beyond that get 503 with ``Retry-After: 1`` at once. Together with the body and pixel limits this
    bounds what the server holds in memory whatever the number of clients."""

    def __init__(self, app, max_active: int, max_waiting: int):
        self.app = app
        self.max_active, self.max_waiting = int(max_active), int(max_waiting)
        self.active = self.waiting = 0
        self._slots: asyncio.Semaphore | None = None  # made in the server's event loop, on the first request

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not _PREDICT.fullmatch(scope["path"]):
            return await self.app(scope, receive, send)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_active)
        if self.active >= self.max_active and self.waiting >= self.max_waiting:
            busy = _error(503, "Busy", f"the server is busy: {self.active} predictions running and {self.waiting} "
                                       "waiting (retry in a moment, or raise --max-inferences/--max-waiting)",
                          headers={"Retry-After": "1"})
            return await busy(scope, receive, send)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            self._slots.release()


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
            code = status[0]
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            m = self.metrics
            m.requests.labels(method, route, str(code)).inc()
            if code >= 400:
                m.errors.labels(method, route, str(code)).inc()
            elif route.endswith("predict") and method == "POST":
                task = str(params.get("task", "auto"))
                m.latency.labels(task if task in self.task_ids or task == "auto" else "unknown").observe(
                    time.perf_counter() - t0)


