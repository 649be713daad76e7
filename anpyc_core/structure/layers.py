"""Per-layer-type rules: which parameter slices a unit touches, and how a module re-derives its shape attributes.

These are registries keyed by layer *type* (conv, linear, norms, ...), in the spirit of Torch-Pruning's pruner
box: they say what a channel means for one kind of layer, never anything about a particular model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from .units import TensorSlice

__all__ = [
    "SLICE_RULES",
    "RESYNC_RULES",
    "slices_for",
    "resync",
    "has_resync_rule",
    "norm_kind",
    "is_per_task_stats",
    "HEAD_COUNT_ATTRS",
    "HEAD_WIDTH_ATTRS",
]

SliceRule = Callable[[nn.Module, str, Sequence[int]], list[TensorSlice]]
SLICE_RULES: dict[type, SliceRule] = {}
RESYNC_RULES: dict[type, Callable[[nn.Module], None]] = {}


def _register(table: dict, *types: type):
    def deco(fn):
        for t in types:
            table[t] = fn
        return fn

    return deco


def _lookup(table: dict, module: nn.Module):
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def slices_for(module: nn.Module, direction: str, positions: Sequence[int]) -> list[TensorSlice] | None:
    """The tensors touched when channels ``positions`` of ``module``'s ``direction`` ("in"/"out") are removed: slices
    named by the module's attribute, owned by index into ``positions``.

    Returns None for a layer type without a rule (the group it is in is then not prunable).
    """
    rule = _lookup(SLICE_RULES, module)
    return None if rule is None else rule(module, direction, list(positions))


def resync(module: nn.Module) -> None:
    """Re-derive ``module``'s shape attributes (``out_channels``, ``normalized_shape``, ...) from its tensors."""
    rule = _lookup(RESYNC_RULES, module)
    if rule is not None:
        rule(module)


def has_resync_rule(module: nn.Module) -> bool:
    """Whether ``module``'s type has its own rule (not only the generic ``normalized_shape`` one)."""
    rule = _lookup(RESYNC_RULES, module)
    return rule is not None and rule is not RESYNC_RULES.get(nn.Module)


def _present(module: nn.Module, *names: str) -> list[str]:
    return [n for n in names if getattr(module, n, None) is not None]


# ------------------------------------------------------------------------------------------------ convolution

def _conv_is_depthwise(m: nn.modules.conv._ConvNd) -> bool:
    return m.groups > 1 and m.groups == m.in_channels


@_register(SLICE_RULES, nn.modules.conv._ConvNd)
def _conv_slices(m: nn.modules.conv._ConvNd, direction: str, pos: list[int]) -> list[TensorSlice]:
    w_out, w_in = (1, 0) if m.transposed else (0, 1)
    if direction == "out":
        touches = [TensorSlice("weight", w_out, tuple(pos))]
        if m.bias is not None:
            touches.append(TensorSlice("bias", 0, tuple(pos)))
        return touches + _per_filter_params(m, m.weight.shape[w_out], tuple(pos))
    if _conv_is_depthwise(m):
        # an input channel of a depthwise conv owns its `multiplier` output filters
        mult = m.out_channels // m.in_channels
        rows = tuple(p * mult + k for p in pos for k in range(mult))
        src = tuple(i for i in range(len(pos)) for _ in range(mult))
        touches = [TensorSlice("weight", w_out, rows, src)]
        if m.bias is not None:
            touches.append(TensorSlice("bias", 0, rows, src))
        return touches
    if m.groups > 1:
        # grouped conv: input channel c is column c % (in/groups); units are merged into stripes beforehand
        per_group = m.in_channels // m.groups
        return [TensorSlice("weight", w_in, tuple(p % per_group for p in pos))]
    return [TensorSlice("weight", w_in, tuple(pos))]


def _per_filter_params(m: nn.Module, filters: int, pos: tuple[int, ...]) -> list[TensorSlice]:
    """A layer's own parameters besides weight and bias that hold one value per output filter (NFNet's
    ``ScaledStdConv2d.gain`` of shape ``[out, 1, 1, 1]``): a removed filter takes its value with it."""
    return [TensorSlice(name, 0, pos) for name, p in m.named_parameters(recurse=False)
            if name not in ("weight", "bias") and p.ndim >= 1 and p.shape[0] == filters and p.numel() == filters]


@_register(RESYNC_RULES, nn.modules.conv._ConvNd)
def _conv_resync(m: nn.modules.conv._ConvNd) -> None:
    if not m.transposed and _conv_is_depthwise(m):  # attributes still hold the pre-slicing sizes
        mult = m.out_channels // m.in_channels
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.groups = m.out_channels // mult
    elif m.transposed:
        m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
    else:
        m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


# ------------------------------------------------------------------------------------------------ linear

@_register(SLICE_RULES, nn.Linear)
def _linear_slices(m: nn.Linear, direction: str, pos: list[int]) -> list[TensorSlice]:
    if direction == "out":
        bias = [TensorSlice("bias", 0, tuple(pos))] if m.bias is not None else []
        return [TensorSlice("weight", 0, tuple(pos))] + bias
    return [TensorSlice("weight", 1, tuple(pos))]


