"""Learn a stream of tasks on a backbone: a benchmark by name, your image folders, or a manifest.

Settings: method preset < --config FILE < --set KEY=VALUE < flags; kept in RUN/config.json and RUN/data.json.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from anpyc.presets import METHODS

from .._common import flatten, parse_assignments, read_config_file


# The registered method presets (``anpyc.presets.METHODS``, which imports no torch), as typer's choices.
Method = Enum("Method", {name.replace("-", "_"): name for name in METHODS.names()}, type=str)


# Each preset's one description is its registered help (anpyc_core/presets.py), shown here and by docstrings alike.
METHOD_HELP = "Method preset \\[default: anpyc]: " + "; ".join(f"{n}: {METHODS.describe(n)}" for n in METHODS.names())

# The mixed-precision modes (anpyc.precision.AMP), spelled out here so that --help imports no torch.
Amp = Enum("Amp", {name: name for name in ("none", "bf16", "fp16")}, type=str)

# Keys of a config file that are not LearnerConfig fields.
FILE_KEYS = ("model", "data", "tasks")

CONFIG_HELP = ("Config file (.toml, .yaml/.yml or .json): model (a name, or a table: name, pretrained = true or "
               "weights = FILE (relative to the config file), backbone keyword arguments), data (a benchmark/path, "
               "or a table: source + stream options), tasks, and any field of RUN/config.json (method, seed, "
               "\\[optim], \\[prune], ...).")
# Keys of the config file's model table that choose the initial weights, not backbone keyword arguments.
WEIGHT_KEYS = ("pretrained", "weights")


def _positive(value: Optional[int], flag: str) -> None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be >= 1, got {value}", param_hint=flag)


def _from_file(doc: dict[str, Any], base: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split a config file into (model part, data part, learner overrides)."""
    from anpyc.errors import ConfigError, clip

    model: dict[str, Any] = {}
    m = doc.get("model")
    if isinstance(m, str):
        model = {"name": m}
    elif isinstance(m, dict):
        model = {"name": m.get("name"), "kwargs": {k: v for k, v in m.items() if k not in ("name", *WEIGHT_KEYS)}}
        model["weights"] = _file_weights(m, base)
    elif m is not None:
        raise ConfigError(f"config key 'model' must be a name or a table, got {clip(repr(m), 40)}",
                          'write model = "resnet18"')
    if model.get("name") is not None and (not isinstance(model["name"], str) or not model["name"]):
        raise ConfigError(f"config key 'model.name' must be a model name, got {clip(repr(model['name']), 40)}",
                          'write model = {name = "resnet18"}')
    data: dict[str, Any] = {"base": base}
    d = doc.get("data")
    if isinstance(d, str):
        data["source"] = d
    elif isinstance(d, dict):
        data["source"] = d.get("source")
        data["options"] = {k: v for k, v in d.items() if k != "source"}
        if data["source"] is not None and (not isinstance(data["source"], str) or not data["source"]):
            raise ConfigError(f"config key 'data.source' must be a benchmark or a path, got "
                              f"{clip(repr(data['source']), 40)}", 'write source = "digits-split"')
    elif d is not None:
        raise ConfigError(f"config key 'data' must be a benchmark/path or a table, got {clip(repr(d), 40)}",
                          'write data = "digits-split" or [data] source = "path/to/images"')
    t = doc.get("tasks")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ConfigError(f"config key 'tasks' must be a positive integer, got {clip(repr(t), 40)}",
                              "write tasks = 3")
        data["tasks"] = t
    learner = {k: v for k, v in doc.items() if k not in FILE_KEYS}
    return model, data, learner


def _file_weights(table: dict[str, Any], base: Path) -> Optional[str | Path]:
    """The initial weights a config file's model table asks for: "pretrained", a file (relative to the config
    file's folder) or None."""
    from anpyc.errors import ConfigError

    pretrained, weights = table.get("pretrained", False), table.get("weights")
    if not isinstance(pretrained, bool):
        raise ConfigError(f"config key 'model.pretrained' must be true or false, got {pretrained!r}",
                          "write pretrained = true")
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise ConfigError(f"config key 'model.weights' must be the path of a weights file, got {weights!r}",
                          'write weights = "resnet18.safetensors"')
    if pretrained and weights:
        raise ConfigError("config keys 'model.pretrained' and 'model.weights' are both set",
                          "keep one: pretrained = true (timm's weights) or weights = FILE")
    if weights:
        path = Path(weights).expanduser()
        return path if path.is_absolute() else base / path
    return "pretrained" if pretrained else None


