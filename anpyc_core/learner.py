"""The continual learner: owns the loop (train -> guarded prune/retrain -> consolidate -> evaluate -> save).

Usage::

    learner = anpyc.ContinualLearner(model, input_size=(3, 32, 32), out_dir="runs/demo")
    for task in stream:
        learner.learn(task)
    print(learner.metrics())
    learner = anpyc.ContinualLearner.resume("runs/demo")   # continues where it stopped

The learner knows nothing about any particular architecture: the mask space (:mod:`anpyc.masks`, which runs the
structure walk) gives it units and ownership, the registries give it importance, consolidation and pruning
strategies; its state goes to files through :mod:`anpyc.checkpoint`, its task models come from
:mod:`anpyc.subnet`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from . import checkpoint
from .backbones import build_trunk
from .config import BACKBONE_DEFAULTS, LearnerConfig, method_config
from .consolidation import CONSOLIDATION, Consolidation, Stack, accumulate_omega, create_consolidation
from .dist import DistContext, check_device, context, wrap_ddp
from .errors import ConfigError, DataError, RunDirError
from .events import Epoch, Eval, Event, Grow, TaskEnd, TaskStart
from .fileio import append_jsonl, atomic_write_json, finite
from .growth import GrowthEvent, apply_growth, plan_growth
from .importance import create_importance, task_importance
from .loading import Loaders, resolve_workers
from .masked import MaskedModel
from .masks import MASK_SPACES, MaskSpace
from .metrics import run_metrics
from .precision import Policy
from .pruning import PRUNING
from .pruning.host import LearnerHost
from .rundir import RunDir
from .structure import Structure, feature_count
from .subnet import TaskModel, measure, standalone
from .task import InputSpec, Task, check_task
from .training import (correctness, derive_seed, evaluate, make_loader, make_optimizer, tagged_concat, take_batches,
                       train_epoch)

__all__ = ["ContinualLearner", "Callback", "TaskModel"]

MAX_TASKS = 32766  # owner ids widen from uint8 to int16 past 254 tasks (anpyc.masks); 32767 means free


class Callback:
    """Hooks for progress display; every method is a no-op by default."""

    def on_event(self, event: Event) -> None:
        """Called for every logged event (:mod:`anpyc.events`: epoch, prune step, evaluation, task start/end)."""

    def on_batch(self, phase: str, batch: int, total: int, loss: float) -> None:
        """Called after every training batch."""


class ContinualLearner:
    """Learns a sequence of tasks on one backbone; each task keeps its own subnetwork, head and statistics."""

    def __init__(
        self,
        model: nn.Module | str,
        *,
        input_size: tuple[int, ...] | None = None,
        input_spec: InputSpec | None = None,
        out_dir: str | Path | None = None,
        config: LearnerConfig | None = None,
        method: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        weights: str | Path | None = None,
        callbacks: Iterable[Callback] = (),
    ):
        """``weights``: the trunk's initial values, ``"pretrained"`` (timm's weights for a model name) or the path
        of a safetensors file or torch checkpoint (:mod:`anpyc.weights`); recorded in run.json, kept in
        init.safetensors (a resumed run never needs the file again). Default: the backbone's own seeded init."""
        if config is None:
            config = method_config(method or "anpyc")
        elif method is not None and method != config.method:
            raise ConfigError(f"method {method!r} conflicts with config.method {config.method!r}",
                              "pass one of them")
        if input_spec is None:
            if input_size is None:
                raise ConfigError("no input size given", "pass input_size=(C, H, W) or input_spec=InputSpec(...)")
            shape = tuple(int(v) for v in input_size)
            input_spec = InputSpec(kind="image" if len(shape) == 3 else "vector", shape=shape)
        self._build(model, input_spec, config, model_kwargs, callbacks, record=None, layout=None, weights=weights)
        self.run: RunDir | None = checkpoint.create_run(out_dir, self) if out_dir is not None and self.ctx.is_main \
            else None
        self.out_dir = Path(out_dir) if out_dir is not None else None

    def _build(self, model: nn.Module | str, input_spec: InputSpec, config: LearnerConfig,
               model_kwargs: dict[str, Any] | None, callbacks: Iterable[Callback], *, record: dict | None,
               layout: list[dict] | None, weights: str | Path | None = None) -> None:
        """Everything but the run directory: the trunk (with its initial ``weights``), its units and masks, empty
        task state. ``record`` and ``layout`` (a run's backbone record and unit layout) rebuild a saved run
        exactly."""
        self.config = config
        self.callbacks = list(callbacks)
        check_device(config.device)
        self.ctx: DistContext = context(config.device)
        self.device = self.ctx.device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.input_spec = input_spec

        # ------------------------------------------------------------ backbone
        torch.manual_seed(derive_seed(config.seed, "init"))
        if record is None and isinstance(model, str) and not model_kwargs:  # a preset's own network (paper: 784-64-32)
            model_kwargs = BACKBONE_DEFAULTS.get(config.method, {}).get(model)
        trunk, self.backbone = build_trunk(model, input_spec, model_kwargs, record, weights)
        self.trunk = trunk = trunk.to(self.device).float()
        example = torch.randn((2, *input_spec.shape), generator=torch.Generator().manual_seed(0)).to(self.device)
        self._example = example
        self.num_features = feature_count(trunk, example)

        # ------------------------------------------------------------ units and masks
        self.space: MaskSpace = MASK_SPACES.get(config.prune.granularity).for_trunk(
            trunk, example, num_features=self.num_features, verify=config.verify_structure, seed=config.seed,
            model_name=self.backbone.get("name"), layout=layout)
        self.structure: Structure | None = self.space.structure
        self.policy = Policy(config.amp, config.channels_last, self.device)  # autocast and layout of the loops
        self.policy.layout(trunk, self.backbone.get("name"))
        # batch sources; the worker count is this process's business (a resumed run may use another one)
        self.loaders = Loaders(resolve_workers(config.workers), self.device)
        self._last_epoch = None
        self.base_layout = self.space.schema().get("groups")  # the units before any growth (what run.json records)
        self.growth: list[GrowthEvent] = []  # every widening so far, replayed when the run is reopened
        self.growth_values: dict[str, torch.Tensor] = {}  # their new entries, "<event>/<tensor>"
        self.model = MaskedModel(trunk, self.num_features, self.space.norm_modules()).to(self.device)
        self.model.feature_dropout = config.optim.dropout
        self.stat_names = [n for n, m in trunk.named_modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.init_stats = {f"{m}.{b}": getattr(trunk.get_submodule(m), b).detach().clone()
                           for m in self.stat_names for b in ("running_mean", "running_var", "num_batches_tracked")}
        self.init_params = {n: p.detach().clone() for n, p in trunk.named_parameters()}
        self.init_buffers = {n: t.detach().clone() for n, t in trunk.state_dict().items() if n not in self.init_params}

        # ------------------------------------------------------------ state
        self.tasks: list[dict] = []  # records in learned order: id, name, classes
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        self.omega: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.tracker = create_importance(config.importance.measure)
        self.cursor: dict | None = None
        self.acc_test: list[list[float | None]] = []
        self.acc_val: list[list[float | None]] = []
        self.history: list[dict] = []
        self._data: dict[int, Task] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._optim_state: dict | None = None
        self._ddp = None

    # ================================================================================================ public API
    @property
    def backbone_name(self) -> str:
        return str(self.backbone.get("name"))

    def task_ids(self) -> list[int]:
        done = self.completed()
        return [r["id"] for r in self.tasks if r["id"] in done]

    def completed(self) -> set[int]:
        return {r["id"] for r in self.tasks if r.get("done")}

    def task_info(self, task: int) -> dict:
        r = self._record(task)
        return {"id": r["id"], "name": r["name"], "classes": list(r["classes"])}

    def learn(self, task: Task, *, final: bool = False) -> dict:
        """Train ``task``; a task already learned (e.g. after a resume) returns its record without training."""
        self._check_task(task)
        self._data[task.id] = task
        rec = next((r for r in self.tasks if r["id"] == task.id), None)
        if rec is not None and rec.get("done"):
            return rec
        if self.cursor is not None and self.cursor.get("task") not in (None, task.id) \
                and self.cursor.get("phase") != "done":
            raise RunDirError(f"the run stopped inside task {self.cursor['task']}, but task {task.id} was given",
                              "resume with the same task stream (same order)")
        t0 = time.time()
        if rec is None:
            self._begin_task(task, final)
        k = self._index(task.id)
        cur = self.cursor
        if cur["phase"] == "train":
            self._train_phase(task, k)
        if cur["phase"] == "prune":
            self._prune_phase(task, k)
        if cur["phase"] == "consolidate":
            self._finish_task(task, k, time.time() - t0)
        return self._record(task.id)

    def attach(self, tasks: Iterable[Task]) -> None:
        """Give a loaded run the data of tasks it learned (for evaluation or int8 calibration), without training."""
        for task in tasks:
            if any(r["id"] == task.id for r in self.tasks):
                self._check_task(task)
                self._data[task.id] = task

    def has_data(self, task: int) -> bool:
        """Whether the data of ``task`` is available (learned in this session, or attached)."""
        return task in self._data

    def calibration_inputs(self, task: int, n: int) -> torch.Tensor:
        """``n`` training inputs of ``task`` (a seeded sample), e.g. to calibrate a static int8 model."""
        self._index(task)
        data = self._data.get(task)
        if data is None:
            raise DataError(f"no data is attached for task {task}", "call attach(stream) with the run's task stream")
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(self.config.seed))[:n]
        return torch.stack([data.train[int(i)][0] for i in order])

    def fit(self, stream: Iterable[Task]) -> dict:
        """Learn every task of ``stream`` in order; returns :meth:`metrics`."""
        tasks = list(stream)
        for i, task in enumerate(tasks):
            self.learn(task, final=i == len(tasks) - 1)
        return self.metrics()

    def metrics(self) -> dict:
        """Accuracy matrices, ACC/BWT/forgetting, capacity and parameters/FLOPs per task (see METHOD.md section 5)."""
        return run_metrics(self.config.method, self.backbone_name, [self.task_info(r["id"]) for r in self.tasks
                                                                     if r.get("done")],
                           self.acc_test, self.acc_val, self.history, self.space.num_units)

    # ------------------------------------------------------------------ inference / export source
    @torch.no_grad()
    def reference_forward(self, task: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of task ``task``'s masked dense model (eval mode)."""
        k = self._index(task)
        self._use_task(k)
        self.model.eval()
        return self.model(x.to(self.device), k)

    def predict(self, task: int, x: torch.Tensor) -> torch.Tensor:
        return self.reference_forward(task, x)

    def evaluate(self, task: int, dataset: Dataset) -> float:
        """Top-1 accuracy of task ``task`` on ``dataset`` (NaN for an empty one)."""
        k = self._index(task)
        self._use_task(k)
        self.model.eval()
        return evaluate(self.policy.wrap(lambda x: self.model(x, k)), dataset, self.config.eval_batch_size,
                        self.device, self.loaders.feed)

    def mask_digest(self, task: int) -> str:
        return self.space.digest(self._mask_index(self._index(task)))

    def subnetwork(self, task: int) -> TaskModel:
        """Task ``task``'s standalone model: units outside its mask physically removed, its head and statistics
        loaded, no masks left inside (eval mode, on the CPU)."""
        k = self._index(task)
        return standalone(self.model, self.space, k, self._stats_of(k), mask=self._mask_index(k))

    def subnetwork_stats(self, task: int) -> dict:
        rec = next(h for h in self.history if h["id"] == task)
        return {"params": rec["params"], "flops": rec["flops"]}

    # ================================================================================================ task phases
    def _check_task(self, task: Task) -> None:
        known = next((r for r in self.tasks if r["id"] == getattr(task, "id", None)), None)
        check_task(task, self.input_spec, known)
        if known is None and len(self.tasks) >= MAX_TASKS - 1:
            raise ConfigError(f"a run holds at most {MAX_TASKS - 1} tasks", "start a new run")

    def _begin_task(self, task: Task, final: bool) -> None:
        k = len(self.tasks)
        # a task trains with an optimizer of its own (its head; growth replaces parameters), never the last task's
        self._optimizer, self._optim_state = None, None
        self.tasks.append({"id": task.id, "name": task.name, "classes": list(task.classes), "index": k,
                           "final": final, "done": False})
        self.space.make_room(k)
        plan = plan_growth(self, k)
        for e in apply_growth(self, k, task.id, plan, reason=f"fewer free units than grow.min_free = "
                                                               f"{self.config.grow.min_free} of the base width"):
            self._log(Grow(task=task.id, group=e.group, units=e.units, width=e.width, free=e.free, reason=e.reason))
        claimed = self.space.claim_free(k)
        if self.config.reinit_free and k > 0 and bool(claimed.any()):
            with torch.no_grad():
                for name, mask in self.space.touched(claimed).items():
                    p = dict(self.trunk.named_parameters()).get(name)
                    if p is not None:
                        p.copy_(torch.where(mask.to(p.device), self.init_params[name].to(p.device), p))
        torch.manual_seed(derive_seed(self.config.seed, "head", task.id))
        self.model.add_head(k, task.num_classes)
        prev = self.stats.get(k - 1)
        self.stats[k] = {n: v.clone() for n, v in (prev or self.init_stats).items()}
        self.anchor = {n: p.detach().clone() for n, p in self.trunk.named_parameters()}
        self.tracker.begin(self._params())
        self.cursor = {"task": task.id, "phase": "train", "epoch": 0, "prune": {}}
        self._log(TaskStart(task=task.id, name=task.name, index=k, claimed_units=int(claimed.sum())))

    def _strategy(self, task: Task):
        """The prune strategy of ``task`` (none for the final task unless ``prune.prune_final``)."""
        cfg = self.config.prune
        return PRUNING.get(cfg.mode if (cfg.prune_final or not self._record(task.id).get("final")) else "none")

    def _train_phase(self, task: Task, k: int) -> None:
        cfg = self.config.optim
        dense = getattr(self._strategy(task), "dense_epochs", None)  # a strategy that prunes inside the epochs
        epochs = cfg.epochs if dense is None else dense(self.config.prune, cfg.epochs)
        while self.cursor["epoch"] < epochs:
            epoch = self.cursor["epoch"]
            res = self._run_epoch(task, k, phase="train", step=0, epoch=epoch, cfg=cfg)
            self.cursor["epoch"] = epoch + 1
            last = self.cursor["epoch"] >= epochs
            self._log(Epoch(task=task.id, phase="train", epoch=epoch, loss=res.loss, train_acc=res.accuracy,
                            penalty=res.penalty))
            if last:
                self._optimizer = None
                self.cursor.update(phase="prune", prune={})
                self.cursor["a0"] = self._val_accuracy(task, k)
                self._log(Eval(task=task.id, phase="train_end", val_acc=self.cursor["a0"]))
                self.save()
            elif self.config.checkpoint_epochs:
                self.save(optimizer=True)

    def _prune_phase(self, task: Task, k: int) -> None:
        state = self._strategy(task)(LearnerHost(self, task, k), self.config.prune, self.cursor.get("prune") or {},
                                     task_index=k, a0=self.cursor["a0"])
        # the gradual strategy trained in the prune phase: its optimizer (and one a resume restored) ends here
        self._optimizer, self._optim_state = None, None
        self.cursor.update(phase="consolidate", prune=state)

    def _finish_task(self, task: Task, k: int, seconds: float) -> None:
        self._use_task(k)
        # consolidate: the task's importance joins the accumulated importance (for the rules that read it, so a
        # hard freeze spends no importance pass here); freed elements drop theirs
        if CONSOLIDATION.get(self.config.consolidation.rule).uses_omega:
            owned = {n: self.space.element_owner(n, tuple(p.shape)) != self.space.free
                     for n, p in self.trunk.named_parameters()}
            self.omega = accumulate_omega(self.omega, self._element_importance(task, k), owned,
                                          self.config.importance.accumulate)
        # evaluate every task learned so far
        row_test, row_val = [], []
        for j in range(k + 1):
            data = self._data.get(self.tasks[j]["id"])
            row_test.append(self._eval(j, data.test if data is not None else None))
            row_val.append(self._eval(j, data.val if data is not None else None))
        self.acc_test.append(row_test)
        self.acc_val.append(row_val)
        stats = measure(self.model, self.space, k, self._stats_of(k), self._example)
        prune = self.cursor.get("prune") or {}
        rec = {
            "id": task.id, "index": k, "capacity": self.space.capacity(),
            "capacity_params": self._capacity_params(), "owned_units": int((self.space.owners == k).sum()),
            **stats, "prune": {"released": prune.get("released", 0), "claim": prune.get("claim", 0),
                               "steps": len(prune.get("steps", [])), "a0": self.cursor.get("a0")},
            "seconds": seconds,
        }
        self.history.append(rec)
        self._record(task.id)["done"] = True
        self.cursor = {"task": task.id, "phase": "done"}
        self._log(TaskEnd(task=task.id, acc_row=row_test, capacity=rec["capacity"], params=rec["params"],
                          flops=rec["flops"]))
        self.save()
        self._write_metrics()

    # ================================================================================================ internals
    def _index(self, task_id: int) -> int:
        for r in self.tasks:
            if r["id"] == task_id:
                return r["index"]
        known = [r["id"] for r in self.tasks]
        raise DataError(f"unknown task {task_id}", f"valid task ids: {known}" if known else "learn a task first")

    def _record(self, task_id: int) -> dict:
        return self.tasks[self._index(task_id)]

    def _params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.trunk.named_parameters() if p.requires_grad}

    def _use_task(self, k: int) -> None:
        """Masks, statistics of task index ``k`` (its subnetwork: units owned by tasks 0..k)."""
        active = self.space.active(self._mask_index(k))
        dev = self.device
        self.model.set_masks({n: m.to(dev) for n, m in self.space.tensor_masks(active).items()},
                             {n: m.to(dev) for n, m in self.space.norm_masks(active).items()},
                             None if (fm := self.space.feature_mask(active)) is None else fm.to(dev))
        self.model.use_stats(self._stats_of(k))

    def _mask_index(self, k: int) -> int:
        """The task index whose mask task index ``k`` runs with: its own, or under ``inference = "shared"`` (the
        paper mode) the newest task's, the whole network as it is now."""
        return max(k, len(self.tasks) - 1) if self.config.inference == "shared" else k

    def _stats_of(self, k: int) -> dict[str, torch.Tensor]:
        """The BatchNorm statistics task index ``k`` runs with. Under hard consolidation a task's parameters never
        change after it, so the statistics it ended with stay exact for it. Methods that keep changing shared
        parameters (fine-tuning, joint training, EWC/MAS/SI, the soft rules) run every task with the latest
        statistics, the ones that belong to the current weights: an earlier task's own statistics were measured on
        older weights and would add a drop of their own (joint training, the upper bound, lost up to 19 points)."""
        if self.config.consolidation.rule != "hard" and self.stats:
            k = max(self.stats)
        return self.stats.get(k, {})

    def _old_masks(self, k: int) -> dict[str, torch.Tensor]:
        return {n: (self.space.element_owner(n, tuple(p.shape)) < k).to(p.device)
                for n, p in self._params().items()}

    def _forward_train(self, k: int) -> Callable:
        """The training forward: through DDP under torchrun; per-sample heads when replaying all tasks."""
        model = self._ddp if self._ddp is not None else self.model
        if self.config.replay == "all":
            return lambda x, batch: model(x, batch[2].to(self.device))
        return lambda x, batch: model(x, k)

    def _train_dataset(self, task: Task, k: int) -> Dataset:
        if self.config.replay == "all":
            parts = [(j, self._data[r["id"]].train) for j, r in enumerate(self.tasks[: k + 1]) if r["id"] in self._data]
            if len(parts) != k + 1:
                raise DataError("joint training needs the data of every earlier task",
                                "call learn() for every task of the stream in order (learned ones are skipped)")
            return tagged_concat(parts)
        return task.train

    def _run_epoch(self, task: Task, k: int, *, phase: str, step: int, epoch: int, cfg,
                   extra: Consolidation | None = None) -> Any:
        """One epoch of task index ``k`` under its consolidation rule (plus ``extra``, e.g. a prune step's pull)."""
        self._use_task(k)
        params = self._params()
        if self._optimizer is None:
            head_params = list(self.model.heads[str(k)].parameters())
            if self.config.replay == "all":
                head_params = [p for j in range(k + 1) for p in self.model.heads[str(j)].parameters()]
            self._optimizer = make_optimizer(list(params.values()) + head_params, cfg)
            self._ddp = wrap_ddp(self.model, self.ctx, self.device)
            if self._optim_state is not None:
                self._optimizer.load_state_dict(self._optim_state)
                self._optim_state = None
        cons = create_consolidation(self.config.consolidation if k > 0 else
                                    type(self.config.consolidation)(rule="none"))
        old = self._old_masks(k)
        cons.begin(params, self.omega, self.anchor, old)
        if extra is not None:
            cons = Stack([cons, extra])
        decay = {n: (~m).float() for n, m in old.items()}
        seed = derive_seed(self.config.seed, task.id, phase, step, epoch)
        torch.manual_seed(seed)
        self.policy.layout(self.trunk)  # a growth may have added weights in the default layout
        loader = self.loaders.feed(make_loader(self._train_dataset(task, k), cfg.batch_size, shuffle=True, seed=seed,
                                               ctx=self.ctx))
        self.model.train()
        ddp_forward = self._forward_train(k)
        total = len(loader)
        res = train_epoch(
            ddp_forward, loader, self._optimizer, params, cons, self.tracker, cfg, decay_mask=decay, device=self.device,
            on_batch=(lambda b, loss: [c.on_batch(phase, b, total, loss) for c in self.callbacks]) if self.callbacks
            else None, policy=self.policy,
        )
        self._last_epoch = res  # its timing goes into the Epoch event logged for it (_log)
        for v in self.stats.get(k, {}).values():  # each rank saw its own shard: average the statistics
            if v.is_floating_point():
                self.ctx.all_reduce_mean_(v)
        return res

    def _eval(self, k: int, dataset: Dataset | None) -> float | None:
        if dataset is None or len(dataset) == 0:
            return None
        self._use_task(k)
        self.model.eval()
        return evaluate(self.policy.wrap(lambda x: self.model(x, k)), dataset, self.config.eval_batch_size,
                        self.device, self.loaders.feed)

    def _correct(self, k: int, dataset: Dataset) -> torch.Tensor:
        """Per-sample correctness of task index ``k``'s subnetwork on ``dataset`` (eval mode)."""
        self._use_task(k)
        self.model.eval()
        return correctness(self.policy.wrap(lambda x: self.model(x, k)), dataset, self.config.eval_batch_size,
                           self.device, self.loaders.feed)

    @torch.no_grad()
    def _recalibrate(self, task: Task, k: int) -> None:
        """Re-estimate the BatchNorm statistics task index ``k`` runs with on ``prune.calibration_batches`` training
        batches (a cumulative average: after a prune step the old ones describe another network)."""
        stats, n = self._stats_of(k), self.config.prune.calibration_batches
        if not stats or n == 0:
            return
        modules = [self.trunk.get_submodule(m) for m in self.stat_names]
        momenta = [m.momentum for m in modules]
        for name, v in stats.items():
            v.copy_(torch.ones_like(v) if name.endswith("running_var") else torch.zeros_like(v))
        self._use_task(k)
        self.model.train()
        try:
            for m in modules:
                m.momentum = None  # cumulative average over the calibration batches
            seed = derive_seed(self.config.seed, task.id, "calibrate", len(self.history))
            for x, _ in take_batches(task.train, self.config.optim.batch_size, n, seed, self.device, self.ctx,
                                     self.loaders.feed):
                with self.policy.autocast():
                    self.model(self.policy.inputs(x), k)
        finally:
            for m, mom in zip(modules, momenta):
                m.momentum = mom
            self.model.eval()
        for v in stats.values():
            if v.is_floating_point():
                self.ctx.all_reduce_mean_(v)

    def _val_accuracy(self, task: Task, k: int) -> float:
        ds = task.val if task.val is not None and len(task.val) > 0 else task.train
        return float(self._eval(k, ds))

    def _element_importance(self, task: Task, k: int) -> dict[str, torch.Tensor]:
        """Element scores of the trunk on task ``k`` (its subnetwork, eval mode), averaged across ranks."""
        self._use_task(k)
        self.model.eval()
        seed = derive_seed(self.config.seed, task.id, "importance", len(self.history))
        return task_importance(self.tracker, self.policy.wrap(lambda x: self.model(x, k)), self._params(), task.train,
                               self.config.importance, seed, self.device, self.ctx, self.loaders.feed)

    def _capacity_params(self) -> float:
        cost = self.space.unit_cost().double()
        total = float(cost.sum())
        return float(cost[self.space.owners != self.space.free].sum()) / total if total else 0.0

    # ------------------------------------------------------------------ events
    def _log(self, event: Event) -> None:
        if isinstance(event, Epoch) and event.seconds is None and self._last_epoch is not None:
            res, self._last_epoch = self._last_epoch, None  # the epoch just run: how long it waited for batches
            event = dataclasses.replace(event, seconds=round(res.seconds, 4), data_wait=round(res.data_wait, 4),
                                        data_wait_share=round(res.data_wait / res.seconds, 4) if res.seconds else 0.0)
        event = dataclasses.replace(event, time=round(time.time(), 3))
        if self.run is not None:
            append_jsonl(self.run.path / "events.jsonl", event.to_dict())
        for c in self.callbacks:
            c.on_event(event)

    def _write_metrics(self) -> None:
        if self.run is not None:
            atomic_write_json(self.run.path / "metrics.json", finite(self.metrics()))

    # ================================================================================================ persistence
    def save(self, *, optimizer: bool = False) -> None:
        """Commit the full state as a new generation (rank 0 only)."""
        if self.run is not None:
            self.run.commit(lambda d: checkpoint.write_generation(d, self, optimizer=optimizer),
                            checkpoint.manifest(self))

    @classmethod
    def resume(cls, out_dir: str | Path, model: nn.Module | None = None, *, callbacks: Iterable[Callback] = ()
               ) -> "ContinualLearner":
        """Reopen a run directory and continue where it stopped with the configuration it recorded (the same
        task stream must be passed again; learned tasks are skipped)."""
        return checkpoint.open_run(cls, out_dir, model, callbacks=callbacks, lock=True)

    @classmethod
    def load(cls, out_dir: str | Path, model: nn.Module | None = None) -> "ContinualLearner":
        """Open a run read-only (evaluation, export, inspection)."""
        return checkpoint.open_run(cls, out_dir, model, callbacks=(), lock=False)

    def close(self) -> None:
        """Stop the loader workers; release the run directory's lock (also done when the learner is
        garbage-collected)."""
        self.loaders.close()
        if self.run is not None:
            self.run.close()

    def __enter__(self) -> "ContinualLearner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
