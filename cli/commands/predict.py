"""Predict the classes of images with an exported task model (onnxruntime, no torch); --task auto routes."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from anpyc.export.limits import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS

from .._common import printable

AUTO = "auto"
_TASK = re.compile(r"[+-]?[0-9]{1,10}")  # ASCII digits: int() would also read '²' and choke on 5,000 digits


class OutputFormat(str, Enum):
    json = "json"
    csv = "csv"


def _task(value: str) -> str:
    text = value.strip().lower()
    if text != AUTO and not _TASK.fullmatch(text):
        from anpyc.errors import clip

        raise typer.BadParameter(f"{clip(repr(value), 40)} is neither a task id nor 'auto'",
                                 param_hint="--task")
    return text


def command(
    export_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Export directory.")],
    images: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="Image files.")],
    task: Annotated[str, typer.Option("--task", parser=_task, help="Task id (see the export's manifest.json), or "
                                      "'auto': every task model sees the image and the most certain one (lowest "
                                      "normalised entropy) answers, naming its task and confidence.")],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to print per image.")] = 1,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.json,
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads.")] = 1,
    int8: Annotated[bool, typer.Option("--int8", help="Use the int8 models.")] = False,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Largest decoded image, pixels (a larger JPEG is "
                                            "decoded at reduced scale, other formats are refused).")
                          ] = DEFAULT_MAX_PIXELS,
    max_aspect: Annotated[float, typer.Option("--max-aspect", help="Most elongated image, longest side / "
                                              "shortest side.")] = DEFAULT_MAX_ASPECT,
) -> None:
    if top_k < 1:
        raise typer.BadParameter("top-k must be >= 1", param_hint="--top-k")
    if threads < 1:
        raise typer.BadParameter("threads must be >= 1", param_hint="--threads")

    import csv
    import json
    import sys

    from anpyc.export.limits import Limits
    from anpyc.export.runtime import load_export

    limits = Limits(max_pixels=max_pixels, max_aspect=max_aspect)
    models = load_export(export_dir, threads=threads, int8=int8, limits=limits)
    inputs = [str(p) for p in images]
    if task == AUTO:
        routed = models.route(inputs, top_k=top_k)
        rows = [{"input": s, "task": r["task"], "routed": True, "confidence": r["confidence"],
                 "predictions": r["predictions"]} for s, r in zip(inputs, routed)]
    else:
        t = int(task)
        rows = [{"input": s, "task": t, "predictions": pr} for s, pr in zip(inputs, models.predict(t, inputs, top_k))]
    if fmt is OutputFormat.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    w = csv.writer(sys.stdout, lineterminator="\n")
    routed_cols = ["task", "confidence"] if task == AUTO else []  # a fixed task keeps the columns it always had
    w.writerow(["input", *routed_cols, "rank", "index", "label", "score"])
    for row in rows:
        extra = [row["task"], f"{row['confidence']:.6f}"] if routed_cols else []
        for rank, c in enumerate(row["predictions"], 1):
            w.writerow([printable(row["input"]), *extra, rank, c["index"], printable(c["label"]),
                        f"{c['score']:.6f}"])
