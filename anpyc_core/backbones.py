"""Backbones by name, and the record a run keeps of its backbone.

``create_backbone(name, input_spec=..., **kwargs)`` returns a feature trunk (a batch to pooled features ``[B, F]``,
no classifier: the learner adds one head per task): a model of the :data:`BACKBONES` registry (``mlp``, ``cnn``,
or one a user registers) or any timm model. Every trunk speaks timm's model contract (``forward_features``,
``forward_head``, ``reset_classifier``, ``get_classifier``, ``num_features``, ``pretrained_cfg``); anpyc's own
:class:`MLP` and :class:`SimpleCNN` implement it too.

The registry lives in the core because a run directory must be re-openable from its files alone, and no file anpyc
reads may choose code: ``run.json`` records a backbone as a *name* (resolved here, through the registry or timm) and
its keyword arguments, never as an importable ``module:function``. A module built by the caller is recorded as
``custom`` and can only be given back by the caller (``ContinualLearner.load(dir, model=...)``).

Weights come only from the caller: ``create_backbone(name, pretrained=True)`` (timm's hub weights; ``hf-hub:`` names
pass to timm unchanged) or a file (:mod:`anpyc.weights`). The record keeps where they came from (``weights``,
informational) and a name that rebuilds the architecture offline (a hub model's timm architecture, not its hub id);
model options that would load weights are refused, so a file never makes anpyc read another file or go online.
"""

from __future__ import annotations

import difflib
import inspect
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import ModelError, RunDirError, clip
from .registry import Registry
from .task import InputSpec
from .weights import PRETRAINED, load_weights_file, online_access, pretrained_record, weights_choice

__all__ = ["BACKBONES", "create_backbone", "list_backbones", "is_known", "MLP", "SimpleCNN", "as_trunk", "build_trunk",
           "backbone_record", "custom_record", "name_from_record", "WEIGHT_OPTIONS", "LEGACY_FACTORY", "is_hub_name",
           "RECORD_INFO"]

BACKBONES: Registry = Registry("backbone")

# Model options that load weights or fetch them from a hub: a run never re-applies them from its files (the initial
# values are in init.safetensors), and a file must not be able to make anpyc read another file or go online.
WEIGHT_OPTIONS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "pretrained_strict",
                  "cache_dir")
# What run.json version 1 recorded as the factory of every named backbone (read as a name; never imported).
LEGACY_FACTORY = "anpyc.adapters.backbones:create_backbone"
# Model names timm resolves on the Hugging Face Hub (the architecture and its config come from there).
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
# Record entries that only inform (where the weights and a hub model came from): kept, never acted on.
RECORD_INFO = ("weights", "hub")
# Keyword arguments anpyc sets itself when it builds a timm model (never taken from a hub model's saved arguments).
OWN_ARGS = ("num_classes", "in_chans", "img_size")


class _TimmContract(nn.Module):
    """timm's model contract for anpyc's own backbones: features, an optional classifier, ``pretrained_cfg``."""

    num_features: int
    num_classes: int = 0

    def _init_head(self, num_classes: int, architecture: str, input_size: tuple[int, ...]) -> None:
        self.head_hidden_size = self.num_features
        self.pretrained_cfg = {"architecture": architecture, "input_size": tuple(input_size), "classifier": "head",
                               "num_classes": 0}
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.head = nn.Linear(self.num_features, self.num_classes) if self.num_classes else nn.Identity()


