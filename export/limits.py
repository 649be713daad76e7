"""Resource bounds of the onnxruntime side: what one decoded image, one request body and the server's concurrent
inferences may cost. Every reader of untrusted input (``anpyc predict``, ``anpyc serve``, ``load_export``) runs
under one :class:`Limits`; the defaults keep ``anpyc predict`` on any one image under ~500 MB and ``anpyc serve``
under ~1 GB with any number of concurrent clients (measured in BENCHMARKS.md, serving section).

    Limits()                                   # the defaults below
    Limits(max_pixels=50_000_000)              # larger photos, more memory per image
    anpyc serve EXPORT --max-pixels 50000000 --max-inferences 8 --max-waiting 128 --max-body-mb 16
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from anpyc.errors import ConfigError, clip

__all__ = ["Limits", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_ASPECT", "DEFAULT_MAX_INFERENCES", "DEFAULT_MAX_WAITING",
           "DEFAULT_MAX_BODY_BYTES"]

# 16 megapixels: a 12 MP phone photo decodes in full; a larger JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
# DCT scaling) until it fits, any other format over it is refused. At most 64 MB decoded (RGBA) per image.
DEFAULT_MAX_PIXELS = 16_000_000
# width:height (or height:width) of at most 32:1: a 1,000,000 x 1 image is no photo, and its resize would not fit
DEFAULT_MAX_ASPECT = 32.0
# the server decodes and runs at most 4 requests at once, queues up to 64 more, and answers 503 beyond that
DEFAULT_MAX_INFERENCES = 4
DEFAULT_MAX_WAITING = 64
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024

_ENV = {"max_pixels": "ANPYC_SERVE_MAX_PIXELS", "max_aspect": "ANPYC_SERVE_MAX_ASPECT",
        "max_inferences": "ANPYC_SERVE_MAX_INFERENCES", "max_waiting": "ANPYC_SERVE_MAX_WAITING",
        "max_body_bytes": "ANPYC_SERVE_MAX_BODY"}
_FLAGS = {"max_pixels": "--max-pixels", "max_aspect": "--max-aspect", "max_inferences": "--max-inferences",
          "max_waiting": "--max-waiting", "max_body_bytes": "--max-body-mb"}


@dataclass(frozen=True)
class Limits:
    """``max_pixels``: decoded pixels of one image (width x height, after a JPEG's reduced decode);
    ``max_aspect``: longest side over shortest side of one image; ``max_inferences``: requests the server decodes
    and runs at once; ``max_waiting``: requests queued for a slot before the server answers 503;
    ``max_body_bytes``: one request body (413 beyond, refused while streaming)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT
    max_inferences: int = DEFAULT_MAX_INFERENCES
    max_waiting: int = DEFAULT_MAX_WAITING
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        bounds = {"max_pixels": (1, 1 << 40), "max_aspect": (1.0, 1e9), "max_inferences": (1, 4096),
                  "max_waiting": (0, 1 << 20), "max_body_bytes": (1, 1 << 40)}
        for name, (low, high) in bounds.items():
            v = getattr(self, name)
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not number or (isinstance(low, int) and not isinstance(v, int)) or not low <= v <= high:
                raise ConfigError(f"{name} is {clip(repr(v), 30)}, not a number in {low:g}..{high:g}",
                                  f"pass {_FLAGS[name]} within that range")

    def to_env(self) -> dict[str, str]:
        """The settings as environment variables (the server's worker processes read them back)."""
        return {_ENV[f.name]: repr(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Limits":
        env = os.environ if environ is None else environ
        kw: dict[str, int | float] = {}
        for f in fields(cls):
            text = env.get(_ENV[f.name])
            if text is None:
                continue
            try:
                kw[f.name] = float(text) if f.name == "max_aspect" else int(text)
            except ValueError:
                raise ConfigError(f"{_ENV[f.name]}={clip(text, 30)!r} is not a number",
                                  f"set it like {f.name}'s default, {getattr(cls(), f.name)!r}") from None
        return cls(**kw)
