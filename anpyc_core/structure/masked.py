"""The masked dense model: one trunk, per-task heads and statistics, units switched off by masks.

A forward pass substitutes every masked tensor by ``tensor * mask`` (``torch.func.functional_call``), so removed
units contribute exactly nothing and receive no gradient, while the stored weights stay untouched for the tasks
that own them. Two things zeroing alone does not give, and that this module adds so that the masked model
computes exactly what the physically pruned network computes:

* normalisations across channels (LayerNorm, RMSNorm, GroupNorm) compute their statistics over the kept
  channels only: inside such a module a ``TorchFunctionMode`` turns ``layer_norm``/``group_norm``/``rms_norm``
  and mean/variance reductions over the channel dimension into masked ones;
* per-task BatchNorm running statistics are passed in as buffers, so later tasks never move an earlier task's.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from .slicing import drop_tensor_caches
from .units import along
from .weightstats import WeightStatsMode, standardizes_weight

__all__ = ["MaskedModel", "masked_layer_norm", "masked_group_norm", "masked_rms_norm", "along"]


# ================================================================================================ masked norms

def masked_layer_norm(x, mask, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dimension, statistics over the positions where ``mask`` is 1."""
    m = along(mask.to(x.dtype), x.ndim, x.ndim - 1)
    k = m.sum()
    mu = (x * m).sum(-1, keepdim=True) / k
    xc = (x - mu) * m
    var = (xc * xc).sum(-1, keepdim=True) / k
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias * m
    return y


def masked_rms_norm(x, mask, weight=None, eps=None):
    m = along(mask.to(x.dtype), x.ndim, x.ndim - 1)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    ms = (x * x * m).sum(-1, keepdim=True) / m.sum()
    y = x * m * torch.rsqrt(ms + eps)
    return y * weight if weight is not None else y


