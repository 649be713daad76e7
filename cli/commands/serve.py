"""Serve an export directory over HTTP (FastAPI + uvicorn + onnxruntime), optionally behind a bearer token."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from anpyc.export.limits import (DEFAULT_MAX_ASPECT, DEFAULT_MAX_INFERENCES, DEFAULT_MAX_PIXELS,
                                 DEFAULT_MAX_WAITING)

TOKEN_ENV = "ANPYC_SERVE_TOKEN"  # anpyc.export.server.TOKEN_ENV (not imported here: --help stays light)


def command(
    export_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Export directory.")],
    host: Annotated[str, typer.Option("--host", help="Interface to bind; anything but loopback needs --token (or "
                                      "--insecure).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads per session.")] = 1,
    workers: Annotated[int, typer.Option("--workers", help="uvicorn worker processes.")] = 1,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body, MiB (413 beyond).")
                           ] = 8.0,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Largest decoded image, pixels (a larger JPEG is "
                                            "decoded at reduced scale, other formats are refused).")
                          ] = DEFAULT_MAX_PIXELS,
    max_aspect: Annotated[float, typer.Option("--max-aspect", help="Most elongated image, longest side / "
                                              "shortest side.")] = DEFAULT_MAX_ASPECT,
    max_inferences: Annotated[int, typer.Option("--max-inferences", help="Predictions decoded and run at once "
                                                "(per worker).")] = DEFAULT_MAX_INFERENCES,
    max_waiting: Annotated[int, typer.Option("--max-waiting", help="Predictions queued for a slot; beyond them the "
                                             "server answers 503 (per worker).")] = DEFAULT_MAX_WAITING,
    token: Annotated[Optional[str], typer.Option("--token", envvar=TOKEN_ENV, show_default=False,
                                                 help="Bearer token every route but /health requires "
                                                 "(Authorization: Bearer T). The environment variable keeps it "
                                                 "out of the process list.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve a non-loopback --host without a token.")] = False,
    metrics: Annotated[bool, typer.Option("--metrics/--no-metrics", help="Serve /metrics (Prometheus; behind the "
                                          "token like every route but /health).")] = True,
) -> None:
    if not 1 <= port <= 65535:
        raise typer.BadParameter(f"port {port} is not in 1..65535", param_hint="--port")
    if threads < 1:
        raise typer.BadParameter("threads must be >= 1", param_hint="--threads")
    if workers < 1:
        raise typer.BadParameter("workers must be >= 1", param_hint="--workers")
    if not 0 < max_body_mb <= 1 << 20:
        raise typer.BadParameter("max-body-mb must be > 0 (and at most 1048576)", param_hint="--max-body-mb")

    from anpyc.export.limits import Limits
    from anpyc.export.server import serve

    limits = Limits(max_pixels=max_pixels, max_aspect=max_aspect, max_inferences=max_inferences,
                    max_waiting=max_waiting, max_body_bytes=max(1, int(max_body_mb * 1024 * 1024)))
    serve(export_dir, host=host, port=port, threads=threads, workers=workers, token=token, insecure=insecure,
          metrics=metrics, limits=limits)
