"""A learner's state as files: what one committed generation of a run directory holds, written and read back.

:class:`anpyc.rundir.RunDir` makes a generation crash-safe (temporary folder, rename, manifest last); this module
says what is inside it (every file versioned, formats below) and what ``run.json`` records beside it::

    trunk.safetensors          trunk parameters and shared buffers                  anpyc.trunk
    masks.safetensors          unit owners (uint8, 255 = free) + the unit layout    anpyc.masks (anpyc.masks)
    heads.safetensors          head/<task index>/weight|bias                        anpyc.heads
    stats.safetensors          stats/<task index>/<buffer>: per-task BatchNorm      anpyc.stats
    consolidation.safetensors  omega/<param>, anchor/<param>, tracker/...           anpyc.consolidation
    optimizer.safetensors      optimizer state between epochs (optional)            anpyc.optimizer
    probes.safetensors         probe inputs, outputs/<task index> recorded at its end  anpyc.probes
    state.json                 cursor, task records, accuracy matrices, history

plus ``init.safetensors`` (``anpyc.init``) beside the generations: the trunk at initialisation (its parameters by
name, its persistent buffers as ``buffer/<name>``), the values loaded from ``weights`` when a run started from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.nn as nn

from . import __version__
from .backbones import RECORD_INFO, name_from_record
from .config import LearnerConfig, to_dict
from .configure import load_config
from .dist import context
from .errors import ConfigError, ModelError, RunDirError, StateFileError, TrainingDiverged, clip
from .fileio import atomic_write_json, finite, read_json
from .invariant import PROBES_FORMAT, Probes
from .maskfile import load_masks, save_masks, schema_tasks
from .masks import MaskSpace
from .rundir import RUN_FORMAT, RUN_VERSION, RunDir
from .runfiles import PHASES, check_state
from .runstate import InitialValues, RunState
from .structure.masked import MaskedModel
from .task import InputSpec
from .tensorio import load_tensors, save_tensors

if TYPE_CHECKING:  # the learner is only ever passed in
    from .learner import ContinualLearner

__all__ = ["manifest", "create_run", "write_manifest", "write_generation", "read_generation", "Generation",
           "write_init", "read_init", "restore_init", "open_run", "PHASES"]

INIT_FORMAT = "anpyc.init"
BUFFER = "buffer/"  # init.safetensors: buffers beside the parameters (parameter names never hold a "/")


def manifest(learner: "ContinualLearner") -> dict[str, Any]:
    """What ``run.json`` records beside the generation: enough to rebuild the learner before its tensors load."""
    return {
        "anpyc_version": __version__,
        "config": to_dict(learner.config),
        "backbone": learner.backbone,
        "input_spec": learner.input_spec.to_dict(),
        "granularity": learner.space.granularity,
        "layout": learner.base_layout,  # the units before any growth; "growth" replays the widenings
        "growth": [e.to_dict() for e in learner.state.growth],
        "fingerprint": learner.space.layout_key(),
        "tasks": [dict(r) for r in learner.state.tasks],
    }


def create_run(out_dir: str | Path, learner: "ContinualLearner") -> RunDir:
    """A new run directory for ``learner`` (locked): its config, initial parameters and a first manifest."""
    run = RunDir(out_dir, create=True)
    if run.exists():
        run.close()
        raise RunDirError(f"{out_dir} already holds a run", "resume it (--resume) or choose a new --out")
    atomic_write_json(run.path / "config.json", to_dict(learner.config))
    write_init(run.path / "init.safetensors", learner.state.init.params, learner.state.init.buffers)
    write_manifest(run.path / "run.json", learner)
    return run


def write_manifest(path: Path, learner: "ContinualLearner") -> None:
    """``run.json`` of a run with no committed generation yet (it is rewritten by every commit)."""
    doc = manifest(learner)
    doc.update({"format": RUN_FORMAT, "version": RUN_VERSION, "generation": None, "files": {}})
    atomic_write_json(path, doc)


def write_init(path: Path, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> None:
    tensors = {**params, **{f"{BUFFER}{n}": b for n, b in buffers.items()}}
    save_tensors(path, tensors, fmt=INIT_FORMAT, version=1,
                 schema={"what": "trunk parameters at initialisation (re-initialises freed units); "
                                 f"{BUFFER}<name>: its buffers (BatchNorm statistics, ...)"})


def read_init(path: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """The parameters and buffers in ``init.safetensors`` (runs written before buffers were kept have none)."""
    if not path.exists():
        return None
    tensors, _ = load_tensors(path, fmt=INIT_FORMAT)
    params = {n: t.to(device) for n, t in tensors.items() if not n.startswith(BUFFER)}
    return params, {n[len(BUFFER):]: t.to(device) for n, t in tensors.items() if n.startswith(BUFFER)}


def restore_init(trunk: nn.Module, init: InitialValues, params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], where: str) -> InitialValues:
    """Put a run's initial values into ``trunk`` (a run with no committed generation restarts from them: the trunk a
    name builds is only the same when the run did not start from loaded weights); returns the initial values the
    run keeps (``init`` describes the freshly built trunk: which of its buffers are BatchNorm statistics)."""
    own = dict(trunk.named_parameters())
    own.update(trunk.named_buffers())
    for n, t in {**params, **buffers}.items():
        if n not in own or tuple(own[n].shape) != tuple(t.shape):
            raise StateFileError(f"init.safetensors of run {where} has tensor {n} of shape "
                                 f"{tuple(t.shape)} that this backbone does not have",
                                 "resume with the same backbone and input size")
    with torch.no_grad():
        for n, t in {**params, **buffers}.items():
            own[n].copy_(t)
    return InitialValues({n: p.detach().clone() for n, p in trunk.named_parameters()},
                         {n: own[n].detach().clone() for n in init.stats},
                         {n: b.detach().clone() for n, b in trunk.named_buffers() if n in buffers})


def write_generation(d: Path, state: RunState, *, trunk: nn.Module, model: MaskedModel, space: MaskSpace,
                     config: LearnerConfig, backbone: dict, importance: dict[str, torch.Tensor],
                     optimizer: dict | None = None) -> None:
    """Write every file of one generation into the folder ``d``: the run's ``state`` as a whole, the ``trunk``'s
    tensors, the heads of ``model``, the owners of ``space``, the importance measure's own tensors and the optimizer
    state of a task still training (``optimizer``)."""
    for n, p in trunk.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise TrainingDiverged(f"parameter {n} is not finite; the last good state is kept",
                                   "lower the learning rate (--lr) and start again or resume")
    tensors = {n: p.detach() for n, p in trunk.named_parameters()}
    stat_keys = set(state.init.stats)
    tensors.update({n: b.detach() for n, b in trunk.named_buffers() if n not in stat_keys})
    heads = {f"head/{k}/{n}": p.detach() for k, h in model.heads.items() for n, p in h.state_dict().items()}
    stats = {f"stats/{k}/{n}": v for k, s in state.stats.items() for n, v in s.items()}
    cons = {f"omega/{n}": v for n, v in state.omega.items()}
    cons.update({f"anchor/{n}": v for n, v in state.anchor.items()})
    cons.update({f"tracker/{n}": v for n, v in importance.items()})  # the measure's own state
    by_index = {str(r["index"]): r["id"] for r in state.tasks}

    save_tensors(d / "trunk.safetensors", tensors, fmt="anpyc.trunk", version=1, schema={"backbone": backbone})
    save_masks(d / "masks.safetensors", space, tasks=[r["index"] for r in state.tasks])
    save_tensors(d / "heads.safetensors", heads, fmt="anpyc.heads", version=1, schema={"tasks": by_index})
    save_tensors(d / "stats.safetensors", stats, fmt="anpyc.stats", version=1)
    save_tensors(d / "consolidation.safetensors", cons, fmt="anpyc.consolidation", version=1,
                 schema={"measure": config.importance.measure, "rule": config.consolidation.rule})
    if state.growth_values:
        save_tensors(d / "growth.safetensors", state.growth_values, fmt="anpyc.growth", version=1,
                     schema={"events": [e.to_dict() for e in state.growth],
                             "what": "new entries of every tensor each widening added, '<event>/<tensor>'"})
    save_tensors(d / "probes.safetensors", state.probes.tensors(), fmt=PROBES_FORMAT, version=1,
                 schema={"tasks": by_index, **state.probes.schema(),
                         "what": "inputs: the probe batch; outputs/<task index>: the task's outputs when it ended; "
                                 "digest: of every finished task's weights (anpyc.invariant checks later states)"})
    if optimizer is not None:
        flat, meta = flatten_optimizer(optimizer)
        save_tensors(d / "optimizer.safetensors", flat, fmt="anpyc.optimizer", version=1, schema=meta)
    atomic_write_json(d / "state.json", finite(state.progress()))


@dataclass(frozen=True)
class Generation:
    """What a committed generation holds beside the tensors loaded into the trunk, the heads and the owners."""

    state: RunState
    importance: dict[str, torch.Tensor]  # the importance measure's own tensors
    optimizer: dict | None  # the state of a task's optimizer saved mid-phase


def read_generation(d: Path, base: RunState, *, trunk: nn.Module, model: MaskedModel, space: MaskSpace,
                    device: torch.device, input_spec: InputSpec) -> Generation:
    """Read the generation in folder ``d``: its trunk tensors into ``trunk``, its owners into ``space``, its heads
    into ``model`` (all built for the same backbone and layout, every tensor checked), and the run's state as a
    whole: ``base`` (the initial values and the growth the run was rebuilt with) with the progress, statistics,
    importance, anchors and probes of ``d``."""
    tensors, _ = load_tensors(d / "trunk.safetensors", fmt="anpyc.trunk")
    own = dict(trunk.named_parameters())
    own.update(trunk.named_buffers())
    missing = [n for n in own if n not in tensors and n not in base.init.stats]
    if missing:
        raise StateFileError(f"trunk state in {d} lacks {missing[:3]}", "resume with the same backbone")
    with torch.no_grad():
        for n, t in tensors.items():
            if n not in own or tuple(own[n].shape) != tuple(t.shape):
                raise StateFileError(f"trunk state in {d} has tensor {n} of shape {tuple(t.shape)} that this "
                                     f"backbone does not have", "resume with the same backbone and input size")
            own[n].copy_(t.to(own[n].device))
    progress = check_state(read_json(d / "state.json", what="run state"), f"run state {d / 'state.json'}")
    _, schema = load_masks(d / "masks.safetensors", space)
    if len(schema_tasks(schema)) != len(progress["tasks"]):
        raise StateFileError(f"mask file in {d} records {len(schema_tasks(schema))} task(s), the run state "
                             f"{len(progress['tasks'])}", "restore the run directory from a backup, or re-train")
    tasks = progress["tasks"]
    heads, _ = load_tensors(d / "heads.safetensors", fmt="anpyc.heads")
    stats_file, _ = load_tensors(d / "stats.safetensors", fmt="anpyc.stats")
    try:  # tensors of the wrong name, shape or dtype for this run: one line, not a loader's traceback
        for r in tasks:
            k = str(r["index"])
            w, b = heads.get(f"head/{k}/weight"), heads.get(f"head/{k}/bias")
            if w is None or b is None or w.ndim != 2 or tuple(b.shape) != (len(r["classes"]),):
                raise StateFileError(f"heads file in {d} has no head of {len(r['classes'])} classes for task "
                                     f"{r['id']}", "restore the run")
            head = model.add_head(r["index"], w.shape[0])
            head.load_state_dict({"weight": w, "bias": b})
        stats: dict[int, dict[str, torch.Tensor]] = {r["index"]: {} for r in tasks}  # no BatchNorm: empty ones
        for key, v in stats_file.items():
            _, k, name = key.split("/", 2)
            stats.setdefault(int(k), {})[name] = v.to(device)
    except (KeyError, ValueError, RuntimeError) as e:
        raise StateFileError(f"heads or statistics in {d} do not fit this run ({type(e).__name__}: {clip(e, 80)})",
                             "restore the run directory from a backup, or re-train") from None
    cons, _ = load_tensors(d / "consolidation.safetensors", fmt="anpyc.consolidation")
    probes = base.probes
    if (d / "probes.safetensors").exists():  # runs written before the run-time check have none
        saved, meta = load_tensors(d / "probes.safetensors", fmt=PROBES_FORMAT)
        probes = Probes.from_tensors(saved, tuple(input_spec.shape), str(d / "probes.safetensors"),
                                     meta.get("schema"))
    optimizer = None
    if (d / "optimizer.safetensors").exists():
        flat, meta = load_tensors(d / "optimizer.safetensors", fmt="anpyc.optimizer")
        optimizer = unflatten_optimizer(flat, meta.get("schema") or {}, device)
    state = dataclasses.replace(
        base, tasks=tasks, cursor=progress["cursor"], acc_test=progress["acc_test"], acc_val=progress["acc_val"],
        history=progress["history"], stats=stats, probes=probes,
        omega={k[6:]: v.to(device) for k, v in cons.items() if k.startswith("omega/")},
        anchor={k[7:]: v.to(device) for k, v in cons.items() if k.startswith("anchor/")})
    return Generation(state, {k[8:]: v for k, v in cons.items() if k.startswith("tracker/")}, optimizer)


def open_run(cls: type["ContinualLearner"], out_dir: str | Path, model: Any, *, callbacks: Iterable, lock: bool
             ) -> "ContinualLearner":
    """A learner rebuilt from run directory ``out_dir`` (locked for writing when ``lock``): the backbone from its
    record (a name; a custom module only from ``model``), the units from the saved layout, then the committed
    generation. Everything the files choose is checked before the directory is touched (locked, cleaned)."""
    manifest = RunDir(out_dir, lock=False).manifest()  # every field checked (anpyc.runfiles)
    where = f"run manifest {Path(out_dir) / 'run.json'}"
    try:
        config = load_config(manifest["config"])
    except ConfigError as e:
        raise RunDirError(f"{where}: {e.problem}", e.fix or "restore run.json or re-create the run") from None
    spec = InputSpec.from_dict(manifest["input_spec"], where, error=RunDirError, fix="restore run.json")
    backbone = manifest["backbone"]
    named = name_from_record(backbone, f"run {out_dir}")
    if model is None:
        if named is None:
            raise ModelError(f"run {out_dir} was trained on a custom module ({backbone.get('class')})",
                             "pass the same module: ContinualLearner.resume(dir, model=...)")
        model, kwargs = named
        _dry_build(model, spec, kwargs, Path(out_dir), where)
    else:
        kwargs = None
    lock = lock and context(config.device).is_main  # under torchrun only rank 0 writes (and locks) the run
    run = RunDir(out_dir, create=lock, lock=lock)
    try:
        learner = cls(model, input_spec=spec, config=config, model_kwargs=kwargs, callbacks=callbacks,
                      backbone_record=backbone, layout=manifest.get("layout"))
    except BaseException:
        run.close()
        raise
    learner.bind_run(run if lock else None, out_dir)
    init = read_init(Path(out_dir) / "init.safetensors", learner.device)
    if init is not None:
        learner.adopt(dataclasses.replace(learner.state, init=restore_init(learner.trunk, learner.state.init, *init,
                                                                           str(out_dir))))
    _replay_growth(learner, manifest, run if manifest.get("generation") is not None else None, out_dir)
    if manifest.get("fingerprint") != learner.space.layout_key():
        raise StateFileError(f"run {out_dir} was trained with another unit layout",
                             "resume with the same backbone and input size")
    for key in RECORD_INFO:  # informational: kept in the record, never read or fetched
        if key in backbone and key not in learner.backbone:
            learner.backbone[key] = backbone[key]
    if manifest.get("generation") is not None:
        gen = read_generation(run.state_dir(), learner.state, trunk=learner.trunk, model=learner.model,
                              space=learner.space, device=learner.device, input_spec=learner.input_spec)
        learner.adopt(gen.state, importance=gen.importance, optimizer=gen.optimizer)
    if not lock:
        run.close()
    return learner


def _dry_build(name: str, spec: InputSpec, kwargs: dict, out_dir: Path, where: str) -> None:
    """Build the recorded backbone on the meta device (no memory) and compare its parameters with the ones
    init.safetensors holds: a record whose options do not build the run's trunk (``width=10**9`` would allocate
    100 GB, ``width="x"`` raise deep in a factory) is refused in one line before anything is allocated. A model
    that cannot be built on the meta device is left to the ordinary build."""
    import os
    import stat

    from safetensors import safe_open

    from .backbones import build_trunk

    fix = "restore run.json from a backup, or re-create the run"
    try:
        with torch.device("meta"):
            trunk, _ = build_trunk(name, spec, kwargs)
    except ModelError as e:
        raise RunDirError(f"{where}: {e.problem}", fix) from None
    except Exception as e:  # noqa: BLE001 - an error the real build would raise too, unless it is about meta
        if "meta" in str(e).lower() or isinstance(e, NotImplementedError):
            return  # a model that needs real tensors to build (an .item() in its constructor): build it for real
        raise RunDirError(f"{where}: backbone {clip(name, 40)} cannot be built with {clip(kwargs, 60)} "
                          f"({type(e).__name__}: {clip(e, 80)})", fix) from None
    init = out_dir / "init.safetensors"
    try:
        if not stat.S_ISREG(os.stat(init).st_mode):
            return  # read_init refuses it with its own message
        with safe_open(str(init), "pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith(BUFFER)}
    except Exception:  # noqa: BLE001 - missing (old runs) or corrupt: read_init reports a corrupt file
        return
    built = {n: tuple(p.shape) for n, p in trunk.named_parameters()}
    if built != saved:
        diff = sorted(set(built.items()) ^ set(saved.items()))[:1]
        raise RunDirError(f"{where}: backbone {clip(name, 40)} with {clip(kwargs, 60)} does not build the trunk "
                          f"init.safetensors holds (first difference: {clip(diff, 80)})", fix)


def _replay_growth(learner: "ContinualLearner", manifest: dict, run: RunDir | None, out_dir) -> None:
    """Widen the freshly built trunk as the run did (run.json's ``growth``, the new entries from the committed
    generation's growth.safetensors), before any of its tensors load."""
    events = manifest.get("growth") or []
    if not events:
        return
    if not isinstance(events, list) or run is None:
        raise StateFileError(f"run {out_dir} records growth but no committed state holds its values",
                             "restore the run directory")
    path = run.state_dir() / "growth.safetensors"
    values, _ = load_tensors(path, fmt="anpyc.growth")
    for e in events:
        try:
            k, task, group, units = int(e["index"]), int(e["task"]), str(e["group"]), int(e["units"])
            free, reason = int(e.get("free", 0)), str(e.get("reason", ""))
        except (KeyError, TypeError, ValueError):
            raise StateFileError(f"run {out_dir} has a malformed growth record ({clip(e, 80)})",
                                 "restore the run directory") from None
        try:
            learner.grow(k, task, {group: (units, free)}, values=values, reason=reason)
        except (StopIteration, ValueError) as err:
            raise StateFileError(f"run {out_dir} cannot replay its growth of {group!r} ({err})",
                                 "resume with the same backbone, input size and anpyc version") from None


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as tensors (``state/<param index>/<key>``) plus JSON (groups, scalar entries)."""
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


def unflatten_optimizer(flat: dict[str, torch.Tensor], meta: dict, device: torch.device) -> dict:
    state: dict[int, dict] = {}
    for key, v in flat.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = v if name == "step" else v.to(device)
    for key, v in (meta.get("scalars") or {}).items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta.get("param_groups", [])}