def masked_group_norm(x, num_groups, mask, weight=None, bias=None, eps=1e-5):
    """GroupNorm whose per-group statistics ignore masked channels."""
    b, c = x.shape[:2]
    m = along(mask.to(x.dtype), x.ndim, 1)
    xg = (x * m).reshape(b, num_groups, -1)
    mg = m.expand_as(x[:1]).reshape(1, num_groups, -1)
    k = mg.sum(-1, keepdim=True)
    mu = xg.sum(-1, keepdim=True) / k
    xc = (xg - mu) * mg
    var = (xc * xc).sum(-1, keepdim=True) / k
    y = (xc * torch.rsqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * along(weight, x.ndim, 1)
    if bias is not None:
        y = y + along(bias, x.ndim, 1) * m
    return y


def _channel_dims(x: torch.Tensor, dims: Any, size: int) -> tuple[tuple[int, ...], int] | None:
    if dims is None:
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    dims = tuple(d % x.ndim for d in dims)
    hits = [d for d in dims if x.shape[d] == size]
    return (dims, hits[-1]) if hits else None


def _masked_mean(x, dims, cdim, mask, keepdim):
    m = along(mask.to(x.dtype), x.ndim, cdim)
    count = m.sum()
    for d in dims:
        if d != cdim:
            count = count * x.shape[d]
    return (x * m).sum(dim=dims, keepdim=keepdim) / count, m, count


class _MaskedNormMode(TorchFunctionMode):
    """Active only inside one normalisation module: its channel statistics skip masked channels."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        size = self.mask.numel()
        if func is F.layer_norm:
            x, shape = args[0], args[1]
            w = args[2] if len(args) > 2 else kwargs.get("weight")
            b = args[3] if len(args) > 3 else kwargs.get("bias")
            eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
            if len(shape) == 1 and shape[0] == size:
                return masked_layer_norm(x, self.mask, w, b, eps)
        elif func is F.group_norm:
            x, groups = args[0], args[1]
            w = args[2] if len(args) > 2 else kwargs.get("weight")
            b = args[3] if len(args) > 3 else kwargs.get("bias")
            eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
            if x.shape[1] == size:
                return masked_group_norm(x, groups, self.mask, w, b, eps)
        elif func is getattr(F, "rms_norm", None):
            x, shape = args[0], args[1]
            w = args[2] if len(args) > 2 else kwargs.get("weight")
            eps = args[3] if len(args) > 3 else kwargs.get("eps")
            if len(shape) == 1 and shape[0] == size:
                return masked_rms_norm(x, self.mask, w, eps)
        elif func in (torch.mean, torch.Tensor.mean):
            x = args[0]
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            found = _channel_dims(x, dims, size) if isinstance(x, torch.Tensor) else None
            if found:
                keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
                return _masked_mean(x, found[0], found[1], self.mask, keep)[0]
        elif func in (torch.var_mean, torch.var, torch.Tensor.var, torch.std, torch.Tensor.std):
            x = args[0]
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            found = _channel_dims(x, dims, size) if isinstance(x, torch.Tensor) else None
            if found:
                keep = kwargs.get("keepdim", False)
                correction = kwargs.get("correction")
                if correction is None:
                    unbiased = kwargs.get("unbiased", args[2] if len(args) > 2 and isinstance(args[2], bool) else True)
                    correction = 1 if unbiased else 0
                mu, m, count = _masked_mean(x, found[0], found[1], self.mask, True)
                xc = (x - mu) * m
                var = (xc * xc).sum(dim=found[0], keepdim=keep) / (count - correction)
                if func in (torch.std, torch.Tensor.std):
                    return var.sqrt()
                if func is torch.var_mean:
                    return var, (mu if keep else mu.squeeze(found[0]))
                return var
        return func(*args, **kwargs)


# ================================================================================================ model

class MaskedModel(nn.Module):
    """``trunk`` + one head per task; forward computes task ``t``'s subnetwork through masks.

    Masks are set with :meth:`set_masks` (element masks per tensor, channel masks per normalisation module, a
    mask over the feature channels); per-task BatchNorm statistics with :meth:`use_stats`.
    """

    def __init__(self, trunk: nn.Module, num_features: int, norm_modules: list[str] = (), *,
                 weight_stats: bool = False):
        """``weight_stats``: layers that standardise their weight take its statistics over the kept weights only
        (structured masks, whose sliced layers hold only those; element masks keep their zeros in the export)."""
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict()
        self.num_features = num_features
        self.feature_dropout = 0.0
        self._tensor_masks: dict[str, torch.Tensor] = {}
        self._mask_sources: dict[str, torch.Tensor] = {}
        self._norm_masks: dict[str, torch.Tensor] = {}
        self._feature_mask: torch.Tensor | None = None
        self._alias_map: dict[str, list[str]] = {}
        self._cachers: list[nn.Module] = []
        self._stats: dict[str, torch.Tensor] = {}
        self._modes: dict[str, _MaskedNormMode] = {}
        self._hooks = []
        self._hook_fns: set[int] = set()
        for name in norm_modules:
            module = trunk.get_submodule(name)
            enter, leave = self._enter_norm(name, module), self._exit_norm(name)
            self._hook_fns.update({id(enter), id(leave)})
            self._hooks.append(module.register_forward_pre_hook(enter))
            self._hooks.append(module.register_forward_hook(leave, always_call=True))
        if weight_stats:
            for name, module in trunk.named_modules():
                if name and standardizes_weight(module):
                    enter, leave = self._enter_weight_stats(name, module), self._exit_norm(name)
                    self._hook_fns.update({id(enter), id(leave)})
                    self._hooks.append(module.register_forward_pre_hook(enter))
                    self._hooks.append(module.register_forward_hook(leave, always_call=True))

    def strip_hooks(self, module: nn.Module) -> nn.Module:
        """Remove this model's masked-norm hooks from a deep copy of the trunk (a copy must not see the masks)."""
        for m in module.modules():
            for table in (m._forward_pre_hooks, m._forward_hooks):
                for key in [k for k, fn in table.items() if id(fn) in self._hook_fns]:
                    del table[key]
                    m._forward_hooks_always_called.pop(key, None)
        return module

    # ------------------------------------------------------------------ hooks for masked normalisation
    def _enter_norm(self, name: str, owner: nn.Module):
        ref = weakref.ref(owner)

        def hook(module, args):
            # deep copies of the trunk (sliced subnetworks, exports) carry this hook too: only the module it was
            # registered on may apply this model's masks
            if module is not ref():
                return
            mask = self._norm_masks.get(name)
            if mask is not None:
                mode = _MaskedNormMode(mask)
                mode.__enter__()
                self._modes[name] = mode

        return hook

    def _enter_weight_stats(self, name: str, owner: nn.Module):
        ref, key = weakref.ref(owner), f"{name}.weight"

        def hook(module, args):
            if module is not ref():
                return
            mask = self._tensor_masks.get(key)
            if mask is not None:
                mode = WeightStatsMode(mask.expand(self._mask_sources[key].shape))
                mode.__enter__()
                self._modes[name] = mode

        return hook

    def _exit_norm(self, name: str):
        def hook(module, args, output):
            mode = self._modes.pop(name, None)
            if mode is not None:
                mode.__exit__(None, None, None)

        return hook

    # ------------------------------------------------------------------ state
    def set_masks(
        self,
        tensor_masks: dict[str, torch.Tensor],
        norm_masks: dict[str, torch.Tensor],
        feature_mask: torch.Tensor | None,
    ) -> None:
        """Install masks; tensors/modules not named are unmasked. All-ones masks should be left out (faster)."""
        self._tensor_masks = dict(tensor_masks)
        # the trunk's tensors behind the masks, looked up once here rather than on every forward (walking the
        # module tree per step cost a tenth of a small model's training step); parameters keep their identity
        named = dict(self.trunk.named_parameters())
        named.update(self.trunk.named_buffers())
        self._mask_sources = {name: named[name] for name in self._tensor_masks}
        self._alias_map = self._find_aliases()
        # modules that may cache tensors derived from their parameters in eval mode (TinyViT's and LeViT's
        # attention-bias caches): a cache filled under another task's masks must not answer for this one
        self._cachers = [m for m in self.trunk.modules()
                         if any(isinstance(v, dict) and not k.startswith("_") for k, v in vars(m).items())]
        self._norm_masks = dict(norm_masks)
        self._feature_mask = feature_mask

    def use_stats(self, stats: dict[str, torch.Tensor]) -> None:
        """Per-task running statistics (BatchNorm buffers), passed to the trunk on every forward."""
        self._stats = stats

    def add_head(self, task: int, num_classes: int) -> nn.Linear:
        head = nn.Linear(self.num_features, num_classes)
        param = next(self.trunk.parameters(), None)
        if param is not None:
            head = head.to(param.device)
        self.heads[str(task)] = head
        return head

    # ------------------------------------------------------------------ forward
    def masked_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = dict(self._stats)
        for name, mask in self._tensor_masks.items():
            out[name] = (out[name] if name in out else self._mask_sources[name]) * mask
        return out

    def _find_aliases(self) -> dict[str, list[str]]:
        """Other names of a tensor that live on a *different* module (a parameter tied between two layers); a
        module shared under two names is one object, so setting the tensor once covers both."""
        first: dict[int, str] = {}
        owners: dict[int, set[int]] = {}
        aliases: dict[str, list[str]] = {}
        named = list(self.trunk.named_parameters(remove_duplicate=False))
        for n, t in named + list(self.trunk.named_buffers(remove_duplicate=False)):
            owner = id(self.trunk.get_submodule(n.rpartition(".")[0]))
            if id(t) not in first:
                first[id(t)], owners[id(t)] = n, {owner}
            elif owner not in owners[id(t)]:
                owners[id(t)].add(owner)
                aliases.setdefault(first[id(t)], []).append(n)
        return aliases

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self.masked_tensors()
        if not self.training:
            for m in self._cachers:
                drop_tensor_caches(m)
        if tensors:
            # tie_weights=False: torch's tied-weights path leaves the substituted tensor behind in a module shared
            # under two names (CoaT's parallel blocks); true ties are passed under each name instead
            aliases = self._alias_map
            tensors.update({a: tensors[n] for n in list(tensors) for a in aliases.get(n, ())})
        f = functional_call(self.trunk, tensors, (x,), strict=False, tie_weights=False) if tensors else self.trunk(x)
        if self._feature_mask is not None:
            f = f * self._feature_mask
        return f

    def forward(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        """Logits of task ``task``; with a tensor of per-sample task ids (joint training), each sample goes
        through its own task's head and logits are padded to the widest head with -1e4."""
        f = self.features(x)
        if self.feature_dropout > 0:
            f = F.dropout(f, self.feature_dropout, self.training)
        if not isinstance(task, torch.Tensor):
            return self.heads[str(task)](f)
        width = max(h.out_features for h in self.heads.values())
        out = torch.full((x.shape[0], width), -1e4, device=f.device, dtype=f.dtype)
        for j in task.unique().tolist():
            sel = task == j
            logits = self.heads[str(j)](f[sel])
            out[sel, : logits.shape[1]] = logits
        return out
