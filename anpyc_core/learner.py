"""The continual learner: owns the loop (train -> guarded prune/retrain -> consolidate -> evaluate -> save).

Usage::

    learner = anpyc.ContinualLearner(model, input_size=(3, 32, 32), out_dir="runs/demo")
    for task in stream:
        learner.learn(task)
    print(learner.metrics())
    learner = anpyc.ContinualLearner.resume("runs/demo")   # continues where it stopped

The learner knows nothing about any particular architecture: the structure walk gives it units, the mask space
gives it ownership, the registries give it importance, consolidation and pruning strategies.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset

from . import __version__
from .backbones import as_trunk, backbone_record, create_backbone, custom_record, name_from_record
from .config import LearnerConfig, from_dict, method_config, to_dict
from .consolidation import ACCUMULATE, create_consolidation
from .dist import DistContext, check_device, context
from .errors import ConfigError, DataError, ModelError, RunDirError, StateFileError, TrainingDiverged
from .flops import count_flops
from .importance import create_importance
from .io import append_jsonl, atomic_write_json, load_tensors, read_json, save_tensors
from .masked import MaskedModel
from .masks import FREE, ElementSpace, MaskSpace, UnitSpace, load_masks, save_masks
from .metrics import continual_metrics
from .pruning import PRUNING
from .rundir import RUN_FORMAT, RUN_VERSION, RunDir
from .structure import Structure, feature_count, kept_positions, slice_trunk, walk
from .task import InputSpec, Task
from .training import derive_seed, evaluate, make_loader, make_optimizer, take_batches, train_epoch

__all__ = ["ContinualLearner", "Callback", "TaskModel"]

MAX_TASKS = FREE  # owner ids are uint8; 255 means free
PHASES = ("train", "prune", "consolidate", "done")  # where a task stands (state.json's cursor)


class Callback:
    """Hooks for progress display; every method is a no-op by default."""

    def on_event(self, event: dict) -> None:
        """Called for every logged event (epoch, prune step, evaluation, task start/end)."""

    def on_batch(self, phase: str, batch: int, total: int, loss: float) -> None:
        """Called after every training batch."""


class TaskModel(nn.Module):
    """A standalone task model: the physically pruned trunk followed by the task's head."""

    def __init__(self, trunk: nn.Module, head: nn.Linear):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _joint_dataset(datasets: list[tuple[int, Dataset]]) -> Dataset:
    class _Tagged(Dataset):
        def __init__(self, ds: Dataset, k: int):
            self.ds, self.k = ds, k

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            x, y = self.ds[i][:2]
            return x, y, self.k

    return ConcatDataset([_Tagged(ds, k) for k, ds in datasets])


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
        callbacks: Iterable[Callback] = (),
        _resume: dict | None = None,
    ):
        if config is None:
            config = method_config(method or "anpyc")
        elif method is not None and method != config.method:
            raise ConfigError(f"method {method!r} conflicts with config.method {config.method!r}",
                              "pass one of them")
        self.config = config
        self.callbacks = list(callbacks)
        check_device(config.device)
        self.ctx: DistContext = context(config.device)
        self.device = self.ctx.device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        if input_spec is None:
            if input_size is None:
                raise ConfigError("no input size given", "pass input_size=(C, H, W) or input_spec=InputSpec(...)")
            shape = tuple(int(v) for v in input_size)
            input_spec = InputSpec(kind="image" if len(shape) == 3 else "vector", shape=shape)
        self.input_spec = input_spec

        # ------------------------------------------------------------ backbone
        model_kwargs = dict(model_kwargs or {})
        torch.manual_seed(derive_seed(config.seed, "init"))
        if isinstance(model, str):
            trunk = create_backbone(model, input_spec=input_spec, **model_kwargs)
            self.backbone = backbone_record(model, model_kwargs)
        elif isinstance(model, nn.Module):
            trunk = model
            self.backbone = dict((_resume or {}).get("backbone") or custom_record(model))
        else:
            raise ModelError(f"model must be an nn.Module or a model name, got {type(model).__name__}",
                             "pass e.g. timm.create_model(name, num_classes=0) or a name like 'resnet18'")
        trunk = as_trunk(trunk).to(self.device).float()
        self.trunk = trunk
        example = torch.randn((2, *input_spec.shape), generator=torch.Generator().manual_seed(0)).to(self.device)
        self._example = example
        self.num_features = feature_count(trunk, example)

        # ------------------------------------------------------------ units and masks
        pnames = {n for n, p in trunk.named_parameters() if p.requires_grad}
        shapes = {n: tuple(t.shape) for n, t in list(trunk.named_parameters()) + list(trunk.named_buffers())}
        self.structure: Structure | None = None
        if config.prune.granularity == "element":
            self.space: MaskSpace = ElementSpace({n: s for n, s in shapes.items() if n in pnames})
            norm_modules: list[str] = []
        elif config.prune.granularity == "unit":
            layout = (_resume or {}).get("layout")
            self.structure = walk(trunk, example, num_features=self.num_features, verify=config.verify_structure,
                                  seed=config.seed, model_name=self.backbone.get("name"), layout=layout)
            self.space = UnitSpace(self.structure, pnames)
            norm_modules = list(self.structure.norm_units)
        else:
            raise ConfigError(f"unknown granularity {config.prune.granularity!r}", "choose unit or element")
        self.model = MaskedModel(trunk, self.num_features, norm_modules).to(self.device)
        self.model.feature_dropout = config.optim.dropout
        self.stat_names = [n for n, m in trunk.named_modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.init_stats = {f"{m}.{b}": getattr(trunk.get_submodule(m), b).detach().clone()
                           for m in self.stat_names for b in ("running_mean", "running_var", "num_batches_tracked")}
        self.init_params = {n: p.detach().clone() for n, p in trunk.named_parameters()}

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

        # ------------------------------------------------------------ run directory
        self.run: RunDir | None = None
        if out_dir is not None and self.ctx.is_main:
            if _resume is None:
                run = RunDir(out_dir, create=True)
                if run.exists():
                    run.close()
                    raise RunDirError(f"{out_dir} already holds a run", "resume it (--resume) or choose a new --out")
                self.run = run
                atomic_write_json(run.path / "config.json", to_dict(config))
                save_tensors(run.path / "init.safetensors", self.init_params, fmt="anpyc.init", version=1,
                             schema={"what": "trunk parameters at initialisation (re-initialises freed units)"})
                self._write_manifest_only()
            else:
                self.run = _resume["run"]
        elif out_dir is not None:
            self.run = None
        self.out_dir = Path(out_dir) if out_dir is not None else None

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
        m = continual_metrics([row for row in self.acc_test]) if self.acc_test else {}
        return {
            "method": self.config.method,
            "backbone": self.backbone_name,
            "tasks": [self.task_info(r["id"]) for r in self.tasks if r.get("done")],
            "accuracy_matrix": self.acc_test,
            "val_accuracy_matrix": self.acc_val,
            **m,
            "capacity": [h["capacity"] for h in self.history],
            "capacity_params": [h["capacity_params"] for h in self.history],
            "owned_units": [h["owned_units"] for h in self.history],
            "task_params": [h["params"] for h in self.history],
            "task_flops": [h["flops"] for h in self.history],
            "dense_params": self.history[-1]["dense_params"] if self.history else None,
            "dense_flops": self.history[-1]["dense_flops"] if self.history else None,
            "prune": [h["prune"] for h in self.history],
            "seconds": [h["seconds"] for h in self.history],
            "num_units": self.space.num_units,
        }

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
        k = self._index(task)
        self._use_task(k)
        self.model.eval()
        return evaluate(lambda x: self.model(x, k), dataset, self.config.eval_batch_size, self.device)

    def mask_digest(self, task: int) -> str:
        return self.space.digest(self._index(task))

    def subnetwork(self, task: int) -> TaskModel:
        """Task ``task``'s standalone model: units outside its mask physically removed, its head and statistics
        loaded, no masks left inside (eval mode, on the CPU)."""
        k = self._index(task)
        trunk = self.model.strip_hooks(copy.deepcopy(self.trunk)).cpu().eval()
        with torch.no_grad():
            for name, value in self._stats_of(k).items():
                mod, _, buf = name.rpartition(".")
                getattr(trunk.get_submodule(mod), buf).copy_(value.cpu())
        head = copy.deepcopy(self.model.heads[str(k)]).cpu()
        active = self.space.active(k)
        if isinstance(self.space, UnitSpace):
            trunk = slice_trunk(trunk, self.structure, active, inplace=True)
            keep = kept_positions(self.structure.feature_unit_ids, active)
            new_head = nn.Linear(len(keep), head.out_features)
            with torch.no_grad():
                new_head.weight.copy_(head.weight[:, keep])
                new_head.bias.copy_(head.bias)
            head = new_head
        else:
            masks = self.space.tensor_masks(active)
            with torch.no_grad():
                for name, p in trunk.named_parameters():
                    if name in masks:
                        p.mul_(masks[name].cpu())
        return TaskModel(trunk, head).eval()

    def subnetwork_stats(self, task: int) -> dict:
        rec = next(h for h in self.history if h["id"] == task)
        return {"params": rec["params"], "flops": rec["flops"]}

    # ================================================================================================ task phases
    def _check_task(self, task: Task) -> None:
        if not isinstance(task, Task):
            raise DataError(f"expected an anpyc Task, got {type(task).__name__}", "build tasks with anpyc.Task(...)")
        if task.train is None or len(task.train) == 0:
            raise DataError(f"task {task.id} ({task.name}) has no training samples", "give every task training data")
        if task.num_classes < 1:
            raise DataError(f"task {task.id} has no classes", "give every task at least one class")
        x, y = task.train[0][:2]
        if tuple(x.shape) != tuple(self.input_spec.shape):
            raise DataError(f"task {task.id} inputs have shape {tuple(x.shape)}, the model expects "
                            f"{tuple(self.input_spec.shape)}", "use the same input size for every task")
        known = next((r for r in self.tasks if r["id"] == task.id), None)
        if known is not None and list(known["classes"]) != list(task.classes):
            raise DataError(f"task {task.id} has {len(task.classes)} classes now but {len(known['classes'])} when it "
                            f"was trained ({known['classes'][:5]}...)", "resume with the same data and class folders")
        if known is None and len(self.tasks) >= MAX_TASKS - 1:
            raise ConfigError(f"a run holds at most {MAX_TASKS - 1} tasks", "start a new run")
        for split in (task.val, task.test):
            if split is not None and len(split) > 0:
                xs = split[0][0]
                if tuple(xs.shape) != tuple(self.input_spec.shape):
                    raise DataError(f"task {task.id} val/test inputs have shape {tuple(xs.shape)}",
                                    "use the same input size for every split")

    def _begin_task(self, task: Task, final: bool) -> None:
        k = len(self.tasks)
        self.tasks.append({"id": task.id, "name": task.name, "classes": list(task.classes), "index": k,
                           "final": final, "done": False})
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
        self._log({"event": "task_start", "task": task.id, "name": task.name, "index": k,
                   "claimed_units": int(claimed.sum())})

    def _train_phase(self, task: Task, k: int) -> None:
        cfg = self.config.optim
        while self.cursor["epoch"] < cfg.epochs:
            epoch = self.cursor["epoch"]
            res = self._run_epoch(task, k, phase="train", step=0, epoch=epoch, cfg=cfg)
            self.cursor["epoch"] = epoch + 1
            last = self.cursor["epoch"] >= cfg.epochs
            self._log({"event": "epoch", "task": task.id, "phase": "train", "epoch": epoch, "loss": res.loss,
                       "train_acc": res.accuracy, "penalty": res.penalty})
            if last:
                self._optimizer = None
                self.cursor.update(phase="prune", prune={})
                self.cursor["a0"] = self._val_accuracy(task, k)
                self._log({"event": "eval", "task": task.id, "phase": "train_end", "val_acc": self.cursor["a0"]})
                self.save()
            elif self.config.checkpoint_epochs:
                self.save(optimizer=True)

    def _prune_phase(self, task: Task, k: int) -> None:
        cfg = self.config.prune
        mode = cfg.mode if (cfg.prune_final or not self._record(task.id).get("final")) else "none"
        strategy = PRUNING.get(mode)
        host = _Host(self, task, k)
        state = strategy(host, cfg, self.cursor.get("prune") or {}, task_index=k, a0=self.cursor["a0"])
        self.cursor.update(phase="consolidate", prune=state)

    def _finish_task(self, task: Task, k: int, seconds: float) -> None:
        self._use_task(k)
        # consolidate: the task's importance joins the accumulated importance; freed elements drop theirs
        scores = self._element_importance(task, k)
        acc = ACCUMULATE.get(self.config.importance.accumulate)
        owned = {n: self.space.element_owner(n, tuple(p.shape)) for n, p in self.trunk.named_parameters()}
        for n, s in scores.items():
            s = s * (owned[n] != FREE).to(s.device)
            prev = self.omega.get(n)
            self.omega[n] = s if prev is None else acc(prev, s)
        for n in list(self.omega):
            self.omega[n] = self.omega[n] * (owned[n] != FREE).to(self.omega[n].device)
        # evaluate every task learned so far
        row_test, row_val = [], []
        for j in range(k + 1):
            data = self._data.get(self.tasks[j]["id"])
            row_test.append(self._eval(j, data.test if data is not None else None))
            row_val.append(self._eval(j, data.val if data is not None else None))
        pad = [None] * 0
        self.acc_test.append(row_test + pad)
        self.acc_val.append(row_val + pad)
        stats = self._subnetwork_numbers(k)
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
        self._log({"event": "task_end", "task": task.id, "acc_row": row_test, "capacity": rec["capacity"],
                   "params": rec["params"], "flops": rec["flops"]})
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
        active = self.space.active(k)
        dev = self.device
        self.model.set_masks({n: m.to(dev) for n, m in self.space.tensor_masks(active).items()},
                             {n: m.to(dev) for n, m in self.space.norm_masks(active).items()},
                             None if (fm := self.space.feature_mask(active)) is None else fm.to(dev))
        self.model.use_stats(self._stats_of(k))

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
            return _joint_dataset(parts)
        return task.train

    def _run_epoch(self, task: Task, k: int, *, phase: str, step: int, epoch: int, cfg) -> Any:
        self._use_task(k)
        params = self._params()
        if self._optimizer is None:
            head_params = list(self.model.heads[str(k)].parameters())
            if self.config.replay == "all":
                head_params = [p for j in range(k + 1) for p in self.model.heads[str(j)].parameters()]
            self._optimizer = make_optimizer(list(params.values()) + head_params, cfg)
            self._ddp = self._wrap_ddp()
            if self._optim_state is not None:
                self._optimizer.load_state_dict(self._optim_state)
                self._optim_state = None
        cons = create_consolidation(self.config.consolidation if k > 0 else
                                    type(self.config.consolidation)(rule="none"))
        old = self._old_masks(k)
        cons.begin(params, self.omega, self.anchor, old)
        decay = {n: (~m).float() for n, m in old.items()}
        seed = derive_seed(self.config.seed, task.id, phase, step, epoch)
        torch.manual_seed(seed)
        loader = make_loader(self._train_dataset(task, k), cfg.batch_size, shuffle=True, seed=seed, ctx=self.ctx)
        self.model.train()
        ddp_forward = self._forward_train(k)
        total = len(loader)
        res = train_epoch(
            ddp_forward, loader, self._optimizer, params, cons, self.tracker, cfg, decay_mask=decay, device=self.device,
            on_batch=(lambda b, loss: [c.on_batch(phase, b, total, loss) for c in self.callbacks]) if self.callbacks
            else None,
        )
        self._sync_stats(k)
        return res

    def _wrap_ddp(self):
        """DistributedDataParallel over the masked model under torchrun (None in a single process)."""
        if not self.ctx.enabled:
            return None
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True,
                                       broadcast_buffers=False)

    def _sync_stats(self, k: int) -> None:
        """Per-task running statistics are averaged across ranks after every epoch (each saw its own shard)."""
        if self.ctx.enabled:
            for v in self.stats.get(k, {}).values():
                if v.is_floating_point():
                    self.ctx.all_reduce_mean_(v)

    def _eval(self, k: int, dataset: Dataset | None) -> float | None:
        if dataset is None or len(dataset) == 0:
            return None
        self._use_task(k)
        self.model.eval()
        return evaluate(lambda x: self.model(x, k), dataset, self.config.eval_batch_size, self.device)

    def _val_accuracy(self, task: Task, k: int) -> float:
        ds = task.val if task.val is not None and len(task.val) > 0 else task.train
        return float(self._eval(k, ds))

    def _element_importance(self, task: Task, k: int) -> dict[str, torch.Tensor]:
        """Element scores of the trunk on task ``k`` (its subnetwork, eval mode), averaged across ranks."""
        cfg = self.config.importance
        self._use_task(k)
        self.model.eval()
        params = self._params()
        batches = take_batches(task.train, cfg.batch_size, cfg.max_batches,
                               derive_seed(self.config.seed, task.id, "importance", len(self.history)), self.device,
                               self.ctx)
        scores = self.tracker.compute(lambda x: self.model(x, k), params, batches)
        for s in scores.values():
            self.ctx.all_reduce_mean_(s)
        return scores

    def _capacity_params(self) -> float:
        cost = self.space.unit_cost().double()
        total = float(cost.sum())
        return float(cost[self.space.owners != FREE].sum()) / total if total else 0.0

    def _subnetwork_numbers(self, k: int) -> dict:
        example = self._example[:1].cpu()
        dense = TaskModel(self.model.strip_hooks(copy.deepcopy(self.trunk)).cpu().eval(),
                          copy.deepcopy(self.model.heads[str(k)]).cpu())
        dense_params = sum(p.numel() for p in dense.parameters())
        dense_flops = count_flops(dense, example)
        if isinstance(self.space, UnitSpace):
            sub = self.subnetwork(self.tasks[k]["id"])
            params = sum(p.numel() for p in sub.parameters())
            flops = count_flops(sub, example)
        else:
            active = self.space.active(k)
            masks = self.space.tensor_masks(active)
            params = sum(int(masks[n].expand(p.shape).sum()) if n in masks else p.numel()
                         for n, p in dense.trunk.named_parameters())
            params += sum(p.numel() for p in dense.head.parameters())
            flops = dense_flops  # unstructured masks do not remove computation
        return {"params": int(params), "flops": int(flops), "dense_params": int(dense_params),
                "dense_flops": int(dense_flops)}

    # ------------------------------------------------------------------ events
    def _log(self, event: dict) -> None:
        event = {"time": round(time.time(), 3), **event}
        if self.run is not None:
            append_jsonl(self.run.path / "events.jsonl", event)
        for c in self.callbacks:
            c.on_event(event)

    def _write_metrics(self) -> None:
        if self.run is not None:
            atomic_write_json(self.run.path / "metrics.json", _finite(self.metrics()))

    # ================================================================================================ persistence
    def _manifest(self) -> dict:
        return {
            "anpyc_version": __version__,
            "config": to_dict(self.config),
            "backbone": self.backbone,
            "input_spec": self.input_spec.to_dict(),
            "granularity": self.space.granularity,
            "layout": self.space.schema().get("groups"),
            "fingerprint": self.space.layout_key(),
            "tasks": [dict(r) for r in self.tasks],
        }

    def _write_manifest_only(self) -> None:
        doc = self._manifest()
        doc.update({"format": RUN_FORMAT, "version": RUN_VERSION, "generation": None, "files": {}})
        atomic_write_json(self.run.path / "run.json", doc)

    def save(self, *, optimizer: bool = False) -> None:
        """Commit the full state as a new generation (rank 0 only)."""
        if self.run is None:
            return
        for n, p in self.trunk.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise TrainingDiverged(f"parameter {n} is not finite; the last good state is kept",
                                       "lower the learning rate (--lr) and start again or resume")
        trunk_tensors = {n: p.detach() for n, p in self.trunk.named_parameters()}
        stat_keys = set(self.init_stats)
        trunk_tensors.update({n: b.detach() for n, b in self.trunk.named_buffers() if n not in stat_keys})
        heads = {f"head/{k}/{n}": p.detach() for k, h in self.model.heads.items() for n, p in h.state_dict().items()}
        stats = {f"stats/{k}/{n}": v for k, d in self.stats.items() for n, v in d.items()}
        cons = {f"omega/{n}": v for n, v in self.omega.items()}
        cons.update({f"anchor/{n}": v for n, v in self.anchor.items()})
        cons.update({f"tracker/{n}": v for n, v in self.tracker.state().items()})
        state = {
            "cursor": self.cursor, "tasks": self.tasks, "acc_test": self.acc_test, "acc_val": self.acc_val,
            "history": self.history,
        }
        opt = self._optimizer.state_dict() if (optimizer and self._optimizer is not None) else None
        tasks = [r["index"] for r in self.tasks]

        def write(d: Path) -> None:
            save_tensors(d / "trunk.safetensors", trunk_tensors, fmt="anpyc.trunk", version=1,
                         schema={"backbone": self.backbone})
            save_masks(d / "masks.safetensors", self.space, tasks=tasks)
            save_tensors(d / "heads.safetensors", heads, fmt="anpyc.heads", version=1,
                         schema={"tasks": {str(r["index"]): r["id"] for r in self.tasks}})
            save_tensors(d / "stats.safetensors", stats, fmt="anpyc.stats", version=1)
            save_tensors(d / "consolidation.safetensors", cons, fmt="anpyc.consolidation", version=1,
                         schema={"measure": self.config.importance.measure, "rule": self.config.consolidation.rule})
            if opt is not None:
                flat, meta = _flatten_optimizer(opt)
                save_tensors(d / "optimizer.safetensors", flat, fmt="anpyc.optimizer", version=1, schema=meta)
            atomic_write_json(d / "state.json", _finite(state))

        self.run.commit(write, self._manifest())

    @classmethod
    def resume(cls, out_dir: str | Path, model: nn.Module | None = None, *, callbacks: Iterable[Callback] = ()
               ) -> "ContinualLearner":
        """Reopen a run directory and continue where it stopped with the configuration it recorded (the same
        task stream must be passed again; learned tasks are skipped)."""
        return cls._open(out_dir, model, callbacks=callbacks, lock=True)

    def close(self) -> None:
        """Release the run directory's lock (also done when the learner is garbage-collected)."""
        if self.run is not None:
            self.run.close()

    def __enter__(self) -> "ContinualLearner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def load(cls, out_dir: str | Path, model: nn.Module | None = None) -> "ContinualLearner":
        """Open a run read-only (evaluation, export, inspection)."""
        return cls._open(out_dir, model, callbacks=(), lock=False)

    @classmethod
    def _open(cls, out_dir, model, *, callbacks, lock: bool) -> "ContinualLearner":
        manifest = RunDir(out_dir, lock=False).manifest()
        try:
            config = from_dict(LearnerConfig, manifest["config"])
            spec = InputSpec.from_dict(manifest["input_spec"])
            backbone = manifest["backbone"]
        except (KeyError, TypeError) as e:
            raise RunDirError(f"run manifest in {out_dir} is incomplete ({e})", "re-create the run") from None
        # everything the files choose is checked before the run directory is touched (locked, cleaned)
        named = name_from_record(backbone, f"run {out_dir}")
        if model is None:
            if named is None:
                raise ModelError(f"run {out_dir} was trained on a custom module ({backbone.get('class')})",
                                 "pass the same module: ContinualLearner.resume(dir, model=...)")
            model, kwargs = named
        else:
            kwargs = None
        lock = lock and context(config.device).is_main  # under torchrun only rank 0 writes (and locks) the run
        run = RunDir(out_dir, create=lock, lock=lock)
        learner = cls(model, input_spec=spec, out_dir=out_dir if lock else None, config=config,
                      model_kwargs=kwargs, callbacks=callbacks,
                      _resume={"run": run if lock else None, "backbone": backbone, "layout": manifest.get("layout")})
        learner.out_dir = Path(out_dir)
        if manifest.get("fingerprint") != learner.space.layout_key():
            raise StateFileError(f"run {out_dir} was trained with another unit layout",
                                 "resume with the same backbone and input size")
        init = Path(out_dir) / "init.safetensors"
        if init.exists():
            tensors, _ = load_tensors(init, fmt="anpyc.init")
            learner.init_params = {n: t.to(learner.device) for n, t in tensors.items()}
        if manifest.get("generation") is not None:
            learner._load_state(run.state_dir())
        if not lock:
            run.close()
        return learner

    def _load_state(self, d: Path) -> None:
        tensors, _ = load_tensors(d / "trunk.safetensors", fmt="anpyc.trunk")
        own = dict(self.trunk.named_parameters())
        own.update(self.trunk.named_buffers())
        missing = [n for n in own if n not in tensors and n not in self.init_stats]
        if missing:
            raise StateFileError(f"trunk state in {d} lacks {missing[:3]}", "resume with the same backbone")
        with torch.no_grad():
            for n, t in tensors.items():
                if n not in own or tuple(own[n].shape) != tuple(t.shape):
                    raise StateFileError(f"trunk state in {d} has tensor {n} of shape {tuple(t.shape)} that this "
                                         f"backbone does not have", "resume with the same backbone and input size")
                own[n].copy_(t.to(own[n].device))
        load_masks(d / "masks.safetensors", self.space)
        state = read_json(d / "state.json", what="run state")
        phase = (state.get("cursor") or {}).get("phase") if isinstance(state, dict) else None
        if phase not in PHASES:
            raise StateFileError(f"run state in {d} has cursor phase {str(phase)[:40]!r}, not one of {list(PHASES)}",
                                 "restore the run or re-train")
        self.cursor, self.tasks = state["cursor"], state["tasks"]
        self.acc_test, self.acc_val, self.history = state["acc_test"], state["acc_val"], state["history"]
        heads, _ = load_tensors(d / "heads.safetensors", fmt="anpyc.heads")
        for r in self.tasks:
            k = str(r["index"])
            w = heads.get(f"head/{k}/weight")
            if w is None:
                raise StateFileError(f"heads file in {d} has no head for task {r['id']}", "restore the run")
            head = self.model.add_head(r["index"], w.shape[0])
            head.load_state_dict({"weight": w, "bias": heads[f"head/{k}/bias"]})
        stats, _ = load_tensors(d / "stats.safetensors", fmt="anpyc.stats")
        self.stats = {}
        for key, v in stats.items():
            _, k, name = key.split("/", 2)
            self.stats.setdefault(int(k), {})[name] = v.to(self.device)
        cons, _ = load_tensors(d / "consolidation.safetensors", fmt="anpyc.consolidation")
        self.omega = {k[6:]: v.to(self.device) for k, v in cons.items() if k.startswith("omega/")}
        self.anchor = {k[7:]: v.to(self.device) for k, v in cons.items() if k.startswith("anchor/")}
        self.tracker.load_state({k[8:]: v for k, v in cons.items() if k.startswith("tracker/")})
        if (d / "optimizer.safetensors").exists():
            flat, meta = load_tensors(d / "optimizer.safetensors", fmt="anpyc.optimizer")
            self._optim_state = _unflatten_optimizer(flat, meta.get("schema") or {}, self.device)