class MLP(_TimmContract):
    """Fully connected trunk on flattened inputs: ``in -> hidden[0] -> ... -> hidden[-1]`` with ReLU (+dropout)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (256, 256), dropout: float = 0.0,
                 num_classes: int = 0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.layers = nn.Sequential(*layers)
        self.num_features = width
        self._init_head(num_classes, "mlp", (in_features,))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SimpleCNN(_TimmContract):
    """A plain torch CNN: three conv-BN-ReLU stages with pooling, global average pooled features."""

    def __init__(self, in_chans: int = 3, width: int = 32, num_classes: int = 0):
        super().__init__()
        w = (width, width * 2, width * 4)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w[0], 3, padding=1), nn.BatchNorm2d(w[0]), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w[0], w[1], 3, padding=1), nn.BatchNorm2d(w[1]), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w[1], w[2], 3, padding=1), nn.BatchNorm2d(w[2]), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.num_features = w[2]
        self._init_head(num_classes, "cnn", (in_chans, 32, 32))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _in_features(spec: InputSpec | None) -> int:
    return int(math.prod(spec.shape)) if spec is not None else 784


@BACKBONES.register("mlp", help="MLP on flattened inputs (kwargs: hidden=(256, 256), dropout=0.0)")
def _mlp(input_spec: InputSpec | None = None, hidden: tuple[int, ...] | list[int] = (256, 256),
         dropout: float = 0.0) -> nn.Module:
    return MLP(_in_features(input_spec), tuple(int(h) for h in hidden), float(dropout))


@BACKBONES.register("cnn", help="plain torch CNN, 3 conv-BN-ReLU stages (kwargs: width=32)")
def _cnn(input_spec: InputSpec | None = None, width: int = 32) -> nn.Module:
    chans = input_spec.shape[0] if input_spec is not None and len(input_spec.shape) == 3 else 3
    return SimpleCNN(chans, int(width))


def is_hub_name(name: str) -> bool:
    """``hf-hub:owner/model``: a timm model on the Hugging Face Hub (checked by its form; the hub is not asked)."""
    return isinstance(name, str) and name.startswith(HUB_PREFIXES) and bool(name.split(":", 1)[1].strip("/ "))


def is_known(name: str) -> bool:
    import timm

    return name in BACKBONES or is_hub_name(name) or name in timm.list_models() or timm.is_model(name)


def _check_options(name: str, kwargs: dict[str, Any]) -> None:
    loading = sorted(set(kwargs) & set(WEIGHT_OPTIONS))
    if loading:
        raise ModelError(f"model option {loading[0]!r} of {name!r} would load weights; anpyc does not take weights "
                         "through model options", "pass --pretrained or --weights FILE (in Python: weights=...)")


def _create_timm(name: str, kw: dict[str, Any]) -> nn.Module:
    """``timm.create_model``; when it goes online (pretrained weights, a hub model) its failures are user errors."""
    import timm

    hub = is_hub_name(name)
    if not (kw.get("pretrained") or hub):
        return timm.create_model(name, **kw)
    try:
        with online_access(name, hub=hub):
            return timm.create_model(name, **kw)
    except (OSError, RuntimeError, ValueError, AssertionError) as e:  # network, hub, missing weights
        first = clip((str(e).strip().splitlines() or [""])[0], 160)
        what = "pretrained weights of" if kw.get("pretrained") else "hub model"
        raise ModelError(f"cannot load the {what} {name!r} ({type(e).__name__}: {first})",
                         "check the name and the network connection, or download the weights and pass "
                         "--weights FILE") from None


def _timm(name: str, input_spec: InputSpec | None, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    hub = is_hub_name(name)
    if not hub and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models() + BACKBONES.names(), n=4)
        raise ModelError(f"unknown model {name!r}",
                         f"did you mean {', '.join(close)}?" if close else "see `anpyc models` for valid names")
    kw: dict[str, Any] = {"pretrained": pretrained, "num_classes": 0, **kwargs}
    if input_spec is not None and len(input_spec.shape) == 3:
        kw.setdefault("in_chans", input_spec.shape[0])
        size = tuple(input_spec.shape[1:])
        default = None if hub else tuple(timm.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224))[1:]
        if size != default and "img_size" not in kwargs:
            try:  # fixed-size models (ViT, Swin, ...) take their input size at construction
                return _create_timm(name, {"img_size": size if size[0] != size[1] else size[0], **kw})
            except TypeError:
                pass
    try:
        return _create_timm(name, kw)
    except TypeError as e:
        raise ModelError(f"cannot create {name!r} with {sorted(kwargs)} ({e})", "check the model keyword arguments")


def create_backbone(name: str, *, input_spec: InputSpec | None = None, pretrained: bool = False,
                    **kwargs: Any) -> nn.Module:
    """A feature trunk by name: a registered torch backbone (``mlp``, ``cnn``) or any timm model (``hf-hub:``
    names included); ``pretrained`` loads timm's pretrained weights (the caller's request only: never from a
    file's model options)."""
    if not isinstance(name, str) or not name:
        raise ModelError(f"a backbone name must be a non-empty string, got {name!r}", "pass e.g. 'resnet18' or 'mlp'")
    _check_options(name, kwargs)
    if name in BACKBONES:
        if pretrained:
            raise ModelError(f"anpyc's own backbone {name!r} has no pretrained weights",
                             "pass a weights file (--weights FILE) or a timm model name")
        factory: Callable[..., nn.Module] = BACKBONES.get(name)
        allowed = set(inspect.signature(factory).parameters) - {"input_spec"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ModelError(f"backbone {name!r} has no option {unknown[0]!r}",
                             f"valid options: {', '.join(sorted(allowed))}")
        try:
            return factory(input_spec=input_spec, **kwargs)
        except (TypeError, ValueError) as e:  # an option of the wrong type or value (--model-opt, a config file)
            raise ModelError(f"cannot create {name!r} with {clip(kwargs, 80)} ({type(e).__name__}: {clip(e, 80)})",
                             "check the model keyword arguments") from None
    return _timm(name, input_spec, bool(pretrained), **kwargs)


def list_backbones(pattern: str | None = None) -> list[str]:
    """Registered torch backbones and timm model names matching a shell-style ``pattern``."""
    import fnmatch

    import timm

    names = BACKBONES.names() + timm.list_models()
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern) or (pattern in n)]


