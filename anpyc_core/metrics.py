"""Continual-learning metrics from an accuracy matrix (METHOD.md section 5).

``R[i][j]`` is the accuracy on task j after training task i (None where j > i). ACC is the mean of the last
row, BWT the mean change of each earlier task from when it was learned to the end, forgetting the drop from
each task's best earlier accuracy to its final one.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["continual_metrics", "acc", "bwt", "forgetting"]

Matrix = Sequence[Sequence[float | None]]


def _last(R: Matrix) -> Sequence[float | None]:
    return R[-1] if R else []


def acc(R: Matrix) -> float:
    row = [v for v in _last(R) if v is not None]
    return sum(row) / len(row) if row else math.nan


def bwt(R: Matrix) -> float:
    T = len(R)
    if T < 2:
        return 0.0
    vals = [R[T - 1][j] - R[j][j] for j in range(T - 1) if R[T - 1][j] is not None and R[j][j] is not None]
    return sum(vals) / len(vals) if vals else 0.0


def forgetting(R: Matrix) -> list[float]:
    """Per earlier task: max over i < T-1 of R[i][j] minus R[T-1][j]."""
    T = len(R)
    out = []
    for j in range(T - 1):
        earlier = [R[i][j] for i in range(j, T - 1) if j < len(R[i]) and R[i][j] is not None]
        if earlier and R[T - 1][j] is not None:
            out.append(max(earlier) - R[T - 1][j])
    return out


def continual_metrics(R: Matrix) -> dict:
    f = forgetting(R)
    return {
        "acc": acc(R),
        "bwt": bwt(R),
        "forgetting": f,
        "mean_forgetting": sum(f) / len(f) if f else 0.0,
        "num_tasks": len(R),
    }
