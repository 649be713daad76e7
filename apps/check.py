"""Check a backbone end to end before a long run: walk, learn a few synthetic tasks with pruning, export, verify.

``check_model(name)`` builds the backbone with random weights (never pretrained) at the smallest input size it
accepts (32x32 first), learns ``num_tasks`` made-up tasks for a few steps with pruning, so that every task's
subnetwork is a real subset, exports every task with :func:`anpyc.export.exporter.export_all` (which refuses a file
whose onnxruntime outputs differ from the masked model by more than 1e-4 of the logits' scale) and reports what happened. It never
raises for a model failure: the result says which stage failed and why (``ok``/``reason``).
"""

from __future__ import annotations

import re
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from anpyc.errors import clip

__all__ = ["check_model", "find_input_size", "prunable_fraction", "unmasked_tensors", "CANDIDATE_SIZES", "STAGES",
           "MIN_PRUNABLE"]

# input sides tried in order when none is given: the smallest one the model runs on is used
CANDIDATE_SIZES: tuple[int, ...] = (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)
STAGES = ("create", "walk", "learn", "export", "prunable")
# the share of the trunk's parameters that must lie in maskable groups for a check to pass
MIN_PRUNABLE = 0.5


def _spec(size: int, channels: int = 3):
    from anpyc.adapters.data.synthetic import SYNTHETIC_MEAN, SYNTHETIC_STD
    from anpyc.task import InputSpec

    return InputSpec("image", (channels, size, size), (SYNTHETIC_MEAN,) * channels, (SYNTHETIC_STD,) * channels,
                     "bilinear", 1.0, "RGB")


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:limit] if text else type(e).__name__


def find_input_size(name: str, sizes: tuple[int, ...] = CANDIDATE_SIZES) -> tuple[int, str]:
    """The smallest side in ``sizes`` on which backbone ``name`` builds and runs a forward pass.

    Fixed-size models (ViT, Swin, ...) are built for that size (the backbone factory passes timm's ``img_size``).
    Returns ``(size, "")``, or ``(0, why)`` when no size works.
    """
    from anpyc.adapters.backbones import create_backbone

    errors: list[str] = []
    default = _default_size(name)
    if default and default not in sizes:  # the size the model was designed for, as the last resort
        sizes = tuple(s for s in sizes if s < default) + (default,) + tuple(s for s in sizes if s > default)
    for size in sizes:
        try:
            torch.manual_seed(0)
            model = create_backbone(name, input_spec=_spec(size)).eval()
            with torch.no_grad():
                out = model(torch.zeros(2, 3, size, size))
            if not isinstance(out, torch.Tensor) or out.ndim != 2:
                raise ValueError(f"returns {getattr(out, 'shape', type(out).__name__)}, not [batch, features]")
            return size, ""
        except Exception as e:  # a size the model rejects: try the next one
            errors.append(f"{size}: {_short(e, 160)}")
            if "unknown model" in str(e):
                break
    return 0, "no input size works (" + "; ".join(errors[:3]) + ")"


def _default_size(name: str) -> int | None:
    try:
        import timm

        size = timm.get_pretrained_cfg_value(name, "input_size")
        return int(size[-1]) if size else None
    except Exception:  # not a timm model (mlp, cnn) or no config
        return None


def _covered(structure, names: set[str]) -> dict[str, tuple[int, int]]:
    """Per trunk tensor in ``names``: ``(elements inside some unit of an accepted group, all elements)``."""
    out: dict[str, tuple[int, int]] = {}
    for name, shape in structure.tensor_shapes.items():
        if name not in names:
            continue
        dims = structure.tensor_units.get(name, {})
        mask = torch.zeros(shape, dtype=torch.bool)
        for dim, ids in dims.items():
            view = [1] * len(shape)
            view[dim] = shape[dim]
            mask |= (ids >= 0).view(view).expand(shape)
        out[name] = (int(mask.sum()), _numel(shape))
    return out


def prunable_fraction(structure, param_names: set[str] | None = None) -> float:
    """Share of the trunk's parameter elements (``param_names``; default every tensor the structure knows) that
    belong to some unit of an accepted group."""
    names = set(structure.tensor_shapes) if param_names is None else set(param_names)
    cov = _covered(structure, names)
    total = sum(n for _, n in cov.values())
    return sum(c for c, _ in cov.values()) / total if total else 0.0


