"""Initial weights for a trunk: a local file (safetensors or a torch checkpoint) or timm's pretrained weights.

``ContinualLearner(model, weights=...)`` takes ``"pretrained"`` (timm's hub weights for a model name, loaded by
:func:`anpyc.backbones.create_backbone`) or the path of a file, loaded here into the freshly built trunk before the
learner snapshots its initial values, so ``init.safetensors`` holds the loaded values and units a task releases
restart from them. What was loaded is recorded beside the backbone record in ``run.json`` (``backbone.weights``);
the record is informational only: re-opening a run never reads the file or the hub again.

A file must fit the trunk exactly: every trunk tensor present with its shape, nothing else but the classifier
(timm's ``pretrained_cfg["classifier"]``, e.g. ``fc.*``: the task heads are anpyc's). The one adaptation is timm's
own for pretrained weights: an RGB first convolution (``pretrained_cfg["first_conv"]``) summed or repeated to the
trunk's input channels.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

import torch
import torch.nn as nn

from .errors import ConfigError, ModelError, clip
from .fileio import sha256_bytes

__all__ = ["PRETRAINED", "weights_choice", "load_weights_file", "pretrained_record", "describe_weights",
           "tensors_sha256", "online_access", "reachable"]

PRETRAINED = "pretrained"
# Where training checkpoints keep the model's state dict, in the order timm's own loader looks (EMA weights first).
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model_state_dict", "model", "module")
SHOWN = 3  # keys named per kind of mismatch in an error line


def weights_choice(weights: Any) -> str | Path | None:
    """``weights`` as given to the learner: None, :data:`PRETRAINED`, or the Path of a file."""
    if weights is None or weights == PRETRAINED:
        return weights
    if isinstance(weights, (str, os.PathLike)) and str(weights):
        return Path(weights).expanduser()
    raise ConfigError(f"weights must be {PRETRAINED!r} or the path of a weights file, got {weights!r}",
                      'pass weights="pretrained" or weights="path/to/model.safetensors"')


# ------------------------------------------------------------------------------------------------ reading a file

def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    line = clip(text[0], limit) if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _read(path: Path) -> tuple[Any, bytes]:
    """The object a weights file holds (one read, so the hash and the values are of the same bytes)."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ModelError(f"weights file {path} {what}", "pass a .safetensors file or a torch checkpoint")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read weights file {path} ({_first_line(e)})", "check the path and permissions") \
            from None
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        try:
            return st_load(data), data
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise ModelError(f"weights file {path} is not a readable safetensors file ({_first_line(e)})",
                             "restore the file, or save it again with safetensors.torch.save_file") from None
    try:  # weights_only: tensors and plain containers only; anything else is refused before it is built
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), data
    except Exception as e:  # noqa: BLE001 -- torch raises UnpicklingError, RuntimeError, EOFError, zip errors...
        raise ModelError(f"weights file {path} cannot be loaded with weights_only=True ({_first_line(e)})",
                         "save the state dict alone: torch.save(model.state_dict(), path), or use "
                         "safetensors") from None


