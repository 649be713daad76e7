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

from ..errors import ModelError

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
    root: str
    size: int
    items: list[RawItem] = field(default_factory=list)


class _Probe(nn.Module):
    """The trunk followed by a 1-output linear layer: the probe marks which group the feature channels are in."""

    def __init__(self, trunk: nn.Module, num_features: int):
        super().__init__()
        self.trunk = trunk
        setattr(self, PROBE, nn.Linear(num_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, PROBE)(self.trunk(x))


def trace_groups(trunk: nn.Module, example: torch.Tensor, num_features: int) -> list[RawGroup]:
    """Coupled channel groups of ``trunk`` (every conv/linear output starts one), traced on ``example``.

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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.enable_grad():
                dg = tp.DependencyGraph().build_dependency(wrapper, example_inputs=example, verbose=False)
    except Exception as e:  # tracing is best-effort; the caller reports the model as not walkable
        raise ModelError(f"could not trace {type(trunk).__name__} ({type(e).__name__}: {e})",
                         "check that the model runs on the given input size; file an issue with the model name")
    finally:
        trunk.train(was_training)
    try:
        return _components(dg, names, pnames, probe)
    except Exception as e:
        raise ModelError(f"could not group the channels of {type(trunk).__name__} ({type(e).__name__}: {e})",
                         "file an issue with the model name") from None


def _components(dg, names: dict, pnames: dict, probe: nn.Module) -> list[RawGroup]:
    """Channel coupling as connected components over (node, side, channel) triples.

    Torch-Pruning's own group search re-walks the graph for every distinct index subset, which explodes on
    models with channel slicing (ReXNet's partial residuals); propagating each channel once and joining
    coupled channels with union-find gives the same groups in time linear in the graph.
    """
    from torch_pruning import _helpers

    parent: list[int] = []
    ids: dict[tuple, int] = {}

    def tid(key: tuple) -> int:
        i = ids.get(key)
        if i is None:
            i = ids[key] = len(parent)
            parent.append(i)
        return i

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    root_types = (nn.modules.conv._ConvNd, nn.Linear)
    seen: dict[tuple, set[int]] = {}
    sides: dict[tuple, tuple] = {}  # (node id, fn) -> (node, fn)
    roots: list[tuple] = []
    for module, node in list(dg.module2node.items()):
        if not isinstance(module, root_types) or module is probe:
            continue
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
                mapped = [_helpers._HybridIndex(idx=i, root_idx=i) for i in fresh]
                for mapping in dep.index_mapping:
                    if mapping is not None:
                        mapped = mapping(mapped)
                if not mapped:
                    continue
                tkey = (id(dep.target), dep.handler)
                pairs = [(int(h.idx), int(h.root_idx)) for h in mapped]
                for j, i in pairs:
                    union(tid(key + (i,)), tid(tkey + (j,)))
                stack.append((dep.target, dep.handler, [j for j, _ in pairs]))

    # groups = components of sides; channel classes = components of triples
    side_of_class: dict[int, set] = {}
    for (nid, fn, i), t in ids.items():
        side_of_class.setdefault(find(t), set()).add((nid, fn))
    side_parent = {k: k for k in sides}

    def sfind(k):
        while side_parent[k] != k:
            side_parent[k] = side_parent[side_parent[k]]
            k = side_parent[k]
        return k

    for members in side_of_class.values():
        members = list(members)
        for other in members[1:]:
            a, b = sfind(members[0]), sfind(other)
            if a != b:
                side_parent[b] = a
    grouped: dict[tuple, list[tuple]] = {}
    for k in sides:
        grouped.setdefault(sfind(k), []).append(k)

    out: list[RawGroup] = []
    order = {id(n): i for i, n in enumerate(dg.module2node.values())}
    for members in grouped.values():
        members.sort(key=lambda k: order.get(k[0], 0))
        classes: dict[int, int] = {}
        items: list[RawItem] = []
        root_name = None
        for key in members:
            node, fn = sides[key]
            target = node.module
            positions = sorted(seen[key])
            cls = [classes.setdefault(find(ids[key + (p,)]), len(classes)) for p in positions]
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
            out.append(RawGroup(root=root_name, size=len(classes), items=items))
    del dg
    return out
