"""Measure a run's accuracy on every learned task now, on the data it recorded (or --data), next to when learned."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .._common import parse_assignments, printable


class Split(str, Enum):
    test = "test"
    val = "val"
    train = "train"


def command(
    run: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Run directory (what --out was).")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Evaluate on this benchmark/folder/manifest "
                                                "instead of the one the run recorded.")] = None,
    data_opts: Annotated[Optional[list[str]], typer.Option("--data-opt", help="Stream option KEY=VALUE (repeatable; "
                                                           "added to the recorded ones).")] = None,
    split: Annotated[Split, typer.Option("--split", help="Which split to measure.")] = Split.test,
    task: Annotated[Optional[int], typer.Option("--task", help="Only this task id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads.")] = None,
) -> None:
    if threads is not None and threads < 1:
        raise typer.BadParameter("threads must be >= 1", param_hint="--threads")
    opts = parse_assignments(data_opts, "--data-opt")

    import json
    import time

    from anpyc.errors import DataError, RunDirError
    from anpyc.learner import ContinualLearner

    from .._common import console
    from ..report import Joined, accuracy_table, fmt_count, titled
    from ..sources import read_source, resolve_source

    from anpyc.rundir import RunDir

    RunDir(run, create=False, lock=False).manifest()  # a run directory at all? (cheap, before any data is built)
    recorded = read_source(run)
    if data is not None:
        src = resolve_source(data, options=opts)
    elif recorded is not None:
        src = recorded.replace(options={**recorded.options, **opts}, tasks=None)
    else:
        raise RunDirError(f"run {run} does not record its data (no data.json: it was not trained by anpyc train)",
                          "pass --data BENCHMARK|DIR with the data to evaluate on")
    learner = ContinualLearner.load(run)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    ids = learner.task_ids()
    if not ids:
        raise RunDirError(f"run {run} has no finished task yet", f"train at least one task (anpyc train --resume "
                                                                  f"--out {run})")
    if task is not None:
        if task not in ids:
            raise DataError(f"task {task} is not a learned task of {run}", f"pass --task with one of {ids}")
        ids = [task]
    stream = {t.id: t for t in src.open(input_spec=learner.input_spec)}
    missing = [t for t in ids if t not in stream]
    if missing:
        raise DataError(f"the data ({src.describe()}) has no task {missing[0]}",
                        "pass --data with the data the run was trained on")
    rows = []
    t0 = time.time()
    for t in ids:
        info = learner.task_info(t)
        have = list(stream[t].classes)
        if have != list(info["classes"]):
            raise DataError(f"task {t} of the data has classes {have[:5]}, the run learned {info['classes'][:5]}",
                            "pass --data with the data the run was trained on")
        dataset = getattr(stream[t], split.value)
        if dataset is None or len(dataset) == 0:
            raise DataError(f"task {t} has no {split.value} split", "pick another --split")
        k = learner.state.tasks[[r["id"] for r in learner.state.tasks].index(t)]["index"]
        matrix = learner.state.acc_test if split is Split.test else learner.state.acc_val if split is Split.val else []
        learned = matrix[k][k] if k < len(matrix) and k < len(matrix[k]) else None  # the diagonal R[k][k]
        rows.append({"task": t, "name": info["name"], "index": k, "samples": len(dataset),
                     "accuracy": learner.evaluate(t, dataset), "learned": learned})
    seconds = time.time() - t0
    now = [r["accuracy"] for r in rows]
    result = {"run": str(run), "data": src.to_dict(), "split": split.value, "tasks": rows,
              "acc": sum(now) / len(now)}
    recorded_matrix = learner.state.acc_test if split is Split.test else learner.state.acc_val if split is Split.val else []
    if task is None and recorded_matrix:
        changes = [r["accuracy"] - r["learned"] for r in rows[:-1] if r["learned"] is not None]
        result["bwt"] = sum(changes) / len(changes) if changes else 0.0
        last = recorded_matrix[-1]
        result["recorded_last_row"] = last
        result["max_diff_to_recorded"] = max((abs(a - b) for a, b in zip(now, last) if b is not None), default=None)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    con = console()
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False)
    table.add_column("task", overflow="fold")
    for col in ("samples", "acc now", "acc learned", "change"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        change = r["accuracy"] - r["learned"] if r["learned"] is not None else None
        table.add_row(Text(f"{r['task']}:{printable(r['name'])}"), fmt_count(r["samples"]),
                      f"{100 * r['accuracy']:.1f}%",
                      "-" if r["learned"] is None else f"{100 * r['learned']:.1f}%",
                      "-" if change is None else f"{100 * change:+.1f} pts")
    con.print(titled(f"{split.value} accuracy of {run} ({learner.backbone_name}, {learner.config.method}) on "
                     f"{src.describe()}", table))
    if split is Split.test and task is None and len(learner.state.acc_test) > 1:
        con.print()
        con.print(accuracy_table(learner.state.acc_test, [(r["task"], printable(r["name"])) for r in rows],
                                 title="recorded during training (test accuracy %, row = after learning task)"))
    parts = [f"ACC {100 * result['acc']:.1f}%"]
    if "bwt" in result:
        parts.append(f"BWT {100 * result['bwt']:+.1f} pts (now vs when learned)")
        if result.get("max_diff_to_recorded") is not None:
            parts.append(f"max difference to the recorded last row {100 * result['max_diff_to_recorded']:.2f} pts")
    con.print(Joined(parts + [f"measured in {seconds:.1f}s"], style="bold"))
