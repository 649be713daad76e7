"""The structure walk: trace a module, refine its groups into units, and verify every group by parity.

Verification is what makes the walk general: for each group, a random subset of its units is switched off in
the masked dense model and physically sliced away in a copy, and both must compute the same features (on a copy
whose normalisation parameters were randomised, so that equality means something). Groups that fail — an
operation the tracer misread, a module with static shapes the slicer cannot update — are found by bisection
and retried another way before they are rejected: the heads of an attention module in another layout, only
its core groups, or as plain channels; a channel group with its parents' stored widths updated too. So the
exactness invariant holds for every group that stays prunable, on any architecture, and every rejection says
why.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ModelError, clip
from .explain import Break, locate_break
from .layers import norm_kind
from .masked import MaskedModel
from .slicing import kept_positions, slice_trunk
from .trace import trace_groups
from .attention import HEAD_MODES
from .build import PARENTS_SUFFIX, attention_owners, build_structure
from .units import Rejected, Structure

__all__ = ["walk", "verify_groups", "randomize_norms", "randomize_weights", "verification_probe", "feature_count",
           "ParityReport", "channel_stat_modules"]


def feature_count(trunk: nn.Module, example: torch.Tensor) -> int:
    """The trunk's output width, measured with one forward on ``example`` (in eval mode).

    The forward is the check as well: a trunk that fails on the input, or returns anything but pooled
    ``[batch, features]``, is refused with the fix. timm's ``num_features`` attribute is not read: it names the
    width before the pre-logits head, which is not what ``forward`` returns on every model (MobileNetV3's
    ``head_hidden_size``), and a torch module need not have it at all.
    """
    with torch.no_grad():
        was = trunk.training
        trunk.eval()
        try:
            out = trunk(example)
        except Exception as e:
            raise ModelError(f"{type(trunk).__name__} does not run on an input of shape {tuple(example.shape)} "
                             f"({type(e).__name__}: {e})",
                             "pick an input size the model accepts (--img-size)") from None
        finally:
            trunk.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = getattr(out, "shape", type(out).__name__)
        raise ModelError(f"{type(trunk).__name__} returns {shape}, not pooled features [batch, features]",
                         "pass a backbone without its classifier (timm: num_classes=0) that returns [B, F]")
    return int(out.shape[1])


@torch.no_grad()
def randomize_norms(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every 1-d parameter a random shift and BatchNorm layers random statistics, with every normalisation
    weight at least 0.5 in magnitude: timm zero-initialises some norms, which would make removed and kept channels
    indistinguishable, so equal outputs would prove nothing. Returns ``module``."""
    for p in module.parameters():
        if p.ndim <= 1 and p.numel() > 0:
            p.copy_(p + 0.25 * torch.randn(p.shape, generator=generator, dtype=p.dtype) + 0.1)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
        w = getattr(m, "weight", None)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) and w is not None:
            w.copy_(torch.where(w < 0, torch.clamp(w, max=-0.5), torch.clamp(w, min=0.5)))
    return module


@torch.no_grad()
def randomize_weights(module: nn.Module, generator: torch.Generator, gain: float = 1.0) -> nn.Module:
    """Redraw every parameter of two or more dimensions at unit gain (std ``gain / sqrt(fan in)``, fan in = one
    output slice). Freshly initialised timm weights are small (std 0.02): through a few such layers a wrong slicing
    upstream shrinks below the parity tolerance by the features (TinyViT's head layout differed by 0.6 inside its
    attention and by 2e-6 at the features), and zero-initialised tables (attention biases) hide per-head mistakes.
    Returns ``module``."""
    for p in module.parameters():
        if p.ndim >= 2 and p.is_floating_point() and p.numel():
            std = gain / math.sqrt(max(1, p[0].numel()))
            p.copy_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


@torch.no_grad()
def verification_probe(trunk: nn.Module, example: torch.Tensor, generator: torch.Generator) -> nn.Module:
    """A copy of ``trunk`` (eval) on which masked/sliced parity means something: weights at unit gain, norms and
    biases randomised. The gain is halved until its features on ``example`` are finite and below 1e4 (deep stacks
    without normalisation grow); if none is, the copy keeps its weights and gets random norms only."""
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
    for gain in (1.0, 0.5, 0.25, 0.125):
        probe = randomize_norms(randomize_weights(copy.deepcopy(trunk).eval(), torch.Generator().manual_seed(seed),
                                                  gain), torch.Generator().manual_seed(seed + 1))
        try:
            y = probe(example)
        except Exception:
            break
        if bool(torch.isfinite(y).all()) and float(y.abs().max()) < 1e4:
            return probe
    return randomize_norms(copy.deepcopy(trunk).eval(), generator)


