"""Continual-learning metrics from an accuracy matrix (docs/method.md, section 8).

``R[i][j]`` is the accuracy on task j after training task i (None where j > i). ACC is the mean of the last
row, BWT the mean change of each earlier task from when it was learned to the end, forgetting the drop from
each task's best earlier accuracy to its final one.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["continual_metrics", "run_metrics", "acc", "bwt", "forgetting"]

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


def run_metrics(method: str, backbone: str, tasks: list[dict], acc_test: Matrix, acc_val: Matrix,
                history: list[dict], num_units: int) -> dict:
    """Everything a run reports (``metrics.json``): the accuracy matrices and their summary, and per task its
    capacity, parameters, FLOPs, prune record and time (``history``: the learner's per-task records)."""
    m = continual_metrics([row for row in acc_test]) if acc_test else {}
    return {
        "method": method,
        "backbone": backbone,
        "tasks": tasks,
        "accuracy_matrix": acc_test,
        "val_accuracy_matrix": acc_val,
        **m,
        "capacity": [h["capacity"] for h in history],
        "capacity_params": [h["capacity_params"] for h in history],
        "owned_units": [h["owned_units"] for h in history],
        "task_params": [h["params"] for h in history],
        "task_flops": [h["flops"] for h in history],
        "dense_params": history[-1]["dense_params"] if history else None,
        "dense_flops": history[-1]["dense_flops"] if history else None,
        "prune": [h["prune"] for h in history],
        "seconds": [h["seconds"] for h in history],
        "num_units": num_units,
    }