# ================================================================================================ helpers

class _Host:
    """The learner as seen by a pruning strategy (see :class:`anpyc.pruning.PruneHost`)."""

    def __init__(self, learner: ContinualLearner, task: Task, k: int):
        self.l, self.task, self.k = learner, task, k

    def unit_scores(self) -> torch.Tensor:
        return self.l.space.unit_scores({n: s.cpu() for n, s in self.l._element_importance(self.task, self.k).items()})

    def claim(self) -> torch.Tensor:
        return self.l.space.owners == self.k

    def releasable(self, order: torch.Tensor, count: int) -> torch.Tensor:
        space = self.l.space
        if not isinstance(space, UnitSpace) or count <= 0:
            return order[:max(count, 0)]
        active = space.active(self.k)
        left = torch.zeros(len(space.structure.groups), dtype=torch.long)
        left.index_add_(0, space.structure.unit_group, active.long())
        minimum = self.l.config.prune.min_units_per_group
        picked = []
        for u in order.tolist():
            g = int(space.structure.unit_group[u])
            if left[g] > minimum:
                left[g] -= 1
                picked.append(u)
                if len(picked) >= count:
                    break
        return torch.tensor(picked, dtype=torch.long)

    def release(self, units: torch.Tensor) -> None:
        if units.numel() == 0:
            return
        mask = torch.zeros(self.l.space.num_units, dtype=torch.bool)
        mask[units] = True
        self.l.space.release(mask)
        if isinstance(self.l.space, ElementSpace):  # the original zeroes released weights
            with torch.no_grad():
                params = self.l._params()
                for name, m in self.l.space.touched(mask).items():
                    params[name].masked_fill_(m.to(params[name].device), 0.0)

    def retrain(self, step: int) -> None:
        cfg = self.l.config.optim
        epochs = self.l.config.prune.retrain_epochs
        self.l._optimizer = None
        for epoch in range(epochs):
            res = self.l._run_epoch(self.task, self.k, phase="retrain", step=step, epoch=epoch, cfg=cfg)
            self.l._log({"event": "epoch", "task": self.task.id, "phase": "retrain", "step": step, "epoch": epoch,
                         "loss": res.loss, "train_acc": res.accuracy, "penalty": res.penalty})
        self.l._optimizer = None

    def val_accuracy(self) -> float:
        return self.l._val_accuracy(self.task, self.k)

    def val_size(self) -> int:
        ds = self.task.val if self.task.val is not None and len(self.task.val) > 0 else self.task.train
        return len(ds)

    def snapshot(self) -> object:
        l = self.l
        return (
            {n: t.detach().clone() for n, t in l.trunk.state_dict().items()},
            l.space.owners.clone(),
            copy.deepcopy(l.model.heads[str(self.k)].state_dict()),
            {n: v.clone() for n, v in l.stats[self.k].items()},
        )

    def restore(self, snap: object) -> None:
        trunk, owners, head, stats = snap
        l = self.l
        l.trunk.load_state_dict(trunk)
        l.space.owners = owners
        l.model.heads[str(self.k)].load_state_dict(head)
        for n, v in stats.items():
            l.stats[self.k][n].copy_(v)

    def checkpoint(self, state: dict) -> None:
        self.l.cursor["prune"] = state
        self.l.save()

    def log(self, event: dict) -> None:
        self.l._log({"task": self.task.id, **event})


def _finite(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    flat = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                flat[f"state/{idx}/{key}"] = v.detach().cpu()
            else:
                scalars[f"{idx}/{key}"] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return flat, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(flat: dict[str, torch.Tensor], meta: dict, device: torch.device) -> dict:
    state: dict[int, dict] = {}
    for key, v in flat.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = v if name == "step" else v.to(device)
    for key, v in (meta.get("scalars") or {}).items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta.get("param_groups", [])}
