"""Importance measures: how much each parameter element matters to a task (a registry of measures).

Every measure returns element-wise scores for the trunk's parameters; :meth:`anpyc.masks.MaskSpace.unit_scores`
aggregates them over everything a unit owns (structure-aware importance). Measures:

* ``entropy_taylor`` (ANPyC, label-free): ``relu(g*theta + 0.5*(g*theta)^2)`` with ``g`` the gradient of the
  output entropy, averaged over batches. The entropy is the *batch mean* (not the batch sum of the original),
  so ``g`` is an average per-sample gradient and the scores do not grow with the batch size.
* ``magnitude`` (PackNet): ``|theta|``.
* ``fisher`` (EWC): the empirical Fisher, estimated per mini-batch as ``B * (batch-mean gradient)^2`` of the
  cross-entropy (an unbiased estimate of the mean per-sample squared gradient when the mean gradient is ~0, as at
  the end of training), so it does not depend on the batch size.
* ``mas`` (Memory Aware Synapses): mean absolute gradient of the squared L2 norm of the outputs (label-free).
* ``si`` (Synaptic Intelligence): the path integral ``-sum g * delta_theta`` accumulated while training,
  divided by ``(total change)^2 + xi``.

A measure is a class with optional training hooks (``begin``, ``after_backward``, ``after_step``) in the style
of Avalanche plugins, and ``compute``.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .registry import Registry

__all__ = ["IMPORTANCE", "Importance", "EntropyTaylor", "Magnitude", "Fisher", "MAS", "SI", "create_importance",
           "task_importance"]

IMPORTANCE: Registry = Registry("importance measure")

Forward = Callable[[torch.Tensor], torch.Tensor]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class Importance:
    """Base class: no-op hooks; subclasses implement :meth:`compute`."""

    needs_data = True

    def begin(self, params: dict[str, torch.Tensor]) -> None:
        """Called when a task starts training."""

    def after_backward(self, params: dict[str, torch.Tensor]) -> None:
        """Called after every backward pass of the task's training (gradients are in ``p.grad``)."""

    def after_step(self, params: dict[str, torch.Tensor]) -> None:
        """Called after every optimizer step of the task's training."""

    def compute(self, forward: Forward, params: dict[str, torch.Tensor], batches: Batches) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (for measures that accumulate during training)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


def _grad_scores(forward: Forward, params: dict[str, torch.Tensor], batches: Batches,
                 objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 score: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    names = list(params)
    tensors = [params[n] for n in names]
    for x, y in batches:
        with torch.enable_grad():
            loss = objective(forward(x), y)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for n, p, g in zip(names, tensors, grads):
            if g is not None:
                total[n] += score(g.detach().float(), p.detach().float(), int(x.shape[0]))
        count += 1
    return {n: t / max(count, 1) for n, t in total.items()}


def _entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


@IMPORTANCE.register("entropy_taylor")
class EntropyTaylor(Importance):
    """ANPyC: second-order Taylor estimate of the change in output entropy, label-free."""

    def compute(self, forward, params, batches):
        def score(g, p, b):
            gp = g * p
            return torch.relu(gp + 0.5 * gp * gp)

        return _grad_scores(forward, params, batches, _entropy, score)


@IMPORTANCE.register("magnitude")
class Magnitude(Importance):
    """PackNet: absolute weight value."""

    needs_data = False

    def compute(self, forward, params, batches):
        return {n: p.detach().abs().float() for n, p in params.items()}


@IMPORTANCE.register("fisher")
class Fisher(Importance):
    """EWC: empirical Fisher of the cross-entropy, ``B * (batch-mean gradient)^2`` per mini-batch."""

    def compute(self, forward, params, batches):
        return _grad_scores(forward, params, batches, lambda out, y: F.cross_entropy(out, y),
                            lambda g, p, b: b * g * g)


@IMPORTANCE.register("mas")
class MAS(Importance):
    """Memory Aware Synapses: mean |gradient| of the squared L2 norm of the outputs, label-free."""

    def compute(self, forward, params, batches):
        return _grad_scores(forward, params, batches, lambda out, y: out.float().pow(2).sum(1).mean(),
                            lambda g, p, b: g.abs())


@IMPORTANCE.register("si")
class SI(Importance):
    """Synaptic Intelligence: path integral of the loss along the training trajectory."""

    needs_data = False

    def __init__(self, xi: float = 0.1):
        self.xi = xi
        self.omega: dict[str, torch.Tensor] = {}
        self.start: dict[str, torch.Tensor] = {}
        self.prev: dict[str, torch.Tensor] = {}
        self.grad: dict[str, torch.Tensor] = {}

    def begin(self, params):
        self.omega = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.start = {n: p.detach().float().clone() for n, p in params.items()}
        self.prev = {n: p.detach().float().clone() for n, p in params.items()}

    def after_backward(self, params):
        self.grad = {n: p.grad.detach().float().clone() for n, p in params.items() if p.grad is not None}

    def after_step(self, params):
        for n, p in params.items():
            cur = p.detach().float()
            g = self.grad.get(n)
            if g is not None and n in self.omega:
                self.omega[n] -= g * (cur - self.prev[n])
            self.prev[n] = cur.clone()

    def compute(self, forward, params, batches):
        out = {}
        for n, p in params.items():
            if n not in self.omega:
                out[n] = torch.zeros_like(p, dtype=torch.float32)
                continue
            delta = p.detach().float() - self.start[n]
            out[n] = torch.relu(self.omega[n]) / (delta * delta + self.xi)
        return out

    def state(self):
        out = {}
        for key, table in (("omega", self.omega), ("start", self.start), ("prev", self.prev)):
            out.update({f"{key}/{n}": t for n, t in table.items()})
        return out

    def load_state(self, tensors):
        for key in ("omega", "start", "prev"):
            setattr(self, key, {k[len(key) + 1:]: v.clone() for k, v in tensors.items() if k.startswith(key + "/")})


def create_importance(name: str) -> Importance:
    return IMPORTANCE.get(name)()


def task_importance(measure: Importance, forward: Forward, params: dict[str, torch.Tensor], dataset, cfg, seed: int,
                    device: torch.device, ctx, feed=None) -> dict[str, torch.Tensor]:
    """``measure``'s element scores of ``params`` on up to ``cfg.max_batches`` seeded batches of ``dataset``
    (``cfg``: an :class:`~anpyc.config.ImportanceConfig`), averaged across ranks under torchrun."""
    from .training import take_batches

    batches = take_batches(dataset, cfg.batch_size, cfg.max_batches, seed, device, ctx, feed)
    scores = measure.compute(forward, params, batches)
    for s in scores.values():
        ctx.all_reduce_mean_(s)
    return scores

