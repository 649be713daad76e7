"""Tracing: from any nn.Module and an example input to raw coupled channel groups.

Torch-Pruning's ``DependencyGraph`` does the tracing (it follows autograd, so it works on models torch.fx
cannot trace); this module wraps it and converts its groups into plain records (names and index lists), so
nothing downstream depends on Torch-Pruning's types and the graph can be dropped right after the walk.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import ModelError, clip
from .tp_patches import guarded_index_mapping
from .unionfind import UnionFind

__all__ = ["RawItem", "RawGroup", "trace_groups", "PROBE"]

PROBE = "__anpyc_probe__"


@dataclass
class RawItem:
    """One member of a coupled group: channels ``positions`` of a module's ``direction`` side, or of a parameter's
    dimension ``dim``; ``roots[i]`` is the group-root index that position ``positions[i]`` moves with."""

    target: str
    kind: str  # "module" | "param"
    direction: str  # "out" | "in" (modules); "param" for bare parameters
    positions: list[int]
    roots: list[int]
    dim: int | None = None


@dataclass
class RawGroup:
    """A traced group rooted at a conv/linear output; ``problem`` says why its trace cannot be trusted (an index
    mapping of Torch-Pruning failed on an operation it passes through), in which case it is rejected downstream."""

    root: str
    size: int
    items: list[RawItem] = field(default_factory=list)
    problem: str | None = None


class _Probe(nn.Module):
    """The trunk followed by a 1-output linear layer: the probe marks which group the feature channels are in."""

    def __init__(self, trunk: nn.Module, num_features: int):
        super().__init__()
        self.trunk = trunk
        setattr(self, PROBE, nn.Linear(num_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, PROBE)(self.trunk(x))


def trace_groups(trunk: nn.Module, example: torch.Tensor, num_features: int) -> list[RawGroup]:
    """Coupled channel groups of ``trunk`` (every conv/linear output starts one, and every unidirectional LSTM's
    hidden units), traced on ``example``.

    Items on the probe head carry target ``PROBE``; they mark the feature channels.
    """
    import torch_pruning as tp

    wrapper = _Probe(trunk, num_features)
    was_training = trunk.training
    prefix = "trunk."
    names = {m: n[len(prefix):] if n.startswith(prefix) else n for n, m in wrapper.named_modules()}
    pnames = {id(p): n[len(prefix):] for n, p in wrapper.named_parameters() if n.startswith(prefix)}
    probe = getattr(wrapper, PROBE)
    names[probe] = PROBE
    problems: dict[int, str] = {}
    errors = []
    dg = None
    # a second attempt on a single-sample batch: a few models trace differently (or only) without batch statistics
    for ex in (example, example[:1]):
        problems.clear()
        try:
            with warnings.catch_warnings(), guarded_index_mapping(problems):
                warnings.simplefilter("ignore")
                with torch.enable_grad():
                    dg = tp.DependencyGraph().build_dependency(wrapper, example_inputs=ex, verbose=False)
            break
        except Exception as e:  # tracing is best-effort; the caller reports the model as not walkable
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            trunk.train(was_training)
    if dg is None:
        raise ModelError(f"could not trace {type(trunk).__name__} ({clip(errors[0], 300)})",
                         "check that the model runs on the given input size; file an issue with the model name")
    try:
        return _components(dg, names, pnames, probe, problems)
    except Exception as e:
        raise ModelError(f"could not group the channels of {type(trunk).__name__} ({type(e).__name__}: {e})",
                         "file an issue with the model name") from None


def _components(dg, names: dict, pnames: dict, probe: nn.Module, problems: dict[int, str]) -> list[RawGroup]:
    """Channel coupling as connected components over (node, side, channel) triples.

    Torch-Pruning's own group search re-walks the graph for every distinct index subset, which explodes on
    models with channel slicing (ReXNet's partial residuals); propagating each channel once and joining
    coupled channels with union-find gives the same groups in time linear in the graph. An index mapping that
    raises (or returns channels without a root) poisons the nodes on both ends: the groups through them are
    reported with a ``problem`` instead of failing the walk.
    """
    from torch_pruning import _helpers

    triples = UnionFind()
    ids: dict[tuple, int] = {}

    def tid(key: tuple) -> int:
        i = ids.get(key)
        if i is None:
            i = ids[key] = triples.add()
        return i

    limits: dict[int, int] = {}

    def bound(node) -> int:
        """An upper bound on any channel index of ``node``: the per-sample size of its largest input or output
        (from autograd's shape records); it stops flatten mappings from multiplying indices without end."""
        b = limits.get(id(node))
        if b is None:
            b = _per_sample_size(node)
            limits[id(node)] = b
        return b

    root_types = (nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase)
    seen: dict[tuple, set[int]] = {}
    sides: dict[tuple, tuple] = {}  # (node id, fn) -> (node, fn)
    roots: list[tuple] = []
    for module, node in list(dg.module2node.items()):
        if not isinstance(module, root_types) or module is probe:
            continue
        if isinstance(module, nn.RNNBase) and module.bidirectional:
            continue  # Torch-Pruning maps only the forward half of its output to the consumers
        pruner = dg.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        fn = pruner.prune_out_channels
        roots.append((node, fn, list(range(pruner.get_out_channels(module)))))

    for node, fn, idxs in roots:
        stack = [(node, fn, idxs)]
        while stack:
            node, fn, idxs = stack.pop()
            key = (id(node), fn)
            sides[key] = (node, fn)
            done = seen.setdefault(key, set())
            fresh = [i for i in idxs if i not in done]
            if not fresh:
                continue
            done.update(fresh)
            for dep in node.dependencies:
                if not dep.is_triggered_by(fn):
                    continue
                try:
                    mapped = [_helpers._HybridIndex(idx=i, root_idx=i) for i in fresh]
                    for mapping in dep.index_mapping:
                        if mapping is not None:
                            mapped = mapping(mapped)
                    pairs = [(int(h.idx), int(h.root_idx)) for h in mapped]
                    # channels beyond the target tensor's size do not exist there: a broadcast (a mean over
                    # channels feeding an add) or a flatten mapping that multiplies indices without end
                    limit = bound(dep.target)
                    pairs = [(j, r) for j, r in pairs if 0 <= j < limit]
                except Exception as e:
                    why = f"cannot map channels between {_label(node)} and {_label(dep.target)} ({type(e).__name__})"
                    problems.setdefault(id(node), why)
                    problems.setdefault(id(dep.target), why)
                    continue
                if not pairs:
                    continue
                tkey = (id(dep.target), dep.handler)
                for j, i in pairs:
                    triples.union(tid(key + (i,)), tid(tkey + (j,)))
                stack.append((dep.target, dep.handler, [j for j, _ in pairs]))

    # groups = components of sides (joined through the channel classes they share); channel classes =
    # components of triples
    key_of_class: dict[int, tuple] = {}
    side_id = {k: i for i, k in enumerate(sides)}
    side_sets = UnionFind(len(side_id))
    for (nid, fn, _i), t in ids.items():
        side_sets.union(side_id[(nid, fn)], side_id[key_of_class.setdefault(triples.find(t), (nid, fn))])
    grouped: dict[int, list[tuple]] = {}
    for k, i in side_id.items():
        grouped.setdefault(side_sets.find(i), []).append(k)

    out: list[RawGroup] = []
    order = {id(n): i for i, n in enumerate(dg.module2node.values())}
    for members in grouped.values():
        members.sort(key=lambda k: order.get(k[0], 0))
        problem = next((problems[k[0]] for k in members if k[0] in problems), None)
        classes: dict[int, int] = {}
        items: list[RawItem] = []
        root_name = None
        for key in members:
            node, fn = sides[key]
            target = node.module
            positions = sorted(seen[key])
            # a side no dependency reached back (a root whose output only feeds untraced ops) has channels of its own
            cls = [classes.setdefault(triples.find(tid(key + (p,))), len(classes)) for p in positions]
            if isinstance(target, nn.Parameter):
                name = pnames.get(id(target))
                if name is not None:
                    items.append(RawItem(name, "param", "param", positions, cls, getattr(node, "pruning_dim", None)))
                continue
            if not isinstance(target, nn.Module) or target not in names:
                continue  # Torch-Pruning's placeholder ops (reshape, add, concat, ...)
            direction = "out" if dg.is_out_channel_pruning_fn(fn) else "in"
            if root_name is None and direction == "out" and isinstance(target, root_types) and target is not probe:
                root_name = names[target]
            items.append(RawItem(names[target], "module", direction, positions, cls))
        if root_name is not None and items:
            out.append(RawGroup(root=root_name, size=len(classes), items=items, problem=problem))
    del dg
    return out


def _per_sample_size(node) -> int:
    shapes = []
    module = node.module
    if isinstance(module, torch.Tensor):
        shapes.append([1] + list(module.shape))
    g = node.grad_fn
    try:
        shapes += [list(m.shape) for m in g._input_metadata]
        shapes += [list(f._input_metadata[nr].shape) for f, nr in g.next_functions if f is not None]
    except Exception:
        pass
    if isinstance(module, nn.Module):
        for p in module.parameters(recurse=False):
            shapes.append([1] + list(p.shape))
    best = 0
    for shape in shapes:
        n = 1
        for v in shape[1:]:
            n *= int(v)
        best = max(best, n, *(int(v) for v in shape) if shape else (0,))
    return best if best > 0 else 1 << 62


def _label(node) -> str:
    name = getattr(node, "_name", None)
    return name or type(node.module).__name__.strip("_")
