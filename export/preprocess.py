"""Images to model inputs exactly as timm's eval transform does, in numpy and PIL (no torch): what the runtime,
the server and the CLI feed onnxruntime.

``preprocess_image(img, spec)`` equals ``timm.data.create_transform(input_size, interpolation=, mean=, std=,
crop_pct=, is_training=False)`` applied after ``img.convert(color_mode)``; ``check_spec`` refuses an input spec the
transform cannot follow; ``open_image`` decodes a path, bytes or PIL image with one-line errors, within
:class:`~anpyc.export.limits.Limits` (decoded pixels, aspect ratio); ``load_image`` does both.

Memory is bounded for any input: an image's size is read from its header and checked before it is decoded (a
JPEG over the pixel limit is decoded at reduced scale instead, Pillow's ``draft``), and an image whose resized
form would be large (a long panorama before its centre crop) is resized in the crop window only (Pillow's resize
with ``box``, which samples the same source pixels), so no intermediate outgrows the decoded image.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from typing import Any

import numpy as np
from PIL import Image

from anpyc.errors import clip
from anpyc.task import InputSpec

from .errors import ExportDirError, ImageReadError
from .limits import Limits

__all__ = ["preprocess_image", "check_spec", "open_image", "load_image", "PIL_FILTERS", "UINT8_MODES"]

# Pillow warns above 89 megapixels; every decode here is checked against Limits.max_pixels first (16 MP by
# default), so the warning would only be noise on stderr beside the one-line error.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_RESIZE_BUDGET = 1 << 24  # pixels of a resized image above which only its centre-crop window is resized

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


def _shorter_size(w: int, h: int, size: int) -> tuple[int, int]:
    # torchvision.transforms.functional.resize(img, size:int) on a PIL image.
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _keep_ratio_size(w: int, h: int, target: tuple[int, int]) -> tuple[int, int]:
    # timm.data.transforms.ResizeKeepRatio(size, longest=0) for non-square targets.
    ratio = min(h / target[0], w / target[1])
    return round(w / ratio), round(h / ratio)


def _resize_and_crop(img: Image.Image, new_w: int, new_h: int, out_h: int, out_w: int, resample: int
                     ) -> Image.Image:
    """``_center_crop(img.resize((new_w, new_h)), out_h, out_w)``; a resized image over the budget is resized in
    the crop window only (the same pixels: Pillow's resize with ``box`` samples the source around the box)."""
    w, h = img.size
    if (new_w, new_h) == (w, h):
        return _center_crop(img, out_h, out_w)
    if new_w * new_h <= _RESIZE_BUDGET:
        return _center_crop(img.resize((new_w, new_h), resample), out_h, out_w)
    # the crop window in resized coordinates, as _center_crop places it (negative: padding)
    pad_l, pad_t = max(0, (out_w - new_w) // 2), max(0, (out_h - new_h) // 2)
    left = int(round((max(new_w, out_w) - out_w) / 2.0)) - pad_l
    top = int(round((max(new_h, out_h) - out_h) / 2.0)) - pad_t
    x0, y0, x1, y1 = max(0, left), max(0, top), min(new_w, left + out_w), min(new_h, top + out_h)
    sx, sy = w / new_w, h / new_h
    part = img.resize((x1 - x0, y1 - y0), resample, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    if (x0 - left, y0 - top, x1 - x0, y1 - y0) == (0, 0, out_w, out_h):
        return part
    out = Image.new(img.mode, (out_w, out_h), 0)
    out.paste(part, (x0 - left, y0 - top))
    return out


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
    scale_h, scale_w = max(1, math.floor(out_h / crop_pct)), max(1, math.floor(out_w / crop_pct))
    w, h = img.size
    new_w, new_h = _shorter_size(w, h, scale_h) if scale_h == scale_w else _keep_ratio_size(w, h, (scale_h, scale_w))
    img = _resize_and_crop(img, max(1, new_w), max(1, new_h), out_h, out_w, resample)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def _check_size(w: int, h: int, label: str, limits: Limits, *, decoded: bool) -> None:
    if w < 1 or h < 1:
        raise ImageReadError(f"image {label} is {w}x{h} pixels", "pass an image with pixels")
    ratio = max(w, h) / min(w, h)
    if ratio > limits.max_aspect:
        raise ImageReadError(f"image {label} is {w}x{h} pixels, an aspect ratio of {ratio:,.0f}:1 over the limit of "
                             f"{limits.max_aspect:g}:1", "crop or pad it to a less elongated image, or raise the "
                             "limit (--max-aspect)")
    if decoded and w * h > limits.max_pixels:
        raise ImageReadError(f"image {label} is {w}x{h} pixels ({w * h / 1e6:,.1f} megapixels), over the limit of "
                             f"{limits.max_pixels / 1e6:g} megapixels", "downscale it first, or raise the limit "
                             "(--max-pixels)")


def _reduce(img: Image.Image, limits: Limits) -> None:
    """Decode a JPEG over the pixel limit at 1/2, 1/4 or 1/8 scale (the least that fits), in place."""
    w, h = img.size
    if w * h <= limits.max_pixels or img.format != "JPEG":
        return
    for f in (2, 4, 8):
        if math.ceil(w / f) * math.ceil(h / f) <= limits.max_pixels:
            img.draft(None, (max(1, w // f), max(1, h // f)))
            return


def open_image(item: Any, label: str, limits: Limits | None = None) -> Image.Image:
    """A decoded PIL image from a path, encoded bytes or a PIL image, within ``limits`` (its size is read from the
    header and checked before the pixels are decoded); anything that is not such an image is an
    :class:`ImageReadError` naming ``label``."""
    limits = limits or Limits()
    label = clip(label, 120)
    if isinstance(item, Image.Image):
        _check_size(*item.size, label, limits, decoded=False)  # already in memory: only what the resize costs
        try:
            item.load()
        except Exception as e:  # a lazily opened image of the caller's that fails to decode
            raise ImageReadError(f"image {label} cannot be read ({type(e).__name__})",
                                 "pass a PNG/JPEG/... file that PIL can open") from None
        return item
    src = item
    if isinstance(item, (bytes, bytearray, memoryview)):
        src = io.BytesIO(item)
    else:
        try:
            mode = os.stat(item).st_mode
        except FileNotFoundError:
            raise ImageReadError(f"image {label} does not exist", "check the path") from None
        except OSError as e:
            raise ImageReadError(f"image {label} cannot be opened ({e.strerror or type(e).__name__})",
                                 "check the path and its permissions") from None
        if not stat.S_ISREG(mode):
            raise ImageReadError(f"image {label} is not a regular file", "pass an image file")
    try:
        img = Image.open(src)
        _check_size(*img.size, label, limits, decoded=False)
        _reduce(img, limits)
        _check_size(*img.size, label, limits, decoded=True)
        img.load()
        return img
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"image {label} does not exist", "check the path") from None
    except (Image.DecompressionBombError, MemoryError):
        raise ImageReadError(f"image {label} is too large to decode safely", "downscale it first") from None
    except Exception as e:  # Pillow's decoders raise many kinds (OSError, SyntaxError, struct.error, ...)
        raise ImageReadError(f"image {label} cannot be read ({type(e).__name__})",
                             "pass a PNG/JPEG/... file that PIL can open") from None


def load_image(item: Any, label: str, spec: InputSpec, limits: Limits | None = None) -> np.ndarray:
    """:func:`open_image` then :func:`preprocess_image`: float32 ``[C, H, W]``; a decoded image whose mode cannot
    be converted to ``spec.color_mode`` is an :class:`ImageReadError` too."""
    img = open_image(item, label, limits)
    try:
        return preprocess_image(img, spec)
    except MemoryError:
        raise ImageReadError(f"image {clip(label, 120)} is too large to preprocess", "downscale it first") from None
    except (ValueError, OSError) as e:  # e.g. a mode PIL cannot convert to the model's color mode
        raise ImageReadError(f"image {clip(label, 120)} (mode {img.mode}) cannot be converted for the model "
                             f"({type(e).__name__})", f"pass an image PIL can convert to {spec.color_mode}") from None
