"""Serve an export directory over HTTP (FastAPI + uvicorn + onnxruntime), optionally behind a bearer token."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

TOKEN_ENV = "ANPYC_SERVE_TOKEN"  # anpyc.export.server.TOKEN_ENV (not imported here: --help stays light)


def command(
    export_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Export directory.")],
    host: Annotated[str, typer.Option("--host", help="Interface to bind; anything but loopback needs --token (or "
                                      "--insecure).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads per session.")] = 1,
    workers: Annotated[int, typer.Option("--workers", help="uvicorn worker processes.")] = 1,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body, MiB.")] = 8.0,
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
    if not max_body_mb > 0:
        raise typer.BadParameter("max-body-mb must be > 0", param_hint="--max-body-mb")

    from anpyc.export.server import serve

    serve(export_dir, host=host, port=port, threads=threads, workers=workers,
          max_body_bytes=int(max_body_mb * 1024 * 1024), token=token, insecure=insecure, metrics=metrics)
