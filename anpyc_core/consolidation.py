"""Consolidation rules: how parameters that earlier tasks use are protected while a later task trains.

A rule sees, per trunk parameter, the consolidated importance ``omega``, the anchor ``theta*`` (the weights at
the start of the task) and the ``old`` mask (elements an earlier task's subnetwork uses). Rules (a registry):

* ``none`` — fine-tuning;
* ``quadratic`` — loss += strength * sum(omega~ * (theta - theta*)^2) over old elements;
* ``gate`` — quadratic, plus an element-wise gradient gate ``grad *= 1 - clamp(omega~ / q, 0, 1)`` on old
  elements, ``q`` the ``gate_quantile`` of omega~ over old elements (the most important ones are frozen, the
  rest slowed in proportion);
* ``hard`` — every old element frozen (the PackNet-like limit case): gradients zeroed before every step and values
  restored at the end of every epoch, so an earlier task's outputs cannot move at all.

``omega~`` is omega divided by its mean over the old elements, so ``strength`` means the same thing whatever the
measure, model or batch size.
"""

from __future__ import annotations

import torch

from .config import ConsolidationConfig
from .registry import Registry

__all__ = ["CONSOLIDATION", "ACCUMULATE", "Consolidation", "Stack", "create_consolidation", "accumulate_omega",
           "pull_toward"]

CONSOLIDATION: Registry = Registry("consolidation rule")
# how a task's importance joins the consolidated importance of the tasks before it (importance.accumulate)
ACCUMULATE: Registry = Registry("importance accumulation")
ACCUMULATE.register("sum", torch.add, help="Omega <- Omega + Omega_t (the original with pruning)")
ACCUMULATE.register("max", torch.maximum, help="Omega <- max(Omega, Omega_t) (the original without pruning)")


def _sample_quantile(values: list[torch.Tensor], q: float, limit: int = 1 << 20) -> float:
    flat = torch.cat([v.flatten() for v in values]) if values else torch.zeros(1)
    if flat.numel() == 0:
        return 1.0
    if flat.numel() > limit:
        idx = torch.randint(flat.numel(), (limit,), generator=torch.Generator().manual_seed(0))
        flat = flat[idx]
    k = max(1, min(flat.numel(), int(round(q * flat.numel()))))
    return float(flat.kthvalue(k).values)


