"""Predict the classes of images with an exported task model (onnxruntime, no torch)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class OutputFormat(str, Enum):
    json = "json"
    csv = "csv"


def command(
    export_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Export directory.")],
    images: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="Image files.")],
    task: Annotated[int, typer.Option("--task", help="Task id (see the export's manifest.json).")],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to print per image.")] = 1,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.json,
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads.")] = 1,
    int8: Annotated[bool, typer.Option("--int8", help="Use the int8 models.")] = False,
) -> None:
    if top_k < 1:
        raise typer.BadParameter("top-k must be >= 1", param_hint="--top-k")
    if threads < 1:
        raise typer.BadParameter("threads must be >= 1", param_hint="--threads")

    import csv
    import json
    import sys

    from anpyc.export.runtime import load_export

    models = load_export(export_dir, threads=threads, int8=int8)
    preds = models.predict(task, [str(p) for p in images], top_k=top_k)
    if fmt is OutputFormat.json:
        rows = [{"input": str(p), "task": task, "predictions": pr} for p, pr in zip(images, preds)]
        typer.echo(json.dumps(rows, indent=2))
    else:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["input", "rank", "index", "label", "score"])
        for p, pr in zip(images, preds):
            for rank, c in enumerate(pr, 1):
                w.writerow([str(p), rank, c["index"], c["label"], f"{c['score']:.6f}"])
