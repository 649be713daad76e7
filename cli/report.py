"""The one-screen summary of a run: accuracy matrix, ACC/BWT, and per task its capacity, parameters and FLOPs.

Works on the dict of :meth:`anpyc.learner.ContinualLearner.metrics` or on ``RUN/metrics.json`` (the same keys).
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ._common import is_number

__all__ = ["titled", "accuracy_table", "task_table", "headline", "print_summary", "fmt_count"]

# A drop of an earlier task (percentage points, vs. when it was learned) shown in yellow above this, red above 5.
_DROP_WARN, _DROP_BAD = 0.5, 5.0


def fmt_count(n: float | int | None) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def titled(title: str, table: Table) -> Group:
    """A table under a title line (a rich table title would wrap at the table's width)."""
    return Group(Text(title, style="italic"), table)


def _names(metrics: dict) -> list[str]:
    return [f"{t['id']}:{t['name']}" for t in metrics.get("tasks") or []]


def accuracy_table(matrix: Sequence[Sequence[float | None]], names: Sequence[str], *,
                   title: str = "test accuracy (%): row = after learning task, column = task") -> Group:
    """R[i][j] in percent under a title line; each earlier-task cell is coloured by its change since it was learned."""
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("after", style="bold", no_wrap=True)
    for name in names[: len(matrix)]:
        table.add_column(Text(name), justify="right", no_wrap=True)
    for i, row in enumerate(matrix):
        cells = []
        for j in range(len(matrix)):
            v = row[j] if j < len(row) else None
            if not is_number(v):
                cells.append(Text("·" if j > i else "-", style="dim"))
                continue
            diag = matrix[j][j] if j < len(matrix[j]) else None
            drop = 100 * (diag - v) if is_number(diag) else 0.0
            style = "bold" if i == j else ("red" if drop > _DROP_BAD else "yellow" if drop > _DROP_WARN else "green")
            cells.append(Text(f"{100 * v:.1f}", style=style))
        table.add_row(Text(names[i] if i < len(names) else str(i)), *cells)
    return titled(title, table)


def task_table(metrics: dict) -> Table:
    """Per task: accuracy now and when learned, units it owns, capacity used after it, params and FLOPs."""
    names = _names(metrics)
    matrix = metrics.get("accuracy_matrix") or []
    last = matrix[-1] if matrix else []
    n_units = metrics.get("num_units") or 0
    dense_p, dense_f = metrics.get("dense_params"), metrics.get("dense_flops")
    table = Table(title="per task", title_justify="left", title_style="italic", show_edge=False, pad_edge=False)
    for col, just in (("task", "left"), ("classes", "right"), ("acc now", "right"), ("acc learned", "right"),
                      ("owns", "right"), ("used after", "right"), ("params", "right"), ("FLOPs", "right"),
                      ("pruned", "right"), ("time", "right")):
        table.add_column(col, justify=just, no_wrap=True)
    tasks = metrics.get("tasks") or []
    for k, name in enumerate(names):
        learned = matrix[k][k] if k < len(matrix) and k < len(matrix[k]) else None
        now = last[k] if k < len(last) else None
        owned = (metrics.get("owned_units") or [None] * (k + 1))[k]
        cap = (metrics.get("capacity") or [None] * (k + 1))[k]
        params = (metrics.get("task_params") or [None] * (k + 1))[k]
        flops = (metrics.get("task_flops") or [None] * (k + 1))[k]
        prune = (metrics.get("prune") or [{}] * (k + 1))[k] or {}
        secs = (metrics.get("seconds") or [None] * (k + 1))[k]
        claim = prune.get("claim") or 0
        table.add_row(
            Text(name),
            str(len(tasks[k].get("classes") or [])) if k < len(tasks) else "-",
            f"{100 * now:.1f}%" if is_number(now) else "-",
            f"{100 * learned:.1f}%" if is_number(learned) else "-",
            f"{100 * owned / n_units:.1f}%" if is_number(owned) and n_units else "-",
            f"{100 * cap:.0f}%" if is_number(cap) else "-",
            f"{fmt_count(params)} ({100 * params / dense_p:.0f}%)" if is_number(params) and dense_p else fmt_count(params),
            f"{fmt_count(flops)} ({100 * flops / dense_f:.0f}%)" if is_number(flops) and dense_f else fmt_count(flops),
            f"{100 * prune.get('released', 0) / claim:.0f}% of claim" if claim else "-",
            f"{secs:.0f}s" if is_number(secs) else "-",
        )
    return table


def headline(metrics: dict) -> Text:
    """'ACC 98.6%  BWT +0.0 pts  ...' in one line."""
    acc, bwt = metrics.get("acc"), metrics.get("bwt")
    cap = (metrics.get("capacity") or [None])[-1]
    capp = (metrics.get("capacity_params") or [None])[-1]
    parts = [f"{metrics.get('backbone', '?')} / {metrics.get('method', '?')}, {len(metrics.get('tasks') or [])} tasks",
             f"ACC {100 * acc:.1f}%" if is_number(acc) else "ACC -",
             f"BWT {100 * bwt:+.1f} pts" if is_number(bwt) else "BWT -"]
    if is_number(metrics.get("mean_forgetting")):
        parts.append(f"forgetting {100 * metrics['mean_forgetting']:.1f} pts")
    if is_number(cap):
        used = f"capacity used {100 * cap:.0f}% of units"
        if is_number(capp):
            used += f" ({100 * capp:.0f}% of parameters)"
        parts.append(used + f", {100 * (1 - cap):.0f}% free for new tasks")
    return Text("  |  ".join(parts), style="bold")


def print_summary(console: Console, metrics: dict) -> None:
    """Accuracy matrix, the per-task table and the headline."""
    console.print(Group(accuracy_table(metrics.get("accuracy_matrix") or [], _names(metrics)), Text(""),
                        task_table(metrics), Text(""), headline(metrics)))