@dataclass
class ParityReport:
    ok: bool
    max_abs_diff: float
    error: str = ""


def _random_active(structure: Structure, names: set[str], generator: torch.Generator) -> torch.Tensor:
    active = torch.ones(structure.num_units, dtype=torch.bool)
    for g in structure.groups:
        if g.name not in names or g.size < 2:
            continue
        keep = torch.rand(g.size, generator=generator) < 0.5
        keep[int(torch.randint(g.size, (1,), generator=generator))] = True
        if bool(keep.all()):
            keep[int(torch.randint(g.size, (1,), generator=generator))] = False
            if not bool(keep.any()):
                keep[0] = True
        active[g.offset: g.offset + g.size] = keep
    return active


def parity(trunk: nn.Module, structure: Structure, active: torch.Tensor, example: torch.Tensor) -> ParityReport:
    """Masked dense features vs physically sliced features for ``active`` (``trunk`` is used as given)."""
    try:  # sliced first: a copy made while the masked model's norm hooks sit on the trunk would carry them along
        sliced = slice_trunk(trunk, structure, active).eval()
    except Exception as e:
        return ParityReport(False, float("inf"), clip(f"{type(e).__name__}: {e}", 300))
    try:
        y_ref = masked_features(trunk, structure, active, example)
        with torch.no_grad():
            y_sliced = sliced(example)
        if y_ref.shape != y_sliced.shape:
            return ParityReport(False, float("inf"), f"shape {tuple(y_sliced.shape)} != {tuple(y_ref.shape)}")
        ok, diff = close(y_ref, y_sliced)
        return ParityReport(ok, diff)
    except Exception as e:  # a slicing that breaks the module is a failed check, not a crash
        return ParityReport(False, float("inf"), clip(f"{type(e).__name__}: {e}", 300))


def masked_features(trunk: nn.Module, structure: Structure, active: torch.Tensor, example: torch.Tensor
                    ) -> torch.Tensor:
    """The features of ``trunk`` run masked to the ``active`` units (eval mode), at the kept feature positions; the
    masked model's hooks are removed again."""
    masked = MaskedModel(trunk, structure.num_features, norm_modules=list(structure.norm_units), weight_stats=True)
    params = {n for n, _ in trunk.named_parameters()}
    try:
        masked.set_masks(structure.tensor_masks(active, params), structure.norm_masks(active),
                         structure.feature_mask(active))
        masked.eval()
        with torch.no_grad():
            return masked.features(example)[:, kept_positions(structure.feature_unit_ids, active)]
    finally:
        for h in masked._hooks:
            h.remove()


def close(ref: torch.Tensor, y: torch.Tensor) -> tuple[bool, float]:
    """The parity rule: ``y`` is finite and within 1e-4 of ``ref``'s scale (at least 1); returns ``(ok, max diff)``."""
    diff = float((ref - y).abs().max()) if ref.numel() else 0.0
    scale = max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
    return diff <= 1e-4 * scale and bool(torch.isfinite(y).all()), diff