def unmasked_tensors(structure, param_names: set[str] | None = None, top: int = 5) -> list[dict[str, Any]]:
    """The trunk tensors with the most parameter elements outside every accepted group, largest first:
    ``[{"tensor", "params", "share"}]`` (``share`` of all the trunk's parameters)."""
    names = set(structure.tensor_shapes) if param_names is None else set(param_names)
    cov = _covered(structure, names)
    total = sum(n for _, n in cov.values()) or 1
    rest = sorted(((n - c, t) for t, (c, n) in cov.items() if n > c), reverse=True)[:top]
    return [{"tensor": t, "params": int(k), "share": round(k / total, 4)} for k, t in rest]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for v in shape:
        n *= int(v)
    return n


def _reason_kind(reason: str) -> str:
    """A short category of a rejection reason: module names and numbers removed, first clause only."""
    head = re.split(r"[:;(]", reason, maxsplit=1)[0]
    head = re.sub(r"\b[\w]+(\.[\w]+)+\b", "", head)  # dotted module names
    head = re.sub(r"\b\d+\b", "", head)
    head = " ".join(head.split())
    return head or clip(reason, 40)


def _too_little(result: dict[str, Any]) -> str:
    """Why a model that ran through every stage still fails: how much is maskable, what was rejected and why."""
    share, need = result["prunable_fraction"], result["min_prunable"]
    rej = result["rejected"]
    text = (f"only {100 * share:.1f}% of the trunk's parameters are in maskable groups, below the required "
            f"{100 * need:.0f}% (--min-prunable)")
    if rej["count"]:
        reasons = ", ".join(f"{v}x {k}" for k, v in list(rej["reasons"].items())[:3])
        text += f"; {rej['count']} groups rejected ({reasons}; --explain lists each)"
    elif not result["groups"]:
        text += "; the walk traced no prunable group"
    if result["unmasked"]:
        text += "; largest unmasked tensors: " + ", ".join(
            f"{u['tensor']} ({100 * u['share']:.0f}%)" for u in result["unmasked"][:3])
    return text


def _config(steps: int, batch: int, threads: int | None):
    from anpyc.configure import method_config

    overrides: dict[str, Any] = {
        "optim.epochs": 1, "optim.batch_size": batch, "optim.lr": 0.01,
        "importance.max_batches": 1, "importance.batch_size": batch,
        "prune.mode": "schedule", "prune.steps.first_ratio": 0.5, "prune.steps.step": 0.5, "prune.steps.decay": 1.0,
        "prune.retrain_epochs": 1, "eval_batch_size": 32, "checkpoint_epochs": False,
    }
    if threads:
        overrides["threads"] = int(threads)
    return method_config("anpyc", **overrides)


