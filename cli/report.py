"""The one-screen summary of a run: accuracy matrix, ACC/BWT, and per task its capacity, parameters and FLOPs.

Works on the dict of :meth:`anpyc.learner.ContinualLearner.metrics` or on ``RUN/metrics.json`` (the same keys).

Every table fits the console it is printed on, 80 columns (a pipe's width) included, without cutting a header or
a number: short column labels (task ids, names in a legend below), text that wraps inside its column, and
:class:`BlockedTable`, which splits the columns of a table too wide for the console into blocks printed one under
the other, each repeating the leading columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text

from ._common import is_number, printable

__all__ = ["Col", "BlockedTable", "Joined", "titled", "accuracy_table", "task_table", "headline", "print_summary",
           "fmt_count", "legend"]

# A drop of an earlier task (percentage points, vs. when it was learned) shown in yellow above this, red above 5.
_DROP_WARN, _DROP_BAD = 0.5, 5.0
_GAP = 3  # what rich's default box puts between two columns: a space, the rule, a space


def fmt_count(n: float | int | None) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def titled(title: str, table: Any) -> Group:
    """A table under a title line (a rich table title would wrap at the table's width)."""
    return Group(Text(title, style="italic"), table)


def legend(pairs: Iterable[tuple[Any, Any]], label: str = "tasks") -> "Joined":
    """'tasks: 0 = classes 0,1 · 1 = classes 2,3', broken between entries, never inside one."""
    parts = [f"{k} = {v}" for k, v in pairs]
    if parts:
        parts[0] = f"{label}: {parts[0]}"
    return Joined(parts, sep=" · ", style="dim")


class Joined:
    """Parts joined by ``sep`` on as few lines as the console allows, broken only between parts (a wrapped line
    would split 'BWT +0.0' from 'pts')."""

    def __init__(self, parts: Sequence[str], *, sep: str = " | ", style: str | None = None):
        self.parts, self.sep, self.style = [p for p in parts if p], sep, style

    def lines(self, width: int) -> list[str]:
        lines: list[str] = []
        for part in self.parts:
            if lines and cell_len(lines[-1] + self.sep + part) <= width:
                lines[-1] += self.sep + part
            else:
                lines.append(part)
        return lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text("\n".join(self.lines(options.max_width)), style=self.style)


@dataclass(frozen=True)
class Col:
    """One column of a :class:`BlockedTable`; ``fold`` lets long text wrap inside the column instead of widening it;
    ``min_width`` keeps columns of numbers aligned from one block to the next."""

    header: str
    justify: str = "right"
    fold: bool = False
    style: str | None = None
    min_width: int = 0


def _width(cell: Any) -> int:
    return cell.cell_len if isinstance(cell, Text) else cell_len(str(cell))


def _even_blocks(n: int, blocks: int) -> list[range]:
    size, extra = divmod(n, blocks)
    out, start = [], 0
    for b in range(blocks):
        end = start + size + (1 if b < extra else 0)
        out.append(range(start, end))
        start = end
    return out


class BlockedTable:
    """A table that fits the console: ``cols`` are split into as few blocks of even size as fit the width, printed
    one under the other, each block repeating the ``lead`` columns.

    ``rows`` hold the lead cells followed by one cell per column of ``cols``. ``keep_row(i, block)`` may drop rows
    from a block (the accuracy matrix leaves out rows that hold nothing but blanks there).
    """

    def __init__(self, lead: Sequence[Col], cols: Sequence[Col], rows: Sequence[Sequence[Any]], *,
                 keep_row: Callable[[int, range], bool] | None = None):
        self.lead, self.cols, self.rows = list(lead), list(cols), [list(r) for r in rows]
        self.keep_row = keep_row

    def _natural(self, j: int, col: Col) -> int:
        return max([col.min_width, cell_len(col.header)] + [_width(r[j]) for r in self.rows if j < len(r)])

    def blocks(self, width: int) -> list[range]:
        """The column blocks (ranges over ``cols``) for a console ``width`` columns wide."""
        n = len(self.cols)
        if n == 0:
            return [range(0)]
        nl = len(self.lead)
        lead_w = sum(self._natural(j, c) for j, c in enumerate(self.lead)) + _GAP * nl
        widths = [self._natural(nl + j, c) for j, c in enumerate(self.cols)]
        for count in range(1, n + 1):
            ranges = _even_blocks(n, count)
            if all(lead_w + sum(widths[j] for j in r) + _GAP * (len(r) - 1) <= width for r in ranges):
                return ranges
        return _even_blocks(n, n)  # even one column per block is too wide: rich folds the lead columns

    def table(self, block: range) -> Table:
        table = Table(show_edge=False, pad_edge=False)
        for c in self.lead + [self.cols[j] for j in block]:
            table.add_column(c.header, justify=c.justify, style=c.style, no_wrap=not c.fold,
                             overflow="fold" if c.fold else "ellipsis", min_width=c.min_width or None)
        nl = len(self.lead)
        for i, row in enumerate(self.rows):
            if self.keep_row is None or self.keep_row(i, block):
                table.add_row(*row[:nl], *(row[nl + j] for j in block))
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for k, block in enumerate(self.blocks(options.max_width)):
            if k:
                yield Text("")
            yield self.table(block)


def _tasks(metrics: dict) -> list[tuple[Any, str]]:
    return [(t["id"], printable(t["name"])) for t in metrics.get("tasks") or []]


def accuracy_table(matrix: Sequence[Sequence[float | None]], tasks: Sequence[tuple[Any, str]], *,
                   title: str = "test accuracy (%): row = after learning task, column = task") -> Group:
    """R[i][j] in percent under a title line, task ids as labels and their names in a legend; each earlier-task cell
    is coloured by its change since it was learned. Wide matrices are printed in blocks of columns."""
    ids = [str(t[0]) for t in tasks] + [str(i) for i in range(len(tasks), len(matrix))]
    rows = []
    for i, row in enumerate(matrix):
        cells: list[Any] = [Text(ids[i], style="bold")]
        for j in range(len(matrix)):
            v = row[j] if j < len(row) else None
            if not is_number(v):
                cells.append(Text("·" if j > i else "-", style="dim"))
                continue
            diag = matrix[j][j] if j < len(matrix[j]) else None
            drop = 100 * (diag - v) if is_number(diag) else 0.0
            style = "bold" if i == j else ("red" if drop > _DROP_BAD else "yellow" if drop > _DROP_WARN else "green")
            cells.append(Text(f"{100 * v:.1f}", style=style))
        rows.append(cells)
    cols = [Col(ids[j], min_width=5) for j in range(len(matrix))]  # "100.0"
    table = BlockedTable([Col("after", justify="left")], cols, rows,
                         keep_row=lambda i, block: not block or i >= block.start)  # rows above a block: blanks only
    return Group(Text(title, style="italic"), table, legend(tasks[: len(matrix)]))


def _share(v: float | None, total: float | None, unit: str = "%") -> str:
    return f"{100 * v / total:.1f}{unit}" if is_number(v) and total else "-"


def task_table(metrics: dict) -> Group:
    """Per task: accuracy now and when learned, units it owns, capacity used after it, params, FLOPs, time."""
    matrix = metrics.get("accuracy_matrix") or []
    last = matrix[-1] if matrix else []
    n_units = metrics.get("num_units") or 0
    dense_p, dense_f = metrics.get("dense_params"), metrics.get("dense_flops")
    tasks = metrics.get("tasks") or []

    def nth(key: str, k: int, default: Any = None) -> Any:
        values = metrics.get(key) or []
        return values[k] if k < len(values) else default

    rows = []
    for k, t in enumerate(tasks):
        learned = matrix[k][k] if k < len(matrix) and k < len(matrix[k]) else None
        now = last[k] if k < len(last) else None
        params, flops = nth("task_params", k), nth("task_flops", k)
        prune = nth("prune", k) or {}
        claim = prune.get("claim") or 0
        secs = nth("seconds", k)
        cap = nth("capacity", k)
        rows.append([
            Text(f"{t['id']}:{printable(t['name'])}"),
            str(len(t.get("classes") or [])),
            f"{100 * now:.1f}%" if is_number(now) else "-",
            f"{100 * learned:.1f}%" if is_number(learned) else "-",
            _share(nth("owned_units", k), n_units),
            f"{100 * cap:.0f}%" if is_number(cap) else "-",
            f"{fmt_count(params)} ({100 * params / dense_p:.0f}%)" if is_number(params) and dense_p else fmt_count(params),
            f"{fmt_count(flops)} ({100 * flops / dense_f:.0f}%)" if is_number(flops) and dense_f else fmt_count(flops),
            f"{100 * prune.get('released', 0) / claim:.0f}%" if claim else "-",
            f"{secs:.0f}s" if is_number(secs) else "-",
        ])
    cols = [Col(h) for h in ("classes", "acc now", "acc learned", "owns", "capacity", "params", "FLOPs", "pruned",
                             "time")]
    table = BlockedTable([Col("task", justify="left", fold=True)], cols, rows)
    notes = Text("owns: share of all units the task owns · capacity: share owned by it and earlier tasks · params, "
                 "FLOPs: its subnetwork (share of the dense model) · pruned: share of its claim released", style="dim")
    return Group(Text("per task", style="italic"), table, notes)


def headline(metrics: dict) -> Joined:
    """'backbone / method, N tasks | ACC 98.6% | BWT +0.0 pts | ...', broken between parts to fit the console."""
    acc, bwt = metrics.get("acc"), metrics.get("bwt")
    cap = (metrics.get("capacity") or [None])[-1]
    capp = (metrics.get("capacity_params") or [None])[-1]
    parts = [f"{metrics.get('backbone', '?')} / {metrics.get('method', '?')}, {len(metrics.get('tasks') or [])} tasks",
             f"ACC {100 * acc:.1f}%" if is_number(acc) else "ACC -",
             f"BWT {100 * bwt:+.1f} pts" if is_number(bwt) else "BWT -"]
    if is_number(metrics.get("mean_forgetting")):
        parts.append(f"forgetting {100 * metrics['mean_forgetting']:.1f} pts")
    if is_number(cap):
        parts.append(f"capacity used {100 * cap:.0f}% of units" + (f" ({100 * capp:.0f}% of parameters)"
                                                                    if is_number(capp) else ""))
        parts.append(f"{100 * (1 - cap):.0f}% free for new tasks")
    return Joined(parts, style="bold")


def print_summary(console: Console, metrics: dict) -> None:
    """Accuracy matrix, the per-task table and the headline."""
    console.print(Group(accuracy_table(metrics.get("accuracy_matrix") or [], _tasks(metrics)), Text(""),
                        task_table(metrics), Text(""), headline(metrics)))