def verify_groups(trunk: nn.Module, structure: Structure, example: torch.Tensor, *, seed: int = 0, rounds: int = 2,
                  located: dict[str, Break] | None = None) -> tuple[Structure, dict[str, str]]:
    """Drop the groups of ``structure`` that break masked/sliced parity; returns the structure and the reasons.

    Each round draws one random subset of every group's units; failures are bisected with that same draw (the
    other groups fully kept), so a failure is pinned on the groups that cause it, not on a luckier redraw. Groups
    that pass alone but fail together lose only the members the conflict needs: the others are added back as long
    as the set still passes. With
    ``located``, every failing group's entry is set to where its parity broke (:func:`.explain.locate_break`).
    """
    gen = torch.Generator().manual_seed(seed)
    probe = verification_probe(trunk, example, gen)
    reasons: dict[str, str] = {}
    by_name = {g.name: g for g in structure.groups}

    def active_for(names: list[str], draw: torch.Tensor) -> torch.Tensor:
        active = torch.ones(structure.num_units, dtype=torch.bool)
        for n in names:
            g = by_name[n]
            active[g.offset: g.offset + g.size] = draw[g.offset: g.offset + g.size]
        return active

    def check(names: list[str], draw: torch.Tensor) -> ParityReport:
        return parity(probe, structure, active_for(names, draw), example)

    def locate(names: list[str], draw: torch.Tensor) -> None:
        if located is not None:
            where = locate_break(probe, structure, active_for(names, draw), example)
            located.update({n: where for n in names})

    def bisect(names: list[str], report: ParityReport, draw: torch.Tensor) -> list[str]:
        if len(names) == 1:
            reasons[names[0]] = report.error or f"masked vs sliced max abs diff {report.max_abs_diff:.3g}"
            locate(names, draw)
            return names
        half = len(names) // 2
        bad: list[str] = []
        for part in (names[:half], names[half:]):
            rep = check(part, draw)
            if not rep.ok:
                bad += bisect(part, rep, draw)
        if not bad:  # the halves pass alone but fail together: keep the first, add back what passes beside it
            return add_back(list(names[:half]), list(names[half:]), report, draw)
        return bad

    def add_back(accepted: list[str], candidates: list[str], report: ParityReport, draw: torch.Tensor) -> list[str]:
        """Extend ``accepted`` (groups that pass together) by the ``candidates`` that still pass beside them,
        bisecting the candidates; returns the ones that do not. A conflict costs the groups in it, not the set."""
        if not candidates:
            return []
        rep = check(accepted + candidates, draw)
        if rep.ok:
            accepted += candidates
            return []
        if len(candidates) == 1:
            why = rep.error or f"max abs diff {rep.max_abs_diff:.3g}"
            reasons[candidates[0]] = f"fails only together with other groups ({why})"
            locate(candidates, draw)
            return candidates
        half = len(candidates) // 2
        return add_back(accepted, candidates[:half], rep, draw) + add_back(accepted, candidates[half:], rep, draw)

    names = [g.name for g in structure.groups if g.size >= 2]
    bad: list[str] = []
    for _ in range(rounds):
        names = [n for n in names if n not in bad]
        if not names:
            break
        draw = _random_active(structure, set(names), gen)
        report = check(names, draw)
        if not report.ok:
            bad += bisect(names, report, draw)
    return structure, {n: reasons[n] for n in bad}


def channel_stat_modules(trunk: nn.Module, example: torch.Tensor) -> frozenset[str]:
    """Modules that compute a mean or variance across their own channels (e.g. ConvNeXt-V2's global response norm)
    without being a known norm layer: found by running ``example`` once and watching the reductions each module
    makes. Removing a channel changes such a statistic, so the masked model must compute it over kept channels."""
    from torch.overrides import TorchFunctionMode

    known = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
             nn.Embedding, nn.PReLU)
    sizes: dict[nn.Module, set[int]] = {}
    names: dict[nn.Module, str] = {}
    for name, m in trunk.named_modules():
        if isinstance(m, known) or norm_kind(m) is not None:
            continue
        own = {int(p.shape[0]) for p in m.parameters(recurse=False) if p.ndim == 1 and p.numel() > 1}
        if own:
            sizes[m], names[m] = own, name
    if not sizes:
        return frozenset()
    stack: list[nn.Module] = []
    found: set[str] = set()
    reductions = {torch.mean, torch.Tensor.mean, torch.var, torch.Tensor.var, torch.std, torch.Tensor.std,
                  torch.var_mean, torch.std_mean}

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if stack and func in reductions and args and isinstance(args[0], torch.Tensor):
                x = args[0]
                dims = args[1] if len(args) > 1 and not isinstance(args[1], bool) else kwargs.get("dim")
                if dims is not None:
                    dims = (dims,) if isinstance(dims, int) else tuple(dims)
                    if any(x.shape[d % x.ndim] in sizes[stack[-1]] for d in dims):
                        found.add(names[stack[-1]])
            return func(*args, **kwargs)

    def enter(mod, args):
        stack.append(mod)

    def leave(mod, args, out):
        stack.pop()

    hooks = []
    for m in sizes:
        hooks.append(m.register_forward_pre_hook(enter))
        hooks.append(m.register_forward_hook(leave, always_call=True))
    was = trunk.training
    trunk.eval()
    try:
        with torch.no_grad(), Watch():
            trunk(example)
    except Exception:
        return frozenset()
    finally:
        for h in hooks:
            h.remove()
        trunk.train(was)
    return frozenset(found)