class Consolidation:
    """Base rule: no protection. Subclasses override the hooks they need; ``uses_omega`` says whether the rule
    reads the consolidated importance (the learner only accumulates it for rules that do)."""

    uses_omega = False

    def __init__(self, cfg: ConsolidationConfig):
        self.cfg = cfg
        self.omega: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.old: dict[str, torch.Tensor] = {}

    def begin(self, params: dict[str, torch.Tensor], omega: dict[str, torch.Tensor],
              anchor: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> None:
        """Prepare for a task: ``old[name]`` is a bool mask of the elements earlier tasks use."""
        self.old = {n: m for n, m in old.items() if bool(m.any())}
        self.anchor = {n: anchor[n] for n in self.old if n in anchor}
        vals = [omega[n][self.old[n]] for n in self.old if n in omega]
        nonzero = [v[v > 0] for v in vals]
        count = sum(int(v.numel()) for v in nonzero)
        mean = float(sum(float(v.sum()) for v in nonzero) / count) if count else 1.0
        self.omega = {n: (omega[n] / mean) * self.old[n] for n in self.old if n in omega}

    def penalty(self, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def gate(self, params: dict[str, torch.Tensor]) -> None:
        """Modify gradients in place before the optimizer step."""

    def after_step(self, params: dict[str, torch.Tensor]) -> None:
        """Fix parameters in place after the optimizer step."""

    def end_epoch(self, params: dict[str, torch.Tensor]) -> None:
        """Fix parameters in place at the end of an epoch (before anything evaluates or saves them)."""


@CONSOLIDATION.register("none")
class NoConsolidation(Consolidation):
    """Fine-tuning: nothing is protected."""


@CONSOLIDATION.register("quadratic")
class Quadratic(Consolidation):
    """strength * sum(omega~ * (theta - theta*)^2) over old elements."""

    uses_omega = True

    def penalty(self, params):
        total = None
        for n, w in self.omega.items():
            d = params[n] - self.anchor[n]
            term = (w * d * d).sum()
            total = term if total is None else total + term
        return None if total is None else self.cfg.strength * total


@CONSOLIDATION.register("gate")
class Gate(Quadratic):
    """Quadratic penalty plus an element-wise gradient gate from normalised importance."""

    def begin(self, params, omega, anchor, old):
        super().begin(params, omega, anchor, old)
        q = _sample_quantile([w[self.old[n]] for n, w in self.omega.items()], self.cfg.gate_quantile)
        q = q if q > 0 else 1.0
        self.keep = {n: 1.0 - (w / q).clamp(0, 1) * self.old[n] for n, w in self.omega.items()}

    def gate(self, params):
        for n, k in self.keep.items():
            g = params[n].grad
            if g is not None:
                g.mul_(k)


@CONSOLIDATION.register("hard")
class Hard(Consolidation):
    """Freeze every element an earlier task uses (PackNet-like).

    Gradients of old elements are multiplied by zero before every step (a float multiply is ~25x faster than a
    boolean ``masked_fill_`` on CPU). An element whose gradient is zero from the start of a phase cannot move under
    the loop's optimisers (SGD/momentum and Adam start from zero state every phase; weight decay is applied by the
    loop to new elements only), so old values are restored exactly once per epoch, before anything evaluates or
    saves them, not after every step. A non-finite gradient turns into NaN here and stops training as a divergence
    with the last good state kept."""

    def begin(self, params, omega, anchor, old):
        super().begin(params, omega, anchor, old)
        self.keep = {n: (~m).to(params[n].dtype) for n, m in self.old.items() if n in params}

    def gate(self, params):
        for n, k in self.keep.items():
            g = params[n].grad
            if g is not None:
                g.mul_(k)

    @torch.no_grad()
    def end_epoch(self, params):
        for n, m in self.old.items():
            params[n].copy_(torch.where(m, self.anchor[n], params[n]))


def create_consolidation(cfg: ConsolidationConfig) -> Consolidation:
    return CONSOLIDATION.get(cfg.rule)(cfg)


class Stack(Consolidation):
    """Several rules at once (their penalties add up; every hook runs in order)."""

    def __init__(self, rules: list[Consolidation]):
        self.rules = rules

    def penalty(self, params):
        terms = [t for t in (r.penalty(params) for r in self.rules) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def gate(self, params):
        for r in self.rules:
            r.gate(params)

    def after_step(self, params):
        for r in self.rules:
            r.after_step(params)

    def end_epoch(self, params):
        for r in self.rules:
            r.end_epoch(params)


class _Pull(Consolidation):
    def __init__(self, strength: float, weight: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]):
        self.strength, self.weight, self.anchor = strength, weight, anchor

    def penalty(self, params):
        terms = [(w * (params[n] - self.anchor[n]).pow(2)).sum() for n, w in self.weight.items()]
        return self.strength * sum(terms[1:], terms[0]) if terms else None


def pull_toward(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], importance: dict[str, torch.Tensor],
                own: dict[str, torch.Tensor], strength: float, quantile: float = 0.99) -> Consolidation:
    """The within-task consolidation of a prune step: ``strength * sum(w * (theta - anchor)^2)`` over the elements
    ``own`` marks (what the task keeps), with ``w`` the task's importance scaled by its ``quantile`` over those
    elements and clipped to [0, 1], ``anchor`` the weights before the step. Pruning releases what the task needs
    least; this pulls what it needs most back to where it was while the rest retrains around the gap. (Clipping
    keeps the pull stable under plain SGD: an element with weight w is stable while lr * 2 * strength * w < 2 *
    (1 + momentum), and importance has a long tail.)"""
    q = _sample_quantile([importance[n][own[n]] for n in own if n in importance and bool(own[n].any())], quantile)
    q = q if q > 0 else 1.0
    weight = {n: (importance[n] / q).clamp(0, 1) * own[n] for n in own if n in importance and bool(own[n].any())}
    return _Pull(strength, weight, {n: anchor[n] for n in weight})


def accumulate_omega(omega: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                     owned: dict[str, torch.Tensor], rule: str) -> dict[str, torch.Tensor]:
    """The consolidated importance after a task: its ``scores`` join ``omega`` by ``ACCUMULATE[rule]``, and every
    element no task owns any more (``owned[name]`` is False: released to the free pool) drops its importance."""
    acc = ACCUMULATE.get(rule)
    out = dict(omega)
    for n, s in scores.items():
        s = s * owned[n].to(s.device)
        prev = out.get(n)
        out[n] = s if prev is None else acc(prev, s)
    return {n: v * owned[n].to(v.device) for n, v in out.items()}
