"""Start here: learn 5 tasks of real digits offline, export each to ONNX, predict PNGs with onnxruntime, plot.

The stages are the quickstart application's (:mod:`anpyc.apps.quickstart`); this command prints between them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from anpyc.apps.quickstart import (QUICKSTART_CONFIG, QUICKSTART_IMG_SIZE, QUICKSTART_MODEL, QUICKSTART_STREAM,
                                   QUICKSTART_THREADS)


def prediction_table(rows, folder: Path):
    """``(file name, task, true class, predicted class, score, correct)`` rows under a title naming the folder."""
    from rich.table import Table
    from rich.text import Text

    from ..report import titled

    table = Table(show_edge=False, pad_edge=False)
    table.add_column("image", overflow="fold")
    for col in ("task", "true", "predicted", "score"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, task, cls, label, score, ok in rows:
        table.add_row(Text(name), str(task), Text(cls), Text(label, style="green" if ok else "red"), f"{score:.3f}")
    return titled(f"PNG files in {folder}", table)


def command(
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, help="Folder for the run, the export, the "
                                      "images and the plots.")] = Path("anpyc-quickstart"),
    model: Annotated[str, typer.Option("--model", "-m", help="Backbone (the settings were tuned for the "
                                       "default).")] = QUICKSTART_MODEL,
    threads: Annotated[int, typer.Option("--threads", help="torch and onnxruntime CPU threads.")] = QUICKSTART_THREADS,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bars \\[default: on a "
                                                     "terminal].", show_default=False)] = None,
    tensorboard: Annotated[Optional[Path], typer.Option(
        "--tensorboard", file_okay=False, help="Also log to TensorBoard event files in this folder (pip install "
        "\"anpyc\\[tensorboard]\").")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show what the exporter and other libraries "
                                          "print (otherwise only in OUT/export/export.log).")] = False,
) -> None:
    if threads < 1:
        raise typer.BadParameter("threads must be >= 1", param_hint="--threads")
    run = out / "run"
    if (run / "run.json").exists():
        from .._common import fail

        raise fail(f"{out} already holds a quickstart run", "pass another --out, or delete the folder")
    t0 = time.time()

    from anpyc.apps import quickstart as app
    from anpyc.quiet import LOG_NAME, library_output

    from .._common import console
    from ..plots import write_plots
    from ..progress import make_progress
    from ..report import print_summary
    from ..sources import DataSource, write_source

    con = console()
    board = None
    if tensorboard is not None:  # a missing package fails here, before anything is written
        from anpyc.adapters.tracking import TensorBoardLogger

        board = TensorBoardLogger(tensorboard, retrain_epochs=QUICKSTART_CONFIG["prune.retrain_epochs"])
    stream = app.digits_stream()
    con.rule("[bold]anpyc quickstart")
    con.print(f"{model} (random init) learns {len(stream)} tasks of scikit-learn's handwritten digits "
              f"({', '.join('{' + ','.join(t.classes) + '}' for t in stream)}), one after another, each with its own "
              f"head and subnetwork. Offline, CPU.", highlight=False)
    log = out / "export" / LOG_NAME
    with library_output(log, verbose=verbose, title=f"anpyc quickstart: walk {model}"):
        learner = app.make_learner(run, model, stream, threads)
    write_source(run, DataSource("benchmark", QUICKSTART_STREAM, {"img_size": QUICKSTART_IMG_SIZE}))
    cfg = learner.config
    bars = make_progress(con, live=con.is_terminal if progress is None else progress, num_tasks=len(stream),
                         epochs=cfg.optim.epochs, retrain_epochs=cfg.prune.retrain_epochs)
    learner.callbacks.append(bars)
    if board is not None:
        learner.callbacks.append(board)
        con.print(f"TensorBoard: tensorboard --logdir {board.log_dir}", highlight=False, markup=False)
    try:
        metrics = app.train(learner, stream, display=bars)
    finally:
        if board is not None:
            board.close()
    t_train = time.time() - t0

    con.rule("[bold]result")
    print_summary(con, metrics)
    plots = write_plots(metrics, run / "plots")

    con.rule("[bold]export: one ONNX model per task")
    export_dir = out / "export"
    with library_output(log, verbose=verbose, title="anpyc quickstart: export"):
        sidecars = app.export(learner, export_dir, threads)
    for s in sidecars:
        con.print(f"task {s['task']}: {export_dir / s['file']}  params {s['params']:,}, parity vs torch "
                  f"{s['parity']['max_abs_diff']:.1e}", highlight=False, soft_wrap=True)

    con.rule("[bold]predict PNG files with onnxruntime (no torch)")
    images = app.write_test_images(out / "images", stream)
    rows = app.predict_images(export_dir, images, threads)
    correct = sum(ok for *_, ok in rows)
    con.print(prediction_table(rows, out / "images"))
    con.print(f"{correct}/{len(images)} test digits classified correctly by the exported models", highlight=False)

    con.rule("[bold]files and next steps")
    acc = metrics.get("acc")
    con.print(f"ACC {100 * acc:.1f}% over {len(stream)} tasks; trained in {t_train:.0f}s, all done in "
              f"{time.time() - t0:.0f}s", style="bold", highlight=False)
    con.print(f"run:    {run}   (config.json, data.json, metrics.json, events.jsonl, state/)", highlight=False,
              markup=False, soft_wrap=True)
    con.print(f"plots:  {', '.join(str(p) for p in plots)}", highlight=False, markup=False, soft_wrap=True)
    con.print(f"export: {export_dir}   images: {out / 'images'}", highlight=False, markup=False, soft_wrap=True)
    example = images[0][0] if images else "IMAGE.png"
    for line in (f"anpyc inspect {run}", f"anpyc eval {run}",
                 f"anpyc predict {export_dir} --task {images[0][1] if images else 0} {example}",
                 f"anpyc serve {export_dir}",
                 "anpyc train --model resnet18 --data path/to/images --out runs/mine --img-size 64"):
        con.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