def command(
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, help="Run directory to create (or resume).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Backbone: any timm name, or mlp/cnn "
                                                 "(see `anpyc models`).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="A benchmark (e.g. digits-split, "
                                                "mnist5k-split), a folder root/<task>/train/<class>/<images>, or a "
                                                ".csv/.json manifest.")] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", "-c", exists=True, dir_okay=False,
                                                        help=CONFIG_HELP)] = None,
    method: Annotated[Optional[Method], typer.Option("--method", help=METHOD_HELP)] = None,
    tasks: Annotated[Optional[int], typer.Option("--tasks", help="Learn only the first N tasks of the stream.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Training epochs per task (optim.epochs).")] = None,
    img_size: Annotated[Optional[int], typer.Option("--img-size", help="Image side in pixels (image streams).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate (optim.lr).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Batch size (optim.batch_size).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of initialisation and training order.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1, mps.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads \\[default: torch's].")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Data-loading worker processes (torch "
                                                   "DataLoader); 0 = in the training process; data held in memory "
                                                   "always loads in-process. Same batches for any N "
                                                   "\\[default: cores - 1, at most 8].", show_default=False)] = None,
    amp: Annotated[Optional[Amp], typer.Option("--amp", help="Mixed precision: autocast to bf16 or fp16 (loss "
                                               "scaling), float32 master weights \\[default: none].",
                                               show_default=False)] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="NHWC memory "
                                                          "layout for convolutional backbones (faster kernels on "
                                                          "GPUs and recent CPUs) \\[default: off].",
                                                          show_default=False)] = None,
    settings: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key, dotted: "
                                                          "--set prune.tolerance=0.01 (repeatable).")] = None,
    data_opts: Annotated[Optional[list[str]], typer.Option("--data-opt", help="Stream option: --data-opt "
                                                           "val_fraction=0.2, augment=true, seed=1 (repeatable).")
                         ] = None,
    model_opts: Annotated[Optional[list[str]], typer.Option("--model-opt", help="Backbone keyword argument: "
                                                            "--model-opt drop_rate=0.1 (repeatable).")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="Start from timm's "
                                                       "pretrained weights of --model (downloaded once; hf-hub: "
                                                       "names too) \\[default: random init].",
                                                       show_default=False)] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", exists=True, dir_okay=False, help="Start from "
                                                    "the weights in FILE (.safetensors, or a torch checkpoint read "
                                                    "with weights_only=True); the classifier is ignored.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped (same data; "
                                         "learned tasks are skipped; --tasks may add more).")] = False,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bars \\[default: on a "
                                                     "terminal].", show_default=False)] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots to RUN/plots.")] = True,
    grow: Annotated[Optional[bool], typer.Option("--grow/--no-grow", help="Widen the backbone when its free units run "
                                                 "out (grow.enabled) \\[default: the method's].",
                                                 show_default=False)] = None,
    tensorboard: Annotated[Optional[Path], typer.Option(
        "--tensorboard", file_okay=False, help="Also log to TensorBoard event files in this folder (pip install "
        "\"anpyc\\[tensorboard]\"); watch with tensorboard --logdir DIR.")] = None,
) -> None:
    for value, flag in ((tasks, "--tasks"), (epochs, "--epochs"), (img_size, "--img-size"),
                        (batch_size, "--batch-size"), (threads, "--threads")):
        _positive(value, flag)
    if workers is not None and workers < 0:
        raise typer.BadParameter(f"must be >= 0, got {workers}", param_hint="--workers")
    if lr is not None and not lr > 0:
        raise typer.BadParameter(f"must be > 0, got {lr}", param_hint="--lr")
    if pretrained and weights is not None:
        raise typer.BadParameter("pass one of --pretrained (timm's weights) and --weights FILE, not both",
                                 param_hint="--weights")
    overrides = parse_assignments(settings, "--set")
    stream_opts = parse_assignments(data_opts, "--data-opt")
    kwargs = parse_assignments(model_opts, "--model-opt")
    if img_size is not None:
        stream_opts["img_size"] = img_size

    if resume:
        recipe = {"--config": config_file, "--method": method, "--epochs": epochs, "--lr": lr,
                  "--batch-size": batch_size, "--seed": seed, "--device": device, "--set": settings,
                  "--model-opt": model_opts, "--pretrained": pretrained, "--weights": weights,
                  "--grow/--no-grow": grow is not None, "--amp": amp,
                  "--channels-last/--no-channels-last": channels_last is not None}
        given = [flag for flag, v in recipe.items() if v]
        if given:
            raise typer.BadParameter(f"a resumed run keeps the configuration recorded in {out / 'config.json'}; "
                                     f"drop {', '.join(given)} (or train a new run in another --out)",
                                     param_hint="--resume")
        _resume(out, model=model, data=data, stream_opts=stream_opts, tasks=tasks, threads=threads,
                progress=progress, plots=plots, tensorboard=tensorboard, workers=workers)
        return

    if (out / "run.json").exists():
        from anpyc.errors import RunDirError

        raise RunDirError(f"{out} already holds a run", "continue it with --resume, or choose a new --out")
    file_model: dict[str, Any] = {}
    file_data: dict[str, Any] = {}
    learner_cfg: dict[str, Any] = {}
    if config_file is not None:
        file_model, file_data, learner_cfg = _from_file(read_config_file(config_file), config_file.parent)
    name = model or file_model.get("name")
    source = data or file_data.get("source")
    if not name:
        raise typer.BadParameter("which backbone? pass --model NAME (see `anpyc models`) or set model in --config",
                                 param_hint="--model")
    if not source:
        raise typer.BadParameter("which data? pass --data BENCHMARK|DIR (e.g. digits-split) or set data in --config",
                                 param_hint="--data")
    kwargs = {**(file_model.get("kwargs") or {}), **kwargs}
    init = file_model.get("weights")  # flags override the file: --weights, --pretrained, --no-pretrained
    if weights is not None:
        init = weights
    elif pretrained:
        init = "pretrained"
    elif pretrained is False and init == "pretrained":
        init = None
    stream_opts = {**(file_data.get("options") or {}), **stream_opts}
    n_tasks = tasks if tasks is not None else file_data.get("tasks")

    # preset < file < --set < named flags
    dotted = flatten(learner_cfg)
    dotted.update(overrides)
    preset = method.value if method is not None else dotted.get("method", "anpyc")
    dotted.pop("method", None)
    for key, value in (("optim.epochs", epochs), ("optim.lr", lr), ("optim.batch_size", batch_size),
                       ("seed", seed), ("device", device), ("threads", threads), ("grow.enabled", grow),
                       ("workers", workers), ("amp", amp.value if amp is not None else None),
                       ("channels_last", channels_last)):
        if value is not None:
            dotted[key] = value

    from anpyc.adapters.backbones import create_backbone, is_known
    from anpyc.configure import method_config
    from anpyc.errors import ConfigError

    from ..sources import resolve_source

    if not isinstance(preset, str):
        raise ConfigError(f"config key 'method' must be a string, got {preset!r}", 'write method = "anpyc"')
    config = method_config(preset, **dotted)  # ConfigError (exit 2) names an unknown key or a wrong type
    from anpyc.dist import check_device

    check_device(config.device)
    if not is_known(name):
        create_backbone(name)  # neither timm nor registered: raises ModelError naming close matches
    src = resolve_source(source, options=stream_opts, tasks=n_tasks, base=None if data else file_data.get("base"))
    stream = src.open()
    board = _board(tensorboard, config)  # a missing package fails here, before the run directory exists

    from anpyc.learner import ContinualLearner

    learner = ContinualLearner(name, input_spec=stream.input_spec, out_dir=out, config=config, model_kwargs=kwargs,
                               weights=init)
    _fit(learner, stream, src, out, progress=progress, plots=plots, board=board)