def _state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a loaded file (a bare one, or under a training checkpoint's key), ``module.`` (DDP)
    prefixes removed; returns it and the key it was found under."""
    key = None
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            found = ", ".join(repr(k) for k in list(obj)[:6])
            raise ModelError(f"weights file {path} holds no state dict (top-level keys: {found or 'none'})",
                             f"save a state dict, or a checkpoint with one under {', '.join(WRAPPER_KEYS[2:5])}")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ModelError(f"weights file {path} holds a {type(obj).__name__}, not a state dict",
                         "save model.state_dict(), not the model")
    where = f" under {key!r}" if key else ""
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ModelError(f"weights file {path} has entry {clip(k, 60)!r}{where} that is a {type(v).__name__}, "
                             "not a tensor", "save the state dict alone: torch.save(model.state_dict(), path)")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, key


# ------------------------------------------------------------------------------------------------ fitting a trunk

def _names(cfg: Any, key: str) -> tuple[str, ...]:
    value = cfg.get(key) if isinstance(cfg, Mapping) else None
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, (list, tuple)) else ()


def _adapt_first_conv(trunk: nn.Module, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """timm's adaptation of RGB stem weights to the trunk's input channels (what ``pretrained=True`` does)."""
    adapted = []
    for conv in _names(getattr(trunk, "pretrained_cfg", None), "first_conv"):
        k = f"{conv}.weight"
        w, mine = state.get(k), own.get(k)
        if w is None or mine is None or w.ndim != 4 or w.shape == mine.shape or w.shape[1] != 3 \
                or (w.shape[0], *w.shape[2:]) != (mine.shape[0], *mine.shape[2:]):
            continue
        from timm.models import adapt_input_conv

        state[k] = adapt_input_conv(int(mine.shape[1]), w)
        adapted.append(k)
    return adapted


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def fit_state(trunk: nn.Module, state: dict[str, torch.Tensor], source: str
              ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The tensors of ``state`` that set ``trunk`` (its full state dict: parameters and persistent buffers), the
    classifier keys left out and the keys adapted. Anything that does not fit is one ModelError naming the first
    keys of each kind."""
    own = trunk.state_dict()
    classifier = _names(getattr(trunk, "pretrained_cfg", None), "classifier")
    ignored = sorted(k for k in state if k not in own and any(k == c or k.startswith(f"{c}.") for c in classifier))
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    adapted = _adapt_first_conv(trunk, own, state)
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    # torch's BatchNorm tolerates checkpoints without num_batches_tracked (older torch); so does anpyc
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = sorted(k for k in state if k not in own)  # sorted: a safetensors header keeps no order
    if shapes or missing or unexpected:
        arch = (getattr(trunk, "pretrained_cfg", None) or {}).get("architecture") or type(trunk).__name__
        parts = []
        if shapes:
            first = shapes[0]
            parts.append(f"{len(shapes)} of another shape ({_listed(shapes)}; {first} is "
                         f"{_shape(state[first])} in the file, {_shape(own[first])} here)")
        if missing:
            parts.append(f"{len(missing)} missing ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
        raise ModelError(f"{source} does not fit {arch}: {'; '.join(parts)}",
                         "pass weights saved from the same architecture and options (model name, --model-opt, "
                         "input channels)")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ModelError(f"{source} has non-finite values in {bad}", "pass weights without NaN or inf")
    fitted = {k: state[k] if k in state else own[k] for k in own}
    return fitted, ignored, adapted


def load_weights_file(trunk: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load the weights file at ``path`` into ``trunk``; returns what ``run.json`` records of it."""
    path = Path(path).expanduser()
    obj, data = _read(path)
    state, key = _state_dict(obj, path)
    fitted, ignored, adapted = fit_state(trunk, state, f"weights file {path}")
    trunk.load_state_dict(fitted, strict=True)
    return {"source": "file", "path": str(path.resolve()), "sha256": sha256_bytes(data), "bytes": len(data),
            "key": key, "tensors": len(state) - len(ignored), "ignored": ignored, "adapted": adapted}


# ------------------------------------------------------------------------------------------------ pretrained

def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors in name order (name, dtype, shape and raw bytes of each)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pretrained_record(trunk: nn.Module, name: str) -> dict[str, Any]:
    """What ``run.json`` records of timm's pretrained weights in ``trunk`` (built from ``name``): where timm took
    them from (its ``pretrained_cfg``) and the sha256 of the loaded tensors (:func:`tensors_sha256`; the file timm
    downloaded is timm's cache, not anpyc's to hash)."""
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    rec: dict[str, Any] = {"source": PRETRAINED, "name": name}
    if cfg.get("tag"):
        rec["tag"] = cfg["tag"]
    if cfg.get("file"):  # a local file overrides the hub and the url (timm's order)
        rec["file"] = str(cfg["file"])
    else:  # timm takes the hub when huggingface_hub is installed, else the url: both name the same weights
        rec.update({k: str(cfg[c]) for k, c in (("hub_id", "hf_hub_id"), ("url", "url")) if cfg.get(c)})
    state = trunk.state_dict()
    rec.update({"tensors": len(state), "tensors_sha256": tensors_sha256(state)})
    return rec


def describe_weights(record: Mapping[str, Any]) -> str:
    """One line saying what a run's initial weights were (its ``backbone.weights`` record)."""
    if record.get("source") == "file":
        text = f"weights: file {Path(str(record.get('path'))).name} (sha256 {str(record.get('sha256'))[:12]}...)"
        if record.get("key"):
            text += f", {record['key']!r} of the checkpoint"
    else:
        where = next((f" from {k.replace('_', ' ')} {record[k]}" for k in ("hub_id", "url", "file") if k in record),
                     "")
        digest = str(record.get("tensors_sha256"))[:12]
        text = f"weights: pretrained {record.get('name')}{where} (tensors sha256 {digest}...)"
    text += f", {record.get('tensors')} tensors"
    classifier = sorted({k.rsplit(".", 1)[0] for k in _strings(record.get("ignored"))})
    if classifier:
        text += f", classifier {', '.join(c + '.*' for c in classifier)} ignored"
    for k in _strings(record.get("adapted")):
        text += f", {k} adapted to the input channels"
    return text


def _strings(value: Any) -> list[str]:
    """The strings of a list read from run.json (a record shown, never trusted to be well formed)."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


# ------------------------------------------------------------------------------------------------ going online

REACH_TIMEOUT = 3.0  # seconds a connection to the weights' host may take before the network counts as down
HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "config.json")


def reachable(host: str, port: int = 443, timeout: float = REACH_TIMEOUT) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (a failed name lookup, the usual
    offline case, fails at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_cached(repo: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    return any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision or None), str) for f in files)


def _weights_location(name: str, hub: bool) -> tuple[str, str, bool] | None:
    """Where timm takes the weights of ``name`` from, as ``(kind, host, cached)`` (kind ``hf-hub`` or ``url``), or
    None for a local file (timm's order: a configured file, the Hugging Face Hub, then the URL)."""
    from huggingface_hub import constants

    hf_host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if hub:
        return "hf-hub", hf_host, _hf_cached(name.split(":", 1)[1], HF_FILES)
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None  # timm says itself that the model has no weights
    if cfg.file:
        return None
    if cfg.hf_hub_id:
        files = ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else ()) + HF_FILES
        return "hf-hub", hf_host, _hf_cached(cfg.hf_hub_id, files)
    if cfg.url:
        from timm.models._hub import check_cached_file

        return "url", urlparse(cfg.url).hostname or cfg.url, bool(check_cached_file(cfg.url, check_hash=False))
    return None


@contextmanager
def online_access(name: str, *, hub: bool) -> Iterator[None]:
    """Around a ``timm.create_model`` that takes weights from the network. Online, nothing changes. Offline (the
    host cannot be reached within :data:`REACH_TIMEOUT`, or ``HF_HUB_OFFLINE`` is set), weights in the local cache
    are loaded without asking the hub (which would retry for about a minute), and weights that are not cached fail
    at once with one line naming ``--weights FILE``."""
    from huggingface_hub import constants

    where = _weights_location(name, hub)
    if where is None:
        yield
        return
    kind, host, cached = where
    if not constants.HF_HUB_OFFLINE and reachable(host):
        yield
        return
    what = "hub model" if hub else "pretrained weights of"
    if not cached:
        raise ModelError(f"cannot load the {what} {name!r}: {host} cannot be reached (offline?) and they are not in "
                         "the local cache", "pass --weights FILE with weights saved where there is a network, or "
                                            "run once online to fill the cache")
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # read at every request: the hub answers from its cache
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
