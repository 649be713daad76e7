"""The structure walk: trace a module, refine its groups into units, and verify every group by parity.

Verification is what makes the walk general: for each group, a random subset of its units is switched off in
the masked dense model and physically sliced away in a copy, and both must compute the same features (on a copy
whose normalisation parameters were randomised, so that equality means something). Groups that fail — an
operation the tracer misread, a module with static shapes the slicer cannot update — are found by bisection
and either retried at a coarser granularity (plain channels instead of attention heads) or rejected, so the
exactness invariant holds for every group that stays prunable, on any architecture.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ModelError
from .slicing import kept_positions, slice_trunk
from .trace import trace_groups
from .units import Structure, build_structure

__all__ = ["walk", "verify_groups", "randomize_norms", "feature_count", "ParityReport"]


def feature_count(trunk: nn.Module, example: torch.Tensor) -> int:
    """The trunk's output width: timm's ``num_features`` contract, else measured with one forward."""
    nf = getattr(trunk, "num_features", None)
    with torch.no_grad():
        was = trunk.training
        trunk.eval()
        try:
            out = trunk(example)
        except Exception as e:
            raise ModelError(f"{type(trunk).__name__} does not run on an input of shape {tuple(example.shape)} "
                             f"({type(e).__name__}: {e})", "pick an input size the model accepts (--img-size)")
        finally:
            trunk.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = getattr(out, "shape", type(out).__name__)
        raise ModelError(f"{type(trunk).__name__} returns {shape}, not pooled features [batch, features]",
                         "pass a backbone without its classifier (timm: num_classes=0) that returns [B, F]")
    if isinstance(nf, int) and nf != out.shape[1]:
        return int(out.shape[1])
    return int(out.shape[1])


@torch.no_grad()
def randomize_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Give every 1-d parameter and BatchNorm statistic random values (timm zero-initialises some norms, which
    would make removed and kept channels indistinguishable)."""
    for p in module.parameters():
        if p.ndim <= 1 and p.numel() > 0:
            p.copy_(p + 0.25 * torch.randn(p.shape, generator=generator, dtype=p.dtype) + 0.1)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))


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
    from ..masked import MaskedModel
    from ..masks import UnitSpace

    space = UnitSpace(structure, {n for n, _ in trunk.named_parameters()})
    masked = MaskedModel(trunk, structure.num_features, norm_modules=list(structure.norm_units))
    masked.set_masks(space.tensor_masks(active), space.norm_masks(active), space.feature_mask(active))
    masked.eval()
    try:
        with torch.no_grad():
            y_masked = masked.features(example)
            sliced = slice_trunk(trunk, structure, active).eval()
            y_sliced = sliced(example)
        keep = kept_positions(structure.feature_unit_ids, active)
        y_ref = y_masked[:, keep]
        if y_ref.shape != y_sliced.shape:
            return ParityReport(False, float("inf"), f"shape {tuple(y_sliced.shape)} != {tuple(y_ref.shape)}")
        diff = float((y_ref - y_sliced).abs().max()) if y_ref.numel() else 0.0
        scale = max(1.0, float(y_ref.abs().max()) if y_ref.numel() else 1.0)
        ok = diff <= 1e-4 * scale and bool(torch.isfinite(y_sliced).all())
        return ParityReport(ok, diff)
    except Exception as e:  # a slicing that breaks the module is a failed check, not a crash
        return ParityReport(False, float("inf"), f"{type(e).__name__}: {e}"[:300])
    finally:
        for h in masked._hooks:
            h.remove()


def verify_groups(trunk: nn.Module, structure: Structure, example: torch.Tensor, *, seed: int = 0
                  ) -> tuple[Structure, dict[str, str]]:
    """Drop the groups of ``structure`` that break masked/sliced parity; returns the structure and the reasons."""
    gen = torch.Generator().manual_seed(seed)
    probe = copy.deepcopy(trunk).eval()
    randomize_norms(probe, gen)
    reasons: dict[str, str] = {}

    def check(names: list[str]) -> ParityReport:
        active = _random_active(structure, set(names), gen)
        return parity(probe, structure, active, example)

    def bisect(names: list[str], report: ParityReport) -> list[str]:
        if len(names) == 1:
            reasons[names[0]] = report.error or f"masked vs sliced max abs diff {report.max_abs_diff:.3g}"
            return names
        half = len(names) // 2
        bad: list[str] = []
        parts = [names[:half], names[half:]]
        reports = [check(p) for p in parts]
        for part, rep in zip(parts, reports):
            if not rep.ok:
                bad += bisect(part, rep)
        if not bad:  # the halves pass alone but fail together: keep the whole set out
            for n in names:
                reasons[n] = "fails only together with other groups"
            return names
        return bad

    names = [g.name for g in structure.groups if g.size >= 2]
    report = check(names) if names else ParityReport(True, 0.0)
    bad = [] if report.ok else bisect(names, report)
    return structure, {n: reasons[n] for n in bad}


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
    """
    nf = num_features or feature_count(trunk, example)
    name = model_name or type(trunk).__name__
    raw = trace_groups(trunk, example, nf)
    if layout is not None:
        heads = {g["name"] for g in layout if g["kind"] == "heads"}
        no_heads_saved = frozenset(r.root for r in raw) - heads
        structure = build_structure(trunk, raw, nf, name, no_heads=no_heads_saved)
        wanted = [g["name"] for g in layout]
        structure = structure.without({g.name: "not in the saved layout" for g in structure.groups
                                       if g.name not in set(wanted)})
        got = [(g.name, g.kind, g.size) for g in structure.groups]
        if got != [(g["name"], g["kind"], g["size"]) for g in layout]:
            raise ModelError("the backbone's structure differs from the one this run was trained with",
                             "resume with the same model, input size and anpyc version")
        return structure
    no_heads: set[str] = set()
    dropped: dict[str, str] = {}
    for attempt in range(6):
        structure = build_structure(trunk, raw, nf, name, no_heads=frozenset(no_heads))
        dropped.update({g.name: "a single unit" for g in structure.groups if g.size < 2})
        structure = structure.without(dropped)
        if not verify:
            return structure
        structure, bad = verify_groups(trunk, structure, example, seed=seed + attempt)
        if not bad:
            return structure
        kinds = {g.name: g.kind for g in structure.groups}
        for n, why in bad.items():
            if kinds.get(n) == "heads" and n not in no_heads:
                no_heads.add(n)  # heads that cannot be removed may still be prunable channel by channel
            else:
                dropped[n] = f"failed parity: {why}"
    return structure.without({g.name: "failed parity" for g in structure.groups})