def _board(log_dir: Optional[Path], config):
    """The TensorBoard callback for ``--tensorboard DIR`` (None without the flag)."""
    if log_dir is None:
        return None
    from anpyc.adapters.tracking import TensorBoardLogger

    return TensorBoardLogger(log_dir, retrain_epochs=config.prune.retrain_epochs)


def _resume(out: Path, *, model: Optional[str], data: Optional[str], stream_opts: dict, tasks: Optional[int],
            threads: Optional[int], progress: Optional[bool], plots: bool, tensorboard: Optional[Path],
            workers: Optional[int] = None) -> None:
    from anpyc.errors import RunDirError

    from ..sources import read_source, resolve_source

    if not (out / "run.json").exists():
        raise RunDirError(f"there is no run to resume in {out}", "check --out, or start the run without --resume")
    recorded = read_source(out)
    if data is not None:
        src = resolve_source(data, options=stream_opts, tasks=tasks if tasks is not None else
                             (recorded.tasks if recorded else None))
    elif recorded is not None:
        src = recorded.replace(options={**recorded.options, **stream_opts},
                               tasks=tasks if tasks is not None else recorded.tasks)
    else:
        raise RunDirError(f"run {out} does not record its data (no data.json: it was not started by anpyc train)",
                          "pass --data BENCHMARK|DIR with the data it was trained on")
    from anpyc.learner import ContinualLearner

    learner = ContinualLearner.resume(out)
    try:
        if model is not None and model not in (learner.backbone_name, learner.backbone.get("hub")):
            raise typer.BadParameter(f"run {out} was trained on {learner.backbone_name!r}, not {model!r}; "
                                     "drop --model to resume it", param_hint="--model")
        stream = src.open(input_spec=learner.input_spec)
        board = _board(tensorboard, learner.config)
    except BaseException:
        learner.close()
        raise
    if threads is not None:  # the core keeps the recorded config; threads are a property of this process only
        import torch

        torch.set_num_threads(threads)
    if workers is not None:  # likewise the loader workers: the batches do not depend on their number
        learner.loaders.workers = workers
    _fit(learner, stream, src, out, progress=progress, plots=plots, board=board)


