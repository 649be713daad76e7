"""Image -> tensor transforms derived from an :class:`~anpyc.task.InputSpec`.

The eval transform is exactly timm's eval pipeline (resize the shorter side to ``floor(size / crop_pct)``, centre
crop, to tensor, normalise) preceded by ``img.convert(spec.color_mode)``. The ONNX runtime replicates it in
numpy + PIL, so do not add steps here without changing the runtime too.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import Compose

from anpyc.errors import DataError
from anpyc.task import InputSpec

__all__ = ["eval_transform", "train_transform", "input_spec_for", "CHANNELS", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNELS = {"L": 1, "RGB": 3}
"""Supported ``color_mode`` values and the channel count each gives."""

# Augmentation for small images (32-64 px), see train_transform.
SMALL_IMAGE_SCALE = (0.8, 1.0)
SMALL_IMAGE_RATIO = (3 / 4, 4 / 3)


class ConvertMode:
    """``img.convert(mode)`` as a picklable transform step."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def _check_image_spec(spec: InputSpec) -> int:
    if spec.kind != "image":
        raise DataError(
            f"an image transform needs an InputSpec of kind 'image', got {spec.kind!r}",
            "vector inputs are used as is; build image streams for image backbones",
        )
    if spec.color_mode not in CHANNELS:
        raise DataError(f"unsupported color_mode {spec.color_mode!r}", f"use one of: {', '.join(CHANNELS)}")
    c = CHANNELS[spec.color_mode]
    if len(spec.shape) != 3 or spec.shape[0] != c:
        raise DataError(
            f"InputSpec shape {tuple(spec.shape)} does not fit color_mode {spec.color_mode!r}",
            f"use shape ({c}, H, W) for {spec.color_mode!r}",
        )
    if len(spec.mean) != c or len(spec.std) != c:
        raise DataError(
            f"InputSpec mean/std have {len(spec.mean)}/{len(spec.std)} values for {c} channel(s)",
            f"give one mean and one std per channel ({c})",
        )
    return c


def eval_transform(spec: InputSpec) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float32 tensor ``spec.shape``: convert(color_mode), then timm's eval transform."""
    from timm.data import create_transform

    _check_image_spec(spec)
    tf = create_transform(
        input_size=tuple(spec.shape),
        interpolation=spec.interpolation,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        crop_pct=spec.crop_pct,
        is_training=False,
    )
    return Compose([ConvertMode(spec.color_mode), *tf.transforms])


def train_transform(
    spec: InputSpec, augment: bool = False, *, hflip: float = 0.5
) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform, or with ``augment`` timm's training transform tuned for small images.

    Augmentation: ``RandomResizedCrop(scale=(0.8, 1), ratio=(3/4, 4/3))`` with the spec's interpolation, horizontal
    flip with probability ``hflip`` (pass 0 for digits/text), no colour jitter, no random erasing. The ImageNet
    default ``scale=(0.08, 1)`` crops away most of a 32 px image, so it is not used.
    """
    if not augment:
        return eval_transform(spec)
    from timm.data import create_transform

    _check_image_spec(spec)
    tf = create_transform(
        input_size=tuple(spec.shape),
        is_training=True,
        scale=SMALL_IMAGE_SCALE,
        ratio=SMALL_IMAGE_RATIO,
        hflip=hflip,
        color_jitter=None,
        interpolation=spec.interpolation,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        re_prob=0.0,
    )
    return Compose([ConvertMode(spec.color_mode), *tf.transforms])


def input_spec_for(model: torch.nn.Module, img_size: int, color_mode: str = "RGB") -> InputSpec:
    """The InputSpec a model expects at ``img_size``: mean/std/interpolation/crop_pct from its timm
    ``pretrained_cfg`` (``timm.data.resolve_data_config``); a plain torch module gets ImageNet mean/std, bilinear,
    crop_pct 1.0. For ``color_mode="L"`` the per-channel mean and std are averaged into one value each.
    """
    if color_mode not in CHANNELS:
        raise DataError(f"unsupported color_mode {color_mode!r}", f"use one of: {', '.join(CHANNELS)}")
    if int(img_size) < 1:
        raise DataError(f"img_size must be a positive number of pixels, got {img_size}", "pass e.g. img_size=32")
    if getattr(model, "pretrained_cfg", None):
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        interpolation, crop_pct = str(cfg["interpolation"]), float(cfg["crop_pct"])
    else:
        mean, std, interpolation, crop_pct = IMAGENET_MEAN, IMAGENET_STD, "bilinear", 1.0
    c = CHANNELS[color_mode]
    if len(mean) != c:
        mean, std = (sum(mean) / len(mean),) * c, (sum(std) / len(std),) * c
    return InputSpec(
        kind="image",
        shape=(c, int(img_size), int(img_size)),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        interpolation=interpolation,
        crop_pct=crop_pct,
        color_mode=color_mode,
    )
