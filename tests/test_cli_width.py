"""Every table of train, eval, inspect and quickstart, rendered 80 columns wide (a pipe's width): whole headers,
every number of the run, no cut cells ("…"), no table line over 80 columns; wide matrices come in column blocks."""

from __future__ import annotations

import json
import re

import pytest
from rich.console import Console
from test_cli_train import FAST
from typer.testing import CliRunner

from anpyc.cli.app import app
from anpyc.cli.report import BlockedTable, Col, print_summary

WIDTH = 80
TASK_HEADERS = ("task", "classes", "acc now", "acc learned", "owns", "capacity", "params", "FLOPs", "pruned", "time")


def invoke80(*args) -> str:
    r = CliRunner(env={"COLUMNS": str(WIDTH)}).invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.stdout


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(c in line for c in "┃│━")]


def assert_fits(text: str) -> None:
    assert "…" not in text, text
    too_wide = [line for line in _table_lines(text) if len(line) > WIDTH]
    assert not too_wide, too_wide


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"[┃│]", line)]


def parse_matrix(text: str) -> dict[tuple[str, str], str]:
    """Every printed accuracy-matrix cell as {(after, task): text}, gathered over all column blocks."""
    cells: dict[tuple[str, str], str] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("after ") and "┃" in line:
            header = _cells(line)[1:]
        elif header is not None and "│" in line:
            row = _cells(line)
            assert len(row) == len(header) + 1, line
            for task, value in zip(header, row[1:]):
                assert (row[0], task) not in cells, "a cell printed twice"
                cells[(row[0], task)] = value
        elif header is not None and "━" not in line:
            header = None
    return cells


def assert_matrix(text: str, matrix, ids) -> None:
    """The printed matrix holds R[i][j] (percent, one decimal) for every j <= i, and nothing else but blanks."""
    got = parse_matrix(text)
    want = {(str(ids[i]), str(ids[j])): f"{100 * row[j]:.1f}" for i, row in enumerate(matrix) for j in range(i + 1)}
    assert {k: v for k, v in got.items() if v != "·"} == want