def as_trunk(model: nn.Module) -> nn.Module:
    """A model as a feature trunk: under timm's contract (``reset_classifier``) its classifier is removed (the task
    heads are anpyc's); any other module is taken as it is and must already map a batch to ``[B, F]``."""
    if callable(getattr(model, "reset_classifier", None)) and getattr(model, "num_classes", 0):
        model.reset_classifier(0)
    return model


def build_trunk(model: nn.Module | str, input_spec: InputSpec, kwargs: dict[str, Any] | None,
                record: dict[str, Any] | None = None, weights: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """The trunk a learner trains (a name built here, or the caller's module) and its run.json record (``record``:
    the one a run saved, kept for a custom module given back by the caller). ``weights`` (``"pretrained"`` or a
    file's path) sets its initial values; the record says where they came from (``weights``)."""
    kwargs = dict(kwargs or {})
    choice = weights_choice(weights)
    if isinstance(model, str):
        _check_options(model, kwargs)  # before ``pretrained`` is passed on its own
        trunk = as_trunk(create_backbone(model, input_spec=input_spec, pretrained=choice == PRETRAINED, **kwargs))
        rec = _hub_record(trunk, model, kwargs) if is_hub_name(model) else backbone_record(model, kwargs)
        if choice == PRETRAINED:
            rec["weights"] = pretrained_record(trunk, model)
    elif isinstance(model, nn.Module):
        if choice == PRETRAINED:
            raise ModelError("weights='pretrained' needs a model name (timm builds and loads it)",
                             "pass the name, e.g. 'resnet18', or load the weights into your module yourself")
        trunk, rec = as_trunk(model), dict(record or custom_record(model))
    else:
        raise ModelError(f"model must be an nn.Module or a model name, got {type(model).__name__}",
                         "pass e.g. timm.create_model(name, num_classes=0) or a name like 'resnet18'")
    if isinstance(choice, Path):
        rec["weights"] = load_weights_file(trunk, choice)
    return trunk, rec


# ------------------------------------------------------------------------------------------------ run.json record

def backbone_record(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What run.json keeps of a backbone built by name."""
    return {"source": "name", "name": name, "kwargs": dict(kwargs)}


def _hub_record(trunk: nn.Module, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The record of a hub model: its timm architecture and the arguments its hub config gave (re-opening the run
    rebuilds it offline; the hub id is kept in ``hub``)."""
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"hub model {name!r} does not name its timm architecture", "pass a timm model name")
    saved = getattr(trunk, "pretrained_model_args", None) or {}
    args = {k: v for k, v in saved.items() if isinstance(k, str) and k not in OWN_ARGS and k not in WEIGHT_OPTIONS}
    return {**backbone_record(arch, {**args, **kwargs}), "hub": name}


def custom_record(model: nn.Module) -> dict[str, Any]:
    """What run.json keeps of a module the caller built (informational only: it is never imported)."""
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return {"source": "custom", "name": arch or type(model).__name__, "kwargs": {},
            "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def name_from_record(record: Any, where: str) -> tuple[str, dict[str, Any]] | None:
    """``(name, kwargs)`` of a backbone record read from ``where``; None for a custom module (the caller must pass
    it). A record that names code (any ``module:function`` other than the one version 1 wrote for every named
    backbone) is refused without importing anything."""
    fix = "if you trust the code, build the module yourself and pass it: ContinualLearner.load(dir, model=...)"
    if not isinstance(record, dict):
        raise RunDirError(f"{where} has no backbone record", "re-create the run")
    source = record.get("source")
    if source is None:  # version 1: {"factory": "module:function" | None, "name", "kwargs"}
        factory = record.get("factory")
        if factory is None:
            source = "custom"
        elif factory == LEGACY_FACTORY:
            source = "name"
        else:
            raise RunDirError(f"{where} names the backbone factory {clip(factory, 80)!r}; anpyc builds a run's "
                              "backbone only from a registered or timm model name, never from code a file names", fix)
    if source == "custom":
        return None
    if source != "name":
        raise RunDirError(f"{where} has backbone source {clip(source, 40)!r} (expected 'name' or 'custom')", fix)
    name, kwargs = record.get("name"), record.get("kwargs") or {}
    if isinstance(name, str) and name.startswith(HUB_PREFIXES):
        raise RunDirError(f"{where} names the hub model {clip(name, 80)!r}; re-opening a run never goes online",
                          "re-create the run: anpyc records a hub model by its timm architecture")
    if not isinstance(name, str) or not name or ":" in name:
        raise RunDirError(f"{where} names backbone {clip(name, 80)!r}, which is not a model name", fix)
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise RunDirError(f"{where} has malformed backbone options", "re-create the run")
    try:
        _check_options(name, kwargs)
    except ModelError as e:
        raise RunDirError(f"{where}: {e.problem}", fix) from None
    return name, dict(kwargs)
