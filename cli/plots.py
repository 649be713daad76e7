"""PNG plots of a run, written to ``RUN/plots/`` by ``anpyc train``/``quickstart`` (and ``anpyc inspect --plots``).

* ``accuracy_matrix.png``: heatmap of R[i][j], the test accuracy on task j after learning task i, every cell
  annotated; ACC and BWT in the title.
* ``capacity.png``: after each task, the share of the backbone's units each task owns (stacked) and what is free;
  diamonds mark the share by parameters.
* ``accuracy_over_time.png``: one line per task, its test accuracy after each later task; dashed, the average
  over the tasks seen so far.

Input is the metrics dict (``ContinualLearner.metrics()`` or ``RUN/metrics.json``); only matplotlib's
object-oriented API is used (no pyplot state, no display needed). The core never imports this module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ._common import is_number

__all__ = ["write_plots", "plot_accuracy_matrix", "plot_capacity", "plot_accuracy_over_time", "PLOT_FILES"]

PLOT_FILES = ("accuracy_matrix.png", "capacity.png", "accuracy_over_time.png")
_DPI = 120


def _labels(metrics: dict) -> list[str]:
    labels = []
    for t in metrics.get("tasks") or []:
        name = str(t.get("name", t["id"]))
        labels.append(f"{t['id']}: {name[:14] + '…' if len(name) > 15 else name}")
    return labels


def _ticks(metrics: dict, T: int) -> list[str]:
    """Task ids for an x axis (the names are in the legend)."""
    ids = [str(t["id"]) for t in metrics.get("tasks") or []][:T]
    return ids if len(ids) == T else [str(i) for i in range(T)]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, facecolor="white")
    return path


def plot_accuracy_matrix(metrics: dict, path: Path) -> Path:
    import numpy as np

    R: Sequence[Sequence[float | None]] = metrics.get("accuracy_matrix") or []
    T = len(R)
    labels = _labels(metrics)[:T] or [str(i) for i in range(T)]
    M = np.full((T, T), np.nan)
    for i, row in enumerate(R):
        for j, v in enumerate(row[:T]):
            if is_number(v):
                M[i, j] = 100 * v
    finite = M[np.isfinite(M)]
    vmin = min(50.0, 10 * math.floor(finite.min() / 10)) if finite.size else 0.0
    side = max(4.2, 0.75 * T + 2.8)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(M), cmap="viridis", vmin=vmin, vmax=100, aspect="equal")
    cbar = fig.colorbar(im, ax=ax, shrink=0.85)
    cbar.set_label("test accuracy (%)")
    if T <= 20:
        size = 10 if T <= 8 else 8 if T <= 12 else 6
        for i in range(T):
            for j in range(T):
                if np.isfinite(M[i, j]):
                    light = (M[i, j] - vmin) / max(100 - vmin, 1e-9) > 0.6  # viridis is light at the top
                    ax.text(j, i, f"{M[i, j]:.1f}", ha="center", va="center", fontsize=size,
                            color="black" if light else "white")
    ax.set_xticks(range(T), labels, rotation=45 if T > 3 else 0, ha="right" if T > 3 else "center")
    ax.set_yticks(range(T), labels)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after learning task")
    acc, bwt = metrics.get("acc"), metrics.get("bwt")
    sub = []
    if is_number(acc):
        sub.append(f"ACC {100 * acc:.1f}%")
    if is_number(bwt):
        sub.append(f"BWT {100 * bwt:+.1f} pts")
    ax.set_title("Accuracy matrix" + (f"   ({', '.join(sub)})" if sub else ""), fontsize=11)
    return _save(fig, path)


def plot_capacity(metrics: dict, path: Path) -> Path:
    owned = metrics.get("owned_units") or []
    n_units = metrics.get("num_units") or 0
    T = len(owned)
    labels = _labels(metrics)[:T] or [str(i) for i in range(T)]
    colors = _colors(T)
    fig = _figure(max(5.5, 0.65 * T + 4.0), 4.2)
    ax = fig.add_subplot()
    xs = list(range(T))
    for i in xs:
        bottom = 0.0
        for j in range(i + 1):
            share = 100 * (owned[j] or 0) / n_units if n_units else 0.0
            ax.bar(i, share, bottom=bottom, color=colors[j], edgecolor="white", linewidth=0.6, width=0.7,
                   label=labels[j] if i == T - 1 else None)
            bottom += share
        ax.bar(i, max(100 - bottom, 0), bottom=bottom, color="#e6e6e6", edgecolor="white", linewidth=0.6, width=0.7,
               label="free" if i == T - 1 else None)
        ax.text(i, min(bottom, 100) + 1.5 if bottom < 92 else bottom - 6, f"{bottom:.0f}%", ha="center",
                fontsize=9, color="black")
    capp = metrics.get("capacity_params") or []
    pts = [(i, 100 * v) for i, v in enumerate(capp[:T]) if is_number(v)]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="D", s=28, color="black", zorder=3,
                   label="used, share of parameters")
    ax.set_xticks(xs, _ticks(metrics, T))
    ax.set_xlabel("after learning task")
    ax.set_ylim(0, 105)
    ax.set_ylabel("share of the backbone's units (%)")
    ax.set_title("Capacity: units owned by each task", fontsize=11)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False, reverse=True)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def plot_accuracy_over_time(metrics: dict, path: Path) -> Path:
    R = metrics.get("accuracy_matrix") or []
    T = len(R)
    labels = _labels(metrics)[:T] or [str(i) for i in range(T)]
    colors = _colors(T)
    fig = _figure(max(5.5, 0.65 * T + 4.0), 4.2)
    ax = fig.add_subplot()
    lows = []
    markers = "osD^vP*Xhp<>"
    for j in range(T):
        pts = [(i, 100 * R[i][j]) for i in range(j, T) if j < len(R[i]) and is_number(R[i][j])]
        if not pts:
            continue
        lows.append(min(p[1] for p in pts))
        # tasks often share a value (e.g. 100%): a small sideways offset and thinner later lines keep each visible
        dx = (j - (T - 1) / 2) * min(0.05, 0.3 / max(T, 1))
        ax.plot([p[0] + dx for p in pts], [p[1] for p in pts], marker=markers[j % len(markers)], ms=5,
                lw=max(3.2 - 0.25 * j, 1.2), color=colors[j], label=labels[j], alpha=0.9)
    avg = []
    for i, row in enumerate(R):
        vals = [100 * v for v in row[: i + 1] if is_number(v)]
        if vals:
            avg.append((i, sum(vals) / len(vals)))
    if avg:
        ax.plot([p[0] for p in avg], [p[1] for p in avg], ls="--", lw=2.2, color="black", label="average (ACC)")
    low = min(lows + [p[1] for p in avg]) if (lows or avg) else 0.0
    ax.set_ylim(max(0.0, 10 * math.floor(low / 10) - 5), 101)
    ax.set_xticks(range(T), _ticks(metrics, T))
    ax.set_xlabel("after learning task")
    ax.set_xlim(-0.4, T - 0.6)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy of each task as later tasks are learned", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def write_plots(metrics: dict, out_dir: str | Path) -> list[Path]:
    """Write the three plots into ``out_dir``; returns their paths (none when no task is finished)."""
    out = Path(out_dir)
    if not metrics.get("accuracy_matrix"):
        return []
    return [plot_accuracy_matrix(metrics, out / PLOT_FILES[0]), plot_capacity(metrics, out / PLOT_FILES[1]),
            plot_accuracy_over_time(metrics, out / PLOT_FILES[2])]