def _fit(learner, stream, src, out: Path, *, progress: Optional[bool], plots: bool, board=None) -> None:
    from rich.text import Text

    from .._common import console
    from ..plots import write_plots
    from ..progress import make_progress
    from ..report import print_summary
    from ..sources import write_source

    con = console()
    main = learner.ctx.is_main
    if main:
        write_source(out, src)
    done = len([t for t in stream if t.id in set(learner.task_ids())])
    cfg = learner.config
    bars = make_progress(con, live=con.is_terminal if progress is None else progress, num_tasks=len(stream),
                         epochs=cfg.optim.epochs, retrain_epochs=cfg.prune.retrain_epochs, done=done)
    if main:
        con.print(Text.assemble(("anpyc train", "bold"), f": {learner.backbone_name} / {cfg.method} on "
                                f"{src.describe()} -> {out}"))
        if done:
            con.print(f"resuming: {done} of {len(stream)} tasks already learned", highlight=False)
        elif learner.backbone.get("weights") and learner.state.cursor is None:
            from anpyc.weights import describe_weights

            con.print(describe_weights(learner.backbone["weights"]), highlight=False, markup=False, soft_wrap=True)
        learner.callbacks.append(bars)
        if board is not None:
            learner.callbacks.append(board)
            con.print(f"TensorBoard: tensorboard --logdir {board.log_dir}", highlight=False, markup=False)
    try:
        with learner, bars:  # the run's lock is released now, not whenever the learner is garbage-collected
            metrics = learner.fit(stream)
    finally:
        if board is not None:
            board.close()
    if not main:
        return
    con.print()
    print_summary(con, metrics)
    if plots:
        written = write_plots(metrics, out / "plots")
        if written:
            con.print(f"plots: {', '.join(str(p) for p in written)}", highlight=False, markup=False, soft_wrap=True)
    con.print(f"run: {out}  (next: anpyc eval {out} | anpyc inspect {out} | anpyc export {out})", highlight=False,
              markup=False, soft_wrap=True)