def assert_task_rows(text: str, metrics: dict) -> None:
    """Each task's row names the task and holds its accuracies and parameter count in full."""
    last = metrics["accuracy_matrix"][-1]
    for k, t in enumerate(metrics["tasks"]):
        label = f"{t['id']}:{t['name']}"
        rows = [line for line in _table_lines(text) if line.startswith(label + " ")]
        assert len(rows) >= 2, (label, rows)  # stacked: the accuracy block and the size block
        cells = [c for row in rows for c in _cells(row)]
        assert f"{100 * last[k]:.1f}%" in cells and f"{100 * metrics['accuracy_matrix'][k][k]:.1f}%" in cells
        assert f"{100 * metrics['capacity'][k]:.0f}%" in cells
        params = [c for c in cells if c.endswith("%)")]
        assert len(params) == 2, cells  # params (share) and FLOPs (share), whole


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A 12-task run of a small MLP: more tasks than an 80-column matrix holds in one block."""
    run = tmp_path_factory.mktemp("wide") / "run"
    out = invoke80("train", "--model", "mlp", "--model-opt", "hidden=[24]", "--data", "synthetic", "--data-opt",
                   "vector=true", "--data-opt", "dim=8", "--data-opt", "samples_per_class=6", "--data-opt",
                   "num_tasks=12", "--out", run, *FAST, "--no-plots", "--threads", "1")
    return run, out


def test_train_eval_inspect_fit_80_columns(wide_run):
    run, train_out = wide_run
    metrics = json.loads((run / "metrics.json").read_text())
    ids = [t["id"] for t in metrics["tasks"]]
    assert len(ids) == 12
    for text in (train_out, invoke80("eval", run, "--threads", "1"), invoke80("inspect", run)):
        assert_fits(text)
    # train: the matrix in two blocks of six, every number in its cell; the task table stacked, headers whole
    assert_matrix(train_out, metrics["accuracy_matrix"], ids)
    assert sum(line.startswith("after ") for line in train_out.splitlines()) == 2
    header_cells = {c for line in _table_lines(train_out) if "┃" in line for c in _cells(line)}
    assert set(TASK_HEADERS) <= header_cells
    assert_task_rows(train_out, metrics)
    assert "tasks: 0 = synthetic 0 · 1 = synthetic 1" in train_out
    # eval: its table and the recorded matrix
    eval_out = invoke80("eval", run, "--threads", "1")
    assert {"task", "samples", "acc now", "acc learned", "change"} <= {
        c for line in _table_lines(eval_out) if "┃" in line for c in _cells(line)}
    assert_matrix(eval_out, metrics["accuracy_matrix"], ids)
    # inspect: the units table in blocks of task columns, each block repeating group/kind/units
    inspect_out = invoke80("inspect", run)
    doc = json.loads(invoke80("inspect", run, "--json"))
    owned: dict[str, dict[str, str]] = {}
    header = None
    for line in _table_lines(inspect_out):
        cells = _cells(line)
        if "┃" in line and cells[0] == "group":
            header = cells
            assert header[1:3] == ["kind", "units"]
        elif header is not None and "│" in line:
            owned.setdefault(cells[0], {}).update(zip(header[3:], cells[3:]))
    for g in doc["groups"]:
        assert owned[g["name"]] == {**{str(t): f"{n:,}" for t, n in g["owned"].items()}, "free": f"{g['free']:,}"}
    assert owned["total"]["free"] == f"{doc['free_units']:,}"


def test_a_50_task_summary_fits_and_keeps_every_number():
    names = ["identity"] + [f"permutation {t}" for t in range(1, 50)]
    matrix = [[0.9 + 0.001 * (i + 3 * j) for j in range(i + 1)] for i in range(50)]
    metrics = {"tasks": [{"id": t, "name": n, "classes": list("0123456789")} for t, n in enumerate(names)],
               "accuracy_matrix": matrix, "acc": 0.93, "bwt": -0.01, "mean_forgetting": 0.01,
               "capacity": [0.02 * (t + 1) for t in range(50)], "capacity_params": [0.5] * 50,
               "owned_units": [10] * 50, "num_units": 512, "task_params": [123_456] * 50, "dense_params": 234_567,
               "task_flops": [1_234_567] * 50, "dense_flops": 2_345_678, "prune": [{"released": 5, "claim": 10}] * 50,
               "seconds": [12.0] * 50, "backbone": "mobilenetv3_small_050", "method": "anpyc-element"}
    con = Console(width=WIDTH, record=True, file=open("/dev/null", "w"))
    print_summary(con, metrics)
    text = con.export_text()
    assert_fits(text)
    assert_matrix(text, matrix, list(range(50)))
    assert_task_rows(text, metrics)
    assert "49 = permutation 49" in text
    for line in ("mobilenetv3_small_050 / anpyc-element, 50 tasks | ACC 93.0% | BWT -1.0 pts",
                 "forgetting 1.0 pts | capacity used 100% of units (50% of parameters)"):
        assert line in text.splitlines()


def test_blocked_table_blocks_are_even_and_fit():
    rows = [["row"] + [f"{v:,}" for v in range(1000, 1013)]]
    table = BlockedTable([Col("name", justify="left")], [Col(f"c{j}") for j in range(13)], rows)
    blocks = table.blocks(WIDTH)
    assert [len(b) for b in blocks] == [7, 6]  # 13 columns of 5 + 3: two blocks, not 10 + 3
    assert table.blocks(200) == [range(0, 13)]


def test_quickstart_tables_fit(tmp_path):
    from anpyc.cli.commands.quickstart import prediction_table

    rows = [(f"task{t}-digit{d}-{1000 + d}.png", t, str(d), str(d if d % 3 else d + 1), 0.987654, d % 3 != 0)
            for t in range(5) for d in (2 * t, 2 * t + 1)]
    con = Console(width=WIDTH, record=True, file=open("/dev/null", "w"))
    con.print(prediction_table(rows, tmp_path / "a-rather-long-folder-name" / "anpyc-quickstart" / "images"))
    text = con.export_text()
    assert_fits(text)
    for name, task, cls, label, score, _ in rows:
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert _cells(line) == [name, str(task), cls, label, f"{score:.3f}"]