def _next_mode(mode: str) -> str:
    i = HEAD_MODES.index(mode) if mode in HEAD_MODES else 0
    return HEAD_MODES[min(i + 1, len(HEAD_MODES) - 1)]


def _modes_from_layout(trunk, raw, layout: list[dict]) -> dict[str, str]:
    """The head layout of every attention module, as recorded by the kinds of a saved layout's groups."""
    owner = attention_owners(trunk, raw)
    modes = {a: "off" for a in set(owner.values())}
    for g in layout:
        if str(g["kind"]).startswith("heads") and g["name"] in owner:
            modes[owner[g["name"]]] = g["kind"]
    return modes


def walk(
    trunk: nn.Module,
    example: torch.Tensor,
    *,
    num_features: int | None = None,
    verify: bool = True,
    seed: int = 0,
    model_name: str | None = None,
    layout: list[dict] | None = None,
) -> Structure:
    """Find the prunable unit groups of ``trunk`` (any nn.Module returning ``[B, F]`` features) on ``example``.

    With ``layout`` (the ``groups`` of a saved mask schema: name, kind, size), the walk rebuilds exactly that
    layout without re-verifying, so a resumed run gets the units it was trained with.

    A group that fails verification is retried more coarsely before it is rejected: the heads of an attention
    module are tried in the standard layout, then head-major, then as plain channels.
    """
    nf = num_features or feature_count(trunk, example)
    name = model_name or type(trunk).__name__
    raw = trace_groups(trunk, example, nf)
    stats = channel_stat_modules(trunk, example)
    if layout is not None:
        modes = _modes_from_layout(trunk, raw, layout)
        synced = frozenset(g["name"] for g in layout if str(g["kind"]).endswith(PARENTS_SUFFIX))
        structure = build_structure(trunk, raw, nf, name, head_modes=modes, stat_modules=stats, parent_sync=synced)
        wanted = {g["name"] for g in layout}
        structure = structure.without({g.name: "not in the saved layout" for g in structure.groups
                                       if g.name not in wanted})
        got = [(g.name, g.kind, g.size) for g in structure.groups]
        if got != [(g["name"], g["kind"], g["size"]) for g in layout]:
            raise ModelError("the backbone's structure differs from the one this run was trained with",
                             "resume with the same model, input size and anpyc version")
        return structure
    modes: dict[str, str] = {}
    head_failures: dict[str, str] = {}
    dropped: dict[str, str] = {}
    synced: set[str] = set()
    first_failure: dict[str, str] = {}
    located: dict[str, Break] = {}
    structure = None
    for attempt in range(12):
        structure = build_structure(trunk, raw, nf, name, head_modes=modes, stat_modules=stats,
                                    parent_sync=frozenset(synced))
        dropped.update({g.name: "a single unit" for g in structure.groups if g.size < 2})
        structure = structure.without(dropped)
        if not verify:
            return structure
        structure, bad = verify_groups(trunk, structure, example, seed=seed + attempt, located=located)
        if not bad:
            return _annotate(structure, head_failures)
        by_name = {g.name: g for g in structure.groups}
        for n, why in bad.items():
            g = by_name[n]
            if g.attention and modes.get(g.attention[0].module, "heads") != "off":
                a = g.attention[0].module  # heads that cannot be removed may still be prunable another way
                modes[a] = _next_mode(modes.get(a, "heads"))
                head_failures[a] = why
            elif n not in synced:
                synced.add(n)  # a parent module may store the width it slices; retry updating it
                first_failure[n] = why
            else:
                first = first_failure.get(n, why)
                where = located.get(n, Break("", float("nan")))
                dropped[n] = Rejected(n, f"failed parity: {first}" + (f" (also with parent widths: {why})"
                                                                       if why != first else ""),
                                      where.tensor, where.max_abs_diff if where.tensor else None)
    return _annotate(structure.without({g.name: "failed parity" for g in structure.groups}), head_failures)


def _annotate(structure: Structure, head_failures: dict[str, str]) -> Structure:
    """Say, for groups rejected inside an attention module, why its heads were not prunable either."""
    if not head_failures:
        return structure
    rejected = []
    for r in structure.rejected:
        a = next((m for m in head_failures if r.name.startswith(m + ".")), None)
        rejected.append(dataclasses.replace(r, reason=clip(f"{r.reason}; as heads: {head_failures[a]}", 400))
                        if a is not None else r)
    structure.rejected = rejected
    return structure