def check_model(
    name: str,
    *,
    img_size: int | None = None,
    num_tasks: int = 2,
    steps: int = 2,
    out_dir: str | Path | None = None,
    threads: int | None = None,
    batch_size: int = 8,
    min_prunable: float = MIN_PRUNABLE,
) -> dict[str, Any]:
    """Walk, learn ``num_tasks`` synthetic tasks (``steps`` training steps each, then one 50% prune step and a
    retrain epoch), export every task and return a report.

    The check passes only when every stage succeeds *and* at least ``min_prunable`` of the trunk's parameters lie
    in maskable groups: a model the walk cannot split into units would "pass" by exporting the dense network for
    every task, which is not what a user of continual pruning asked for. Such a model fails at stage
    ``"prunable"`` with the share found, the rejected groups' reasons and the largest unmasked tensors.

    Keys: ``model``, ``ok``, ``reason`` (empty when ok; else ``"<stage>: <message>"``, stages in :data:`STAGES`),
    ``stage``, ``img_size``, ``groups``, ``group_kinds``, ``rejected`` (``{"count", "reasons"}``), ``units``,
    ``prunable_fraction`` (share of trunk parameters inside accepted groups), ``params_per_task``, ``dense_params``,
    ``flops_per_task``, ``dense_flops``, ``parity`` (max abs diff per task, onnxruntime vs masked model),
    ``exporter`` (per task), ``seconds``, ``min_prunable``, ``rejected_groups`` (every rejected group except
    single-unit ones: ``{"name", "reason", "tensor", "max_abs_diff"}``, the last two set when parity located the
    tensor where masked and sliced outputs first part), ``unmasked`` (see :func:`unmasked_tensors`).
    """
    t0 = time.time()
    result: dict[str, Any] = {
        "model": name, "ok": False, "reason": "", "stage": "", "img_size": img_size, "groups": 0,
        "group_kinds": {}, "rejected": {"count": 0, "reasons": {}}, "units": 0, "prunable_fraction": 0.0,
        "params_per_task": [], "dense_params": None, "flops_per_task": [], "dense_flops": None, "parity": [],
        "exporter": [], "seconds": 0.0, "min_prunable": float(min_prunable), "rejected_groups": [], "unmasked": [],
    }

    def fail(stage: str, message: str) -> dict[str, Any]:
        result.update(ok=False, stage=stage, reason=f"{stage}: {message}", seconds=round(time.time() - t0, 1))
        return result

    if threads:
        torch.set_num_threads(int(threads))
    steps = max(1, int(steps))
    num_tasks = max(1, int(num_tasks))

    # ------------------------------------------------------------ create (and pick the input size)
    if img_size is None:
        size, why = find_input_size(name)
        if not size:
            return fail("create", why)
    else:
        size = int(img_size)
    result["img_size"] = size

    # ------------------------------------------------------------ walk (inside the learner)
    from anpyc.adapters.data import synthetic_stream
    from anpyc.learner import ContinualLearner

    classes = 2
    per_class = max(2, -(-steps * batch_size // classes))
    try:
        stream = synthetic_stream(num_tasks=num_tasks, classes_per_task=classes, samples_per_class=per_class,
                                  input_spec=_spec(size), seed=0)
    except Exception as e:
        return fail("create", _short(e))
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="anpyc-check-")
        root = Path(tmp.name)
    else:
        root = Path(out_dir)
        root.mkdir(parents=True, exist_ok=True)
    learner = None
    try:
        try:
            learner = ContinualLearner(name, input_spec=stream.input_spec,
                                       out_dir=None if tmp is not None else root / "run",
                                       config=_config(steps, batch_size, threads))
        except Exception as e:
            return fail("walk", _short(e))
        structure = learner.structure
        kinds = Counter(g.kind for g in structure.groups)
        rejected = [r for r in structure.rejected if r.reason != "a single unit"]
        trunk_params = {n for n, _ in learner.trunk.named_parameters()}
        result.update(
            groups=len(structure.groups), group_kinds=dict(kinds), units=int(structure.num_units),
            rejected={"count": len(rejected), "single_unit": len(structure.rejected) - len(rejected),
                      "reasons": dict(Counter(_reason_kind(r.reason) for r in rejected).most_common())},
            prunable_fraction=round(prunable_fraction(structure, trunk_params), 4),
            rejected_groups=[{"name": r.name, "reason": r.reason, "tensor": getattr(r, "tensor", "") or "",
                              "max_abs_diff": getattr(r, "max_abs_diff", None)} for r in rejected],
            unmasked=unmasked_tensors(structure, trunk_params),
        )

        # -------------------------------------------------------- learn
        try:
            for i, task in enumerate(stream):
                learner.learn(task, final=i == len(stream) - 1)
            m = learner.metrics()
            result.update(params_per_task=list(m["task_params"]), dense_params=m["dense_params"],
                          flops_per_task=list(m["task_flops"]), dense_flops=m["dense_flops"])
        except Exception as e:
            return fail("learn", _short(e))

        # -------------------------------------------------------- export (parity-checked inside)
        from anpyc.export.exporter import export_all

        try:
            sidecars = export_all(learner, root / "export", threads=threads or 1)
        except Exception as e:
            return fail("export", _short(e))
        result["parity"] = [float(s["parity"]["max_abs_diff"]) for s in sidecars]
        result["exporter"] = [str(s["exporter"]) for s in sidecars]
        if not result["prunable_fraction"] >= min_prunable:
            return fail("prunable", _too_little(result))
        result.update(ok=True, stage="done", reason="", seconds=round(time.time() - t0, 1))
        return result
    except Exception as e:  # anything unexpected is still a report, with where it came from
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        return fail(result.get("stage") or "check", _short(e) + where)
    finally:
        if learner is not None and learner.run is not None:
            learner.run.close()  # releases the run's lock even when a stage failed
        if tmp is not None:
            tmp.cleanup()