@_register(RESYNC_RULES, nn.Linear)
def _linear_resync(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


# ------------------------------------------------------------------------------------------------ recurrent

def _rnn_suffixes(m: nn.RNNBase) -> list[str]:
    return ["", "_reverse"] if m.bidirectional else [""]


@_register(SLICE_RULES, nn.RNNBase)
def _rnn_slices(m: nn.RNNBase, direction: str, pos: list[int]) -> list[TensorSlice] | None:
    """An input feature is a column of the first layer's input weights. A hidden unit (output position
    ``direction * hidden_size + j``) is row j of every gate in its direction's weights and biases plus column j of
    its recurrent weights: with those zero its gates stay at their resting value and the unit outputs 0 at every
    step, so masking it is removing it. Only unidirectional single-layer recurrent layers without a projection lose
    hidden units (deeper stacks share one hidden size across layers, and so do the two directions)."""
    if direction == "in":
        return [TensorSlice(f"weight_ih_l0{s}", 1, tuple(pos)) for s in _rnn_suffixes(m)]
    if m.num_layers != 1 or m.bidirectional or getattr(m, "proj_size", 0):
        return None
    gates = m.weight_ih_l0.shape[0] // m.hidden_size
    src = tuple(i for _ in range(gates) for i in range(len(pos)))
    rows = tuple(g * m.hidden_size + j for g in range(gates) for j in pos)
    names = ["weight_ih_l0", "weight_hh_l0"] + (["bias_ih_l0", "bias_hh_l0"] if m.bias else [])
    return [TensorSlice(n, 0, rows, src) for n in names] + [TensorSlice("weight_hh_l0", 1, tuple(pos))]


@_register(RESYNC_RULES, nn.RNNBase)
def _rnn_resync(m: nn.RNNBase) -> None:
    m.input_size = m.weight_ih_l0.shape[1]
    m.hidden_size = m.weight_hh_l0.shape[1]
    m._init_flat_weights()


# ------------------------------------------------------------------------------------------------ norms

@_register(SLICE_RULES, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def _bn_slices(m: nn.Module, direction: str, pos: list[int]) -> list[TensorSlice]:
    names = _present(m, "weight", "bias", "running_mean", "running_var")
    return [TensorSlice(n, 0, tuple(pos)) for n in names]


@_register(RESYNC_RULES, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def _bn_resync(m: nn.Module) -> None:
    ref = next((getattr(m, n) for n in ("weight", "running_mean") if getattr(m, n, None) is not None), None)
    if ref is not None:
        m.num_features = ref.shape[0]


@_register(SLICE_RULES, nn.LayerNorm, nn.GroupNorm)
def _ln_slices(m: nn.Module, direction: str, pos: list[int]) -> list[TensorSlice]:
    return [TensorSlice(n, 0, tuple(pos)) for n in _present(m, "weight", "bias")]


@_register(RESYNC_RULES, nn.LayerNorm)
def _ln_resync(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@_register(RESYNC_RULES, nn.GroupNorm)
def _gn_resync(m: nn.GroupNorm) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


@_register(SLICE_RULES, nn.PReLU)
def _prelu_slices(m: nn.PReLU, direction: str, pos: list[int]) -> list[TensorSlice]:
    return [TensorSlice("weight", 0, tuple(pos))] if m.num_parameters > 1 else []


@_register(RESYNC_RULES, nn.PReLU)
def _prelu_resync(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.shape[0]


@_register(SLICE_RULES, nn.Embedding)
def _embedding_slices(m: nn.Embedding, direction: str, pos: list[int]) -> list[TensorSlice]:
    return [TensorSlice("weight", 1, tuple(pos))]


@_register(RESYNC_RULES, nn.Embedding)
def _embedding_resync(m: nn.Embedding) -> None:
    m.embedding_dim = m.weight.shape[1]


def _generic_resync(m: nn.Module) -> None:
    """Modules following torch's ``normalized_shape`` convention (timm RmsNorm, SimpleNorm, ...)."""
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and isinstance(getattr(m, "normalized_shape", None), tuple):
        m.normalized_shape = tuple(w.shape)


RESYNC_RULES[nn.Module] = _generic_resync


# ------------------------------------------------------------------------------------------------ statistics

def norm_kind(module: nn.Module) -> str | None:
    """``"channel"`` for a module that normalises across channels (LayerNorm, RMSNorm, GroupNorm with fewer
    groups than channels), so a removed channel changes its statistics; None otherwise (BatchNorm normalises each
    channel on its own)."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return None
    if isinstance(module, nn.GroupNorm):
        return "channel" if module.num_groups < module.num_channels else None
    if isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return "channel"
    if isinstance(getattr(module, "normalized_shape", None), tuple) and hasattr(module, "eps"):
        return "channel"
    return None


def is_per_task_stats(module: nn.Module) -> bool:
    """Modules whose running statistics are kept per task (BatchNorm and friends)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats


# Attention modules keep static head counts; these are the attribute names torch/timm-style code uses.
HEAD_COUNT_ATTRS = ("num_heads", "heads", "n_heads", "num_attention_heads", "n_head")
HEAD_WIDTH_ATTRS = ("attn_dim", "all_head_dim", "inner_dim", "dim_attn", "attn_hidden_dim")
