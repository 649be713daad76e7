"""Backbones by name: every timm model, plus small torch models (an MLP and a plain CNN) for vectors and tests.

``create_backbone(name, input_spec=..., **kwargs)`` returns a trunk that maps a batch to pooled features
``[B, F]`` (no classifier: the learner adds one head per task) and exposes ``num_features``. It is the
default backbone factory the learner records in its run directory, so ``resume`` can rebuild the model.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from anpyc.errors import ModelError
from anpyc.registry import Registry
from anpyc.task import InputSpec

__all__ = ["BACKBONES", "create_backbone", "list_backbones", "MLP", "SimpleCNN", "is_known"]

BACKBONES: Registry = Registry("backbone")


class MLP(nn.Module):
    """Fully connected trunk on flattened inputs: ``in -> hidden[0] -> ... -> hidden[-1]`` with ReLU (+dropout)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (256, 256), dropout: float = 0.0):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SimpleCNN(nn.Module):
    """A plain torch CNN: three conv-BN-ReLU stages with pooling, global average pooled features."""

    def __init__(self, in_chans: int = 3, width: int = 32):
        super().__init__()
        w = (width, width * 2, width * 4)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w[0], 3, padding=1), nn.BatchNorm2d(w[0]), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w[0], w[1], 3, padding=1), nn.BatchNorm2d(w[1]), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w[1], w[2], 3, padding=1), nn.BatchNorm2d(w[2]), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.num_features = w[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def is_known(name: str) -> bool:
    import timm

    return name in BACKBONES or name in timm.list_models() or timm.is_model(name)


def _timm(name: str, input_spec: InputSpec | None, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models() + BACKBONES.names(), n=4)
        raise ModelError(f"unknown model {name!r}",
                         f"did you mean {', '.join(close)}?" if close else "see `anpyc models` for valid names")
    kw: dict[str, Any] = {"pretrained": False, "num_classes": 0, **kwargs}
    if input_spec is not None and len(input_spec.shape) == 3:
        kw.setdefault("in_chans", input_spec.shape[0])
        size = tuple(input_spec.shape[1:])
        default = tuple(timm.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224))[1:]
        if size != default and "img_size" not in kwargs:
            try:  # fixed-size models (ViT, Swin, ...) take their input size at construction
                return timm.create_model(name, img_size=size if size[0] != size[1] else size[0], **kw)
            except TypeError:
                pass
    try:
        return timm.create_model(name, **kw)
    except TypeError as e:
        raise ModelError(f"cannot create {name!r} with {sorted(kwargs)} ({e})", "check the model keyword arguments")


def create_backbone(name: str, *, input_spec: InputSpec | None = None, **kwargs: Any) -> nn.Module:
    """A feature trunk by name: a registered torch backbone (``mlp``, ``cnn``) or any timm model."""
    if name in BACKBONES:
        factory: Callable[..., nn.Module] = BACKBONES.get(name)
        allowed = set(inspect.signature(factory).parameters) - {"input_spec"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ModelError(f"backbone {name!r} has no option {unknown[0]!r}",
                             f"valid options: {', '.join(sorted(allowed))}")
        return factory(input_spec=input_spec, **kwargs)
    return _timm(name, input_spec, **kwargs)


def list_backbones(pattern: str | None = None) -> list[str]:
    """Registered torch backbones and timm model names matching a shell-style ``pattern``."""
    import fnmatch

    import timm

    names = BACKBONES.names() + timm.list_models()
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern) or (pattern in n)]
