"""Layers that standardise their own weight (weight standardisation: BiT's ``StdConv2d``, NFNet's
``ScaledStdConv2d``, hand-written ``var_mean`` versions).

Such a layer normalises each output filter's weights by their mean and variance before it convolves. Removing an
input channel removes weights from every filter, so it changes every filter's statistics: zeroing the channel is not
removing it. Two rules make masked = sliced hold for them, found by behaviour, never by class name:

* the masked model computes each filter's statistics over its *kept* weights only (:class:`WeightStatsMode`, entered
  while such a layer runs), which is what the sliced layer, holding only those weights, computes; so an earlier
  task's filters also never see the weights later tasks add or train;
* a sliced layer is folded (:func:`fold_weight`): its standardised weight is computed once and the layer becomes the
  plain convolution or linear layer it computes. A filter left with one weight is then well defined (its
  standardised weight is 0, as in the masked model) where the layer's own ``batch_norm`` refuses to run, and the
  exported model skips the per-call standardisation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .units import along

__all__ = ["WEIGHT_STAT_FUNCS", "standardizes_weight", "WeightStatsMode", "fold_weight"]

# the forwards of torch's own layers: a subclass that overrides them may do more with its weight
_PLAIN_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.ConvTranspose1d.forward,
                   nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward, nn.Linear.forward}
_REDUCTIONS = (torch.mean, torch.Tensor.mean, torch.var, torch.Tensor.var, torch.std, torch.Tensor.std,
               torch.var_mean, torch.std_mean)
WEIGHT_STAT_FUNCS = frozenset((F.batch_norm, F.layer_norm, F.group_norm, *_REDUCTIONS))
_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}


def _probe_input(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return torch.zeros(1, module.in_features, dtype=weight.dtype, device=weight.device)
    span = [(k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation)]
    return torch.zeros(1, module.in_channels, *span, dtype=weight.dtype, device=weight.device)


def standardizes_weight(module: nn.Module) -> bool:
    """Whether a conv or linear layer computes statistics of its own weight in its forward: found by running the
    layer once on a zero input and watching for a mean, variance or normalisation whose input is the weight's
    storage."""
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or type(module).forward in _PLAIN_FORWARDS:
        return False
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or weight.is_meta:
        return False

    class Found(Exception):
        pass

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            first = args[0] if args else None
            if (func in WEIGHT_STAT_FUNCS and isinstance(first, torch.Tensor) and first.numel() == weight.numel()
                    and first.data_ptr() == weight.data_ptr()):
                raise Found  # before the call: a one-weight filter's batch_norm would raise instead
            return func(*args, **(kwargs or {}))

    try:
        with torch.no_grad(), Watch():
            module(_probe_input(module, weight))
    except Found:
        return True
    except Exception:  # a layer that needs another input: not recognised here, the walk's verification decides
        return False
    return False


def _arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


class WeightStatsMode(TorchFunctionMode):
    """Entered while one weight-standardising layer runs: the statistics it takes of its weight cover the weights
    where ``mask`` (expanded to the weight's shape; None: all of them) is 1. Computed here rather than by
    ``batch_norm``, so a filter with one kept weight standardises to 0 instead of raising. With ``capture``, the
    (weight, bias) of every convolution or linear call made on ``capture_input`` is appended to it."""

    def __init__(self, mask: torch.Tensor | None, *, numel: int | None = None, capture: list | None = None,
                 capture_input: torch.Tensor | None = None):
        super().__init__()
        self.mask = mask
        self.numel = mask.numel() if mask is not None else numel
        self.capture, self.capture_input = capture, capture_input

    def _mask_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x) if self.mask is None else self.mask.reshape(x.shape).to(x.dtype)

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        x = args[0] if args else None
        if self.capture is not None and (func in _CONVS or func is F.linear) and x is self.capture_input:
            self.capture.append((func, args, kwargs))
        if not isinstance(x, torch.Tensor) or x.numel() != self.numel:
            return func(*args, **kwargs)
        if (func is F.batch_norm and _arg(args, kwargs, 5, "training", False)
                and _arg(args, kwargs, 1, "running_mean") is None):
            w, b = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
            m = self._mask_like(x)
            dims = tuple(d for d in range(x.ndim) if d != 1)
            count = m.sum(dim=dims, keepdim=True).clamp_min(1)
            mu = (x * m).sum(dim=dims, keepdim=True) / count
            xc = (x - mu) * m
            y = xc * torch.rsqrt((xc * xc).sum(dim=dims, keepdim=True) / count + _arg(args, kwargs, 7, "eps", 1e-5))
            if w is not None:
                y = y * along(w, x.ndim, 1)
            if b is not None:
                y = y + along(b, x.ndim, 1) * m
            return y
        if func in _REDUCTIONS:
            dims = args[1] if len(args) > 1 and not isinstance(args[1], bool) else kwargs.get("dim")
            if dims is None:
                return func(*args, **kwargs)
            dims = tuple(d % x.ndim for d in ((dims,) if isinstance(dims, int) else dims))
            flag = args[2] if len(args) > 2 and isinstance(args[2], bool) else None
            keep = kwargs.get("keepdim", flag if func in (torch.mean, torch.Tensor.mean) and flag is not None
                              else False)
            m = self._mask_like(x)
            count = m.sum(dim=dims, keepdim=True).clamp_min(1)
            mu = (x * m).sum(dim=dims, keepdim=True) / count
            if func in (torch.mean, torch.Tensor.mean):
                return mu if keep else mu.squeeze(dims)
            correction = kwargs.get("correction")
            if correction is None:
                correction = 1 if kwargs.get("unbiased", True if flag is None else flag) else 0
            xc = (x - mu) * m
            var = (xc * xc).sum(dim=dims, keepdim=True) / (count - correction).clamp_min(1)
            out = var.sqrt() if func in (torch.std, torch.Tensor.std, torch.std_mean) else var
            if not keep:
                out, mu = out.squeeze(dims), mu.squeeze(dims)
            return (out, mu) if func in (torch.var_mean, torch.std_mean) else out
        return func(*args, **kwargs)


@torch.no_grad()
def fold_weight(module: nn.Module) -> nn.Module | None:
    """The plain layer a weight-standardising ``module`` computes, its standardised weight computed once; None when
    its forward does more than one convolution (or linear map) of its own input with its own stride, padding,
    dilation and groups (e.g. a padding computed per input): the layer is then left as it is."""
    weight = module.weight
    x = _probe_input(module, weight)
    calls: list = []
    try:
        with WeightStatsMode(None, numel=weight.numel(), capture=calls, capture_input=x):
            module(x)
    except Exception:
        return None
    if len(calls) != 1:
        return None
    func, args, kwargs = calls[0]
    w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if not isinstance(w, torch.Tensor) or w.shape != weight.shape:
        return None
    if func is F.linear:
        plain = nn.Linear(module.in_features, module.out_features, bias=b is not None)
    else:
        given = tuple(_arg(args, kwargs, i, n, d) for i, n, d in ((3, "stride", 1), (4, "padding", 0),
                                                                    (5, "dilation", 1), (6, "groups", 1)))
        nd = len(module.kernel_size)

        def as_tuple(v):
            return v if isinstance(v, (str, tuple)) else tuple(v) if isinstance(v, list) else (v,) * nd

        own = (module.stride, module.padding, module.dilation, module.groups)
        if (not isinstance(module, _CONVS[func]) or module.padding_mode != "zeros" or given[3] != own[3]
                or tuple(as_tuple(v) for v in given[:3]) != tuple(as_tuple(v) for v in own[:3])):
            return None
        plain = _CONVS[func](module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                             padding=module.padding, dilation=module.dilation, groups=module.groups,
                             bias=b is not None)
    plain = plain.to(device=weight.device, dtype=weight.dtype)
    plain.weight = nn.Parameter(w.detach().clone(), requires_grad=weight.requires_grad)
    if b is not None:
        plain.bias = nn.Parameter(b.detach().clone(), requires_grad=weight.requires_grad)
    return plain.train(module.training)
