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
:mod:`anpyc.subnet`, and what it does to one task index (masks in use, an epoch, evaluation, recalibration) is its
:class:`~anpyc.runner.TaskRunner` (``learner.runner``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from . import checkpoint
from .backbones import build_trunk
from .config import LearnerConfig
from .configure import check_choices, method_config
from .presets import BACKBONE_DEFAULTS
from .consolidation import CONSOLIDATION, accumulate_omega
from .dist import DistContext, check_device, context
from .errors import ConfigError, DataError, RunDirError
from .events import Callback, Epoch, Eval, Event, Grow, TaskEnd, TaskStart
from .fileio import append_jsonl, atomic_write_json, finite
from .growth import GrowthEvent, apply_growth, growth_verdict, plan_growth
from .importance import create_importance
from .invariant import Probes, check_tasks, promises_exactness
from .runstate import InitialValues, RunState
from .loading import Loaders, resolve_workers
from .structure.masked import MaskedModel
from .masks import MASK_SPACES, MaskSpace
from .metrics import run_metrics
from .precision import Policy
from .pruning import PRUNING, Strategy
from .pruning.host import LearnerHost
from .rundir import RunDir
from .structure import Structure, feature_count
from .subnet import TaskModel, measure, standalone
from .task import InputSpec, Task, check_task
from .runner import TaskRunner
from .training import derive_seed

__all__ = ["ContinualLearner", "Callback", "TaskModel"]

MAX_TASKS = 32766  # owner ids widen from uint8 to int16 past 254 tasks (anpyc.masks); 32767 means free


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
        backbone_record: dict | None = None,
        layout: list[dict] | None = None,
    ):
        """``weights``: the trunk's initial values, ``"pretrained"`` (timm's weights for a model name) or the path
        of a safetensors file or torch checkpoint (:mod:`anpyc.weights`); recorded in run.json, kept in
        init.safetensors (a resumed run never needs the file again). Default: the backbone's own seeded init.
        ``backbone_record`` and ``layout`` (a run's backbone record and unit layout, as run.json holds them) rebuild
        a saved run exactly: :meth:`resume` and :meth:`load` pass them."""
        if config is None:
            config = method_config(method or "anpyc")
        elif method is not None and method != config.method:
            raise ConfigError(f"method {method!r} conflicts with config.method {config.method!r}",
                              "pass one of them")
        check_choices(config)  # a config built by hand names only registered parts too
        if input_spec is None:
            if input_size is None:
                raise ConfigError("no input size given", "pass input_size=(C, H, W) or input_spec=InputSpec(...)")
            shape = tuple(int(v) for v in input_size)
            input_spec = InputSpec(kind="image" if len(shape) == 3 else "vector", shape=shape)
        record = backbone_record
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
        self.base_layout = self.space.schema().get("groups")  # the units before any growth (what run.json records)
        self.growth_verdicts: dict[str, str | None] = {}  # per group: why it cannot be widened (None: it can)
        self.model = MaskedModel(trunk, self.num_features, self.space.norm_modules(),
                                 weight_stats=self.space.removes_weights).to(self.device)
        self.model.feature_dropout = config.optim.dropout
        self.stat_names = [n for n, m in trunk.named_modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

        # ------------------------------------------------------------ state (what the checkpoint writes and reads)
        self.state = RunState(InitialValues.of(trunk, self.stat_names),
                              Probes.for_shape(tuple(input_spec.shape), derive_seed(config.seed, "probe")))
        self.importance = create_importance(config.importance.measure)  # the training task's measure
        self._data: dict[int, Task] = {}
        self.runner = TaskRunner(self)  # one task index at a time; owns the training task's optimizer
        self.run: RunDir | None = checkpoint.create_run(out_dir, self) if out_dir is not None and self.ctx.is_main \
            else None
        self.out_dir = Path(out_dir) if out_dir is not None else None

    # ================================================================================================ public API
    @property
    def backbone_name(self) -> str:
        return str(self.backbone.get("name"))

    def task_ids(self) -> list[int]:
        return [r["id"] for r in self.state.done()]

    def completed(self) -> set[int]:
        return set(self.task_ids())

    def task_info(self, task: int) -> dict:
        r = self._record(task)
        return {"id": r["id"], "name": r["name"], "classes": list(r["classes"])}

    def learn(self, task: Task, *, final: bool = False) -> dict:
        """Train ``task``; a task already learned (e.g. after a resume) returns its record without training."""
        self._check_task(task)
        self._data[task.id] = task
        rec, cur = self.state.record(task.id), self.state.cursor
        if rec is not None and rec.get("done"):
            return rec
        if cur is not None and cur.get("task") not in (None, task.id) and cur.get("phase") != "done":
            raise RunDirError(f"the run stopped inside task {cur['task']}, but task {task.id} was given",
                              "resume with the same task stream (same order)")
        t0 = time.time()
        if rec is None:
            self._begin_task(task, final)
        k = self._index(task.id)
        cur = self.state.cursor
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
            if self.state.record(task.id) is not None:
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
        """Accuracy matrices, ACC/BWT/forgetting, capacity and parameters/FLOPs per task (docs/method.md, section 8)."""
        st = self.state
        return run_metrics(self.config.method, self.backbone_name, [self.task_info(r["id"]) for r in st.done()],
                           st.acc_test, st.acc_val, st.history, self.space.num_units)

    # ------------------------------------------------------------------ inference / export source
    @torch.no_grad()
    def reference_forward(self, task: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of task ``task``'s masked dense model (eval mode)."""
        k = self._index(task)
        self.runner.use(k)
        self.model.eval()
        return self.model(x.to(self.device), k)

    def predict(self, task: int, x: torch.Tensor) -> torch.Tensor:
        return self.reference_forward(task, x)

    def evaluate(self, task: int, dataset: Dataset) -> float:
        """Top-1 accuracy of task ``task`` on ``dataset`` (NaN for an empty one)."""
        accuracy = self.runner.evaluate(self._index(task), dataset)
        return float("nan") if accuracy is None else accuracy

    def mask_digest(self, task: int) -> str:
        return self.space.digest(self.runner.mask_index(self._index(task)))

    def subnetwork(self, task: int) -> TaskModel:
        """Task ``task``'s standalone model: units outside its mask physically removed, its head and statistics
        loaded, no masks left inside (eval mode, on the CPU)."""
        k = self._index(task)
        return standalone(self.model, self.space, k, self.runner.stats_of(k), mask=self.runner.mask_index(k))

    def subnetwork_stats(self, task: int) -> dict:
        rec = next(h for h in self.state.history if h["id"] == task)
        return {"params": rec["params"], "flops": rec["flops"]}

    # ================================================================================================ task phases
    def _check_task(self, task: Task) -> None:
        known = self.state.record(getattr(task, "id", None))
        check_task(task, self.input_spec, known)
        if known is None and len(self.state.tasks) >= MAX_TASKS - 1:
            raise ConfigError(f"a run holds at most {MAX_TASKS - 1} tasks", "start a new run")

    def _begin_task(self, task: Task, final: bool) -> None:
        k = len(self.state.tasks)
        self.runner.end_optimizer()  # a task trains with an optimizer of its own, never the last task's
        self.state.tasks.append({"id": task.id, "name": task.name, "classes": list(task.classes), "index": k,
                                 "final": final, "done": False})
        self.space.make_room(k)
        plan = plan_growth(self.config.grow, self.space, lambda name: growth_verdict(
            self.growth_verdicts, self.trunk, self.space, name, self._example, self.config.seed))
        grown = self.grow(k, task.id, plan, reason=f"fewer free units than grow.min_free = "
                                                   f"{self.config.grow.min_free} of the base width")
        for e in grown:
            self.emit(Grow(task=task.id, group=e.group, units=e.units, width=e.width, free=e.free, reason=e.reason))
        if grown:
            self._check_earlier(f"the growth of {len(grown)} group(s) at the start of task {task.id} "
                                f"({', '.join(e.group for e in grown[:3])}{', ...' if len(grown) > 3 else ''})")
        claimed = self.space.claim_free(k)
        if self.config.reinit_free and k > 0 and bool(claimed.any()):
            with torch.no_grad():
                for name, mask in self.space.touched(claimed).items():
                    p = dict(self.trunk.named_parameters()).get(name)
                    if p is not None:
                        p.copy_(torch.where(mask.to(p.device), self.state.init.params[name].to(p.device), p))
            self._check_earlier(f"the re-initialisation of the units task {task.id} claimed")
        torch.manual_seed(derive_seed(self.config.seed, "head", task.id))
        self.model.add_head(k, task.num_classes)
        prev = self.state.stats.get(k - 1)
        self.state.stats[k] = {n: v.clone() for n, v in (prev or self.state.init.stats).items()}
        self.state.anchor = {n: p.detach().clone() for n, p in self.trunk.named_parameters()}
        self.importance.begin(self.runner.params())
        self.state.cursor = {"task": task.id, "phase": "train", "epoch": 0, "prune": {}}
        self.emit(TaskStart(task=task.id, name=task.name, index=k, claimed_units=int(claimed.sum())))

    def _strategy(self, task: Task) -> Strategy:
        """The prune strategy of ``task`` (none for the final task unless ``prune.prune_final``)."""
        cfg = self.config.prune
        return PRUNING.get(cfg.mode if (cfg.prune_final or not self._record(task.id).get("final")) else "none")

    def _train_phase(self, task: Task, k: int) -> None:
        cfg = self.config.optim
        epochs = self._strategy(task).dense_epochs(self.config.prune, cfg.epochs)  # the rest are the strategy's
        while self.state.cursor["epoch"] < epochs:
            epoch = self.state.cursor["epoch"]
            res = self.runner.run_epoch(task, k, phase="train", step=0, epoch=epoch, cfg=cfg)
            self.state.cursor["epoch"] = epoch + 1
            last = self.state.cursor["epoch"] >= epochs
            self.emit(Epoch(task=task.id, phase="train", epoch=epoch, loss=res.loss, train_acc=res.accuracy,
                            penalty=res.penalty))
            if last:
                self.runner.end_optimizer()
                self.state.cursor.update(phase="prune", prune={})
                # the running averages lag the weights of the last epochs (a few batches per epoch: a task that
                # trains at 100% can measure 50% with them): what the task scores is measured with its statistics
                # re-estimated, and so is the reference a strategy's guard compares with
                self.runner.recalibrate(task, k)
                self.state.cursor["a0"] = self.runner.val_accuracy(task, k)
                self.emit(Eval(task=task.id, phase="train_end", val_acc=self.state.cursor["a0"]))
                self.save()
            elif self.config.checkpoint_epochs:
                self.save(optimizer=True)

    def _prune_phase(self, task: Task, k: int) -> None:
        strategy, host = self._strategy(task), LearnerHost(self, task, k)
        prune = strategy.state(self.state.cursor.get("prune"), host, self.state.cursor["a0"])
        prune = strategy.run(host, host, self.config.prune, prune, task_index=k)
        # the gradual strategy trained in the prune phase: its optimizer (and one a resume restored) ends here
        self.runner.end_optimizer()
        self.state.cursor.update(phase="consolidate", prune=prune.to_dict())

    def _finish_task(self, task: Task, k: int, seconds: float) -> None:
        # the statistics the task keeps are measured on its final weights (a strategy that ended on retraining
        # epochs left running averages; the gradual strategy's are re-estimated already, and this gives the same)
        self.runner.recalibrate(task, k)
        drift = self._check_earlier(f"the training, pruning and recalibration of task {task.id}")
        self.runner.use(k)
        # consolidate: the task's importance joins the accumulated importance (for the rules that read it, so a
        # hard freeze spends no importance pass here); freed elements drop theirs
        if CONSOLIDATION.get(self.config.consolidation.rule).uses_omega:
            owned = {n: self.space.element_owner(n, tuple(p.shape)) != self.space.free
                     for n, p in self.trunk.named_parameters()}
            self.state.omega = accumulate_omega(self.state.omega, self.runner.importance(task, k), owned,
                                                self.config.importance.accumulate)
        # evaluate every task learned so far
        row_test, row_val = [], []
        for j in range(k + 1):
            data = self._data.get(self.state.tasks[j]["id"])
            row_test.append(self.runner.evaluate(j, data.test if data is not None else None))
            row_val.append(self.runner.evaluate(j, data.val if data is not None else None))
        self.state.acc_test.append(row_test)
        self.state.acc_val.append(row_val)
        stats = measure(self.model, self.space, k, self.runner.stats_of(k), self._example)
        prune = self.state.cursor.get("prune") or {}
        rec = {
            "id": task.id, "index": k, "capacity": self.space.capacity(),
            "capacity_params": self.space.capacity_params(), "owned_units": int((self.space.owners == k).sum()),
            **stats, "prune": {"released": prune.get("released", 0), "claim": prune.get("claim", 0),
                               "steps": len(prune.get("steps", [])), "a0": self.state.cursor.get("a0")},
            "seconds": seconds, "drift": {str(self.state.tasks[j]["id"]): d for j, d in drift.items()},
        }
        self.state.history.append(rec)
        self.state.probes.record(self, k, task.id, promises_exactness(self.config))
        self._record(task.id)["done"] = True
        self.state.cursor = {"task": task.id, "phase": "done"}
        self.emit(TaskEnd(task=task.id, acc_row=row_test, capacity=rec["capacity"], params=rec["params"],
                          flops=rec["flops"], drift=rec["drift"]))
        self.save()
        self._write_metrics()

    def _check_earlier(self, operation: str) -> dict[int, float]:
        """Every finished task against what it computed when it ended (anpyc.invariant; raises under a hard freeze)."""
        return check_tasks(self, self.state.probes, operation, exact=promises_exactness(self.config))

    # ================================================================================================ internals
    def _index(self, task_id: int) -> int:
        if (r := self.state.record(task_id)) is not None:
            return r["index"]
        known = [r["id"] for r in self.state.tasks]
        raise DataError(f"unknown task {task_id}", f"valid task ids: {known}" if known else "learn a task first")

    def _record(self, task_id: int) -> dict:
        return self.state.tasks[self._index(task_id)]

    def grow(self, k: int, task_id: int, plan: dict[str, tuple[int, int]], *,
             values: dict[str, torch.Tensor] | None = None, reason: str = "") -> list[GrowthEvent]:
        """Widen the groups of ``plan`` (:mod:`anpyc.growth`) at the start of task index ``k``; ``values`` replays a
        recorded growth."""
        self.space, events = apply_growth(self.state, self.trunk, self.space, self.model, k, task_id, plan,
                                          seed=self.config.seed, values=values, reason=reason)
        self.structure, self.num_features = self.space.structure, self.model.num_features
        return events

    def task_data(self, task_id: int) -> Task | None:
        """The data of task ``task_id`` when it was given in this session (learned or attached)."""
        return self._data.get(task_id)

    # ------------------------------------------------------------------ events
    def emit(self, event: Event) -> None:
        """Report ``event``: one line of the run's events.jsonl, and every callback."""
        if isinstance(event, Epoch) and event.seconds is None and (res := self.runner.take_last_epoch()) is not None:
            # the epoch just run: how long it waited for batches
            seconds, wait = round(res.seconds, 4), round(res.data_wait, 4)  # the share agrees with what is logged
            event = dataclasses.replace(event, seconds=seconds, data_wait=wait,
                                        data_wait_share=round(wait / seconds, 4) if seconds else 0.0)
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
            opt = self.runner.optimizer.state_dict() if optimizer and self.runner.optimizer is not None else None
            self.run.commit(lambda d: checkpoint.write_generation(
                d, self.state, trunk=self.trunk, model=self.model, space=self.space, config=self.config,
                backbone=self.backbone, importance=self.importance.state(), optimizer=opt), checkpoint.manifest(self))

    def bind_run(self, run: RunDir | None, out_dir: str | Path) -> None:
        """The run directory this learner was reopened from (``run``: locked for writing, or None to read only)."""
        self.run, self.out_dir = run, Path(out_dir)

    def adopt(self, state: RunState, *, importance: dict[str, torch.Tensor] | None = None,
              optimizer: dict | None = None) -> None:
        """Continue from ``state`` (a run's recorded state, :mod:`anpyc.checkpoint`); ``importance``: the measure's
        own tensors, ``optimizer``: the state of a task's optimizer saved mid-phase."""
        self.state = state
        if importance is not None:
            self.importance.load_state(importance)
        if optimizer is not None:
            self.runner.resume_optimizer(optimizer)

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
