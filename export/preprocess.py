"""Images to model inputs exactly as timm's eval transform does, in numpy and PIL (no torch): what the runtime,
the server and the CLI feed onnxruntime.

``preprocess_image(img, spec)`` equals ``timm.data.create_transform(input_size, interpolation=, mean=, std=,
crop_pct=, is_training=False)`` applied after ``img.convert(color_mode)``; ``check_spec`` refuses an input spec the
transform cannot follow; ``open_image`` decodes a path, bytes or PIL image with one-line errors.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from anpyc.task import InputSpec

from .errors import ExportDirError, ImageReadError

__all__ = ["preprocess_image", "check_spec", "open_image", "PIL_FILTERS", "UINT8_MODES"]

# timm's interpolation names -> PIL filters (timm.data.transforms._str_to_pil_interpolation).
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
UINT8_MODES = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3, "LAB": 3, "HSV": 3}


def check_spec(spec: InputSpec, where: str) -> None:
    if spec.kind not in ("image", "vector"):
        raise ExportDirError(f"{where}: unknown input kind {spec.kind!r}", "re-export with this anpyc version")
    if spec.kind == "image":
        if len(spec.shape) != 3:
            raise ExportDirError(f"{where}: image input shape {list(spec.shape)} is not [C, H, W]", "re-export")
        if spec.color_mode not in UINT8_MODES or UINT8_MODES[spec.color_mode] != spec.shape[0]:
            raise ExportDirError(f"{where}: color_mode {spec.color_mode!r} does not give {spec.shape[0]} channels",
                                 f"use one of {sorted(UINT8_MODES)} matching the channel count")
        if spec.interpolation not in PIL_FILTERS:
            raise ExportDirError(f"{where}: interpolation {spec.interpolation!r} is unknown",
                                 f"use one of {sorted(PIL_FILTERS)}")
        if len(spec.mean) != spec.shape[0] or len(spec.std) != spec.shape[0]:
            raise ExportDirError(f"{where}: mean/std have {len(spec.mean)}/{len(spec.std)} values for "
                                 f"{spec.shape[0]} channels", "re-export with a consistent input spec")


def _resize_shorter(img: Image.Image, size: int, resample: int) -> Image.Image:
    # torchvision.transforms.functional.resize(img, size:int) on a PIL image.
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) == (h, w):
        return img
    return img.resize((new_w, new_h), resample)


def _resize_keep_ratio(img: Image.Image, target: tuple[int, int], resample: int) -> Image.Image:
    # timm.data.transforms.ResizeKeepRatio(size, longest=0) for non-square targets.
    w, h = img.size
    ratio = min(h / target[0], w / target[1])
    new_h, new_w = round(h / ratio), round(w / ratio)
    if (new_h, new_w) == (h, w):
        return img
    return img.resize((new_w, new_h), resample)


def _center_crop(img: Image.Image, out_h: int, out_w: int) -> Image.Image:
    # torchvision.transforms.functional.center_crop (pads with 0 when the image is smaller).
    w, h = img.size
    if out_w > w or out_h > h:
        left, top = max(0, (out_w - w) // 2), max(0, (out_h - h) // 2)
        padded = Image.new(img.mode, (max(w, out_w), max(h, out_h)), 0)
        padded.paste(img, (left, top))
        img = padded
        w, h = img.size
    top = int(round((h - out_h) / 2.0))
    left = int(round((w - out_w) / 2.0))
    return img.crop((left, top, left + out_w, top + out_h))


def preprocess_image(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """One PIL image -> float32 ``[C, H, W]``, exactly as timm's eval transform with ``spec``'s settings."""
    img = img.convert(spec.color_mode)
    _, out_h, out_w = spec.shape
    resample = PIL_FILTERS[spec.interpolation]
    crop_pct = spec.crop_pct or 0.875  # timm: crop_pct or DEFAULT_CROP_PCT
    scale_h, scale_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    if scale_h == scale_w:
        img = _resize_shorter(img, scale_h, resample)
    else:
        img = _resize_keep_ratio(img, (scale_h, scale_w), resample)
    img = _center_crop(img, out_h, out_w)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def open_image(item: Any, label: str) -> Image.Image:
    try:
        if isinstance(item, Image.Image):
            item.load()
            return item
        src = io.BytesIO(item) if isinstance(item, (bytes, bytearray, memoryview)) else item
        img = Image.open(src)
        img.load()
        return img
    except FileNotFoundError:
        raise ImageReadError(f"image {label} does not exist", "check the path") from None
    except Image.DecompressionBombError:
        raise ImageReadError(f"image {label} is too large to decode safely", "downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"image {label} cannot be read ({type(e).__name__})",
                             "pass a PNG/JPEG/... file that PIL can open") from None
