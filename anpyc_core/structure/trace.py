"""Tracing: from any nn.Module and an example input to raw coupled channel groups.

Torch-Pruning's ``DependencyGraph`` does the tracing (it follows autograd, so it works on models torch.fx
cannot trace); this module wraps it and converts its groups into plain records (names and index lists), so
nothing downstream depends on Torch-Pruning's types and the graph can be dropped right after the walk.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
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
    problems: dict[int, str] = {}
    errors = []
    dg = None
    # a second attempt on a single-sample batch: a few models trace differently (or only) without batch statistics
    for ex in (example, example[:1]):
        problems.clear()
        try:
            with warnings.catch_warnings(), _guarded_index_mapping(problems):
                warnings.simplefilter("ignore")
                with torch.enable_grad():
                    dg = tp.DependencyGraph().build_dependency(wrapper, example_inputs=ex, verbose=False)
            break
        except Exception as e:  # tracing is best-effort; the caller reports the model as not walkable
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            trunk.train(was_training)
    if dg is None:
        raise ModelError(f"could not trace {type(trunk).__name__} ({errors[0][:300]})",
                         "check that the model runs on the given input size; file an issue with the model name")
    try:
        return _components(dg, names, pnames, probe, problems)
    except Exception as e:
        raise ModelError(f"could not group the channels of {type(trunk).__name__} ({type(e).__name__}: {e})",
                         "file an issue with the model name") from None


# ================================================================================================ index mappings

@contextmanager
def _guarded_index_mapping(problems: dict[int, str]):
    """Run Torch-Pruning's shape inference and index-mapping passes node by node, so that one operation it cannot
    map (a concat whose input sizes it cannot infer, ...) poisons only the groups passing through that node instead
    of failing the whole build. Concat sizes are read from autograd's own shape metadata first."""
    from torch_pruning.dependency import index_mapping as im
    from torch_pruning.dependency import shape_infer as si

    original_update, original_shapes = im.update_index_mapping, si.init_shape_information

    def shapes(graph) -> None:
        try:
            original_shapes(graph)
        except Exception as e:
            for node in graph.module2node.values():
                if _optype(node) == "SPLIT" and getattr(node.module, "offsets", None) is None:
                    problems[id(node)] = f"split sizes unknown ({type(e).__name__})"

    def update(graph) -> None:
        passes = {"CONCAT": _concat_mapping, "SPLIT": _split_mapping,
                  "RESHAPE": _reshape_mapping, "UNBIND": im.update_unbind_index_mapping,
                  "SLICE": _slice_mapping}
        # EXPAND is left unmapped (channels pass through): TP maps only Hugging Face's grouped-query expand, and
        # its reverse mapping drops the root channel, so every group through any 5-d expand would be lost
        for node in list(graph.module2node.values()):
            fn = passes.get(_optype(node))
            if fn is None:
                continue
            try:
                fn(graph, node)
            except Exception as e:
                problems[id(node)] = f"cannot map channels through {_optype(node).lower()} ({type(e).__name__}: {e})"

    im.update_index_mapping, si.init_shape_information = update, shapes
    try:
        yield
    finally:
        im.update_index_mapping, si.init_shape_information = original_update, original_shapes


def _optype(node) -> str:
    return getattr(node.type, "name", str(node.type))


def _concat_mapping(graph, node) -> None:
    """Channel offsets of a concat along dim 1 from the real shapes autograd recorded (Torch-Pruning infers them
    from neighbouring layers and gives up on slices); other concat dims leave channels in place, as in TP."""
    from torch_pruning.dependency import index_mapping as im

    g = node.grad_fn
    try:
        out_shape = list(g._input_metadata[0].shape)
        dim = int(g._saved_dim) % len(out_shape)
    except Exception:
        return im.update_concat_index_mapping(graph, node)
    if dim != 1 or not node.enable_index_mapping:
        return None
    try:  # as in TP: a concat whose width is not the channel count downstream is not a channel concat (tokens)
        from torch_pruning.dependency import shape_infer as si

        width = si.infer_in_channels_recursively(graph, node, recursive_depth=[0])
    except Exception:
        width = None
    if width is not None and width != out_shape[dim]:
        return None
    sizes: list[int | None] = []
    for f, nr in g.next_functions:
        sizes.append(None if f is None else int(f._input_metadata[nr].shape[dim]))
    unknown = [i for i, s in enumerate(sizes) if s is None]
    if len(unknown) == 1:
        sizes[unknown[0]] = out_shape[dim] - sum(s for s in sizes if s is not None)
    elif unknown:
        raise ValueError("several concat inputs without autograd history")
    if sum(sizes) != out_shape[dim]:
        raise ValueError(f"concat sizes {sizes} do not add up to {out_shape[dim]}")
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    # inputs Torch-Pruning tracked, in next_functions order (it skips constants and plain leaf tensors)
    tracked = [i for i, (f, _) in enumerate(g.next_functions) if f is not None and (
        "accumulategrad" not in f.name().lower() or _is_node_input(node, f))]
    if len(tracked) != len(node.inputs):
        raise ValueError(f"{len(node.inputs)} traced concat inputs for {len(tracked)} autograd inputs")
    node.module.concat_sizes = [sizes[i] for i in tracked]
    node.module.offsets = offsets
    used: list = []
    for k, in_node in zip(tracked, node.inputs, strict=True):
        span = offsets[k: k + 2]
        for dep in node.dependencies:
            if dep.target is in_node and not any(dep is d for d in used):
                dep.index_mapping[1] = im._ConcatIndexMapping(offset=span, reverse=True)
                used.append(dep)
                break
    used = []
    for k, in_node in zip(tracked, node.inputs, strict=True):
        span = offsets[k: k + 2]
        for dep in in_node.dependencies:
            if dep.target is node and not any(dep is d for d in used):
                dep.index_mapping[1] = im._ConcatIndexMapping(offset=span, reverse=False)
                used.append(dep)
                break
    return None


def _split_mapping(graph, node) -> None:
    """Split/chunk offsets from the real output shapes, each consumer matched to the output it reads.

    TP sizes a split by counting its consumer nodes and gives them offsets in the order they were traced, which
    goes wrong as soon as one split output feeds two layers (CSP stages: the second half feeds a block and its
    residual add). Autograd records which output index every consumer reads. A split along a dim that is not the
    producing layer's channel dim (tokens, heads) leaves channels in place, as in TP.
    """
    from torch_pruning.dependency import index_mapping as im
    from torch_pruning.dependency import shape_infer as si

    g = node.grad_fn
    try:
        outs = [list(m.shape) for m in g._input_metadata]
        src = [(f, nr) for f, nr in g.next_functions if f is not None]
        in_shape = list(src[0][0]._input_metadata[src[0][1]].shape)
        dim = int(g._saved_dim) % len(in_shape)
    except Exception:
        return im.update_split_index_mapping(graph, node)
    channels = None
    for n in node.inputs:
        try:
            channels = si.infer_out_channels_recursively(graph, n, [0])
        except Exception:
            channels = None
        if channels is not None:
            break
    if channels is not None and in_shape[dim] != channels:
        return None
    if channels is None and dim != 1:
        return None
    sizes = [int(o[dim]) for o in outs]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    node.module.split_sizes, node.module.offsets = sizes, offsets
    for out_node in node.outputs:
        reads = {nr for f, nr in getattr(out_node.grad_fn, "next_functions", ()) if f is g}
        if len(reads) != 1:
            raise ValueError(f"a consumer reads {len(reads)} outputs of one split")
        i = reads.pop()
        span = offsets[i: i + 2]
        for dep in node.dependencies:
            if dep.target is out_node:
                dep.index_mapping[0] = im._SplitIndexMapping(offset=span, reverse=False)
        for dep in out_node.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = im._SplitIndexMapping(offset=span, reverse=True)
    return None


def _slice_mapping(graph, node) -> None:
    """TP maps a slice along dim 1 of a 4-d tensor as a channel slice (NCHW); on a channels-last tensor that dim
    is spatial (LeViT's subsampling ``x[:, ::2, ::2]``). The real shape tells: a dim whose size is not the channel
    count of the producing layer is not a channel dim, and channels pass through unchanged."""
    from torch_pruning.dependency import index_mapping as im
    from torch_pruning.dependency import shape_infer as si

    g = node.grad_fn
    sizes = getattr(g, "_saved_self_sym_sizes", None)
    dim = getattr(g, "_saved_dim", None)
    if sizes is not None and dim is not None and 0 <= int(dim) < len(sizes):
        channels = None
        for n in node.inputs:
            try:
                channels = si.infer_out_channels_recursively(graph, n, [0])
            except Exception:
                channels = None
            if channels is not None:
                break
        if channels is not None and int(sizes[int(dim)]) != channels:
            return None
    return im.update_slice_index_mapping(graph, node)


class _LastDimMerge:
    """Channels-last merge ``(..., k, C) -> (..., k*C)`` (Swin's patch merging): channel c of the input is at
    ``m*C + c`` of the output for every m; the reverse maps a position back to ``p % C``."""

    def __init__(self, channels: int, factor: int, reverse: bool = False):
        self.channels, self.factor, self.reverse = channels, factor, reverse

    def __call__(self, idxs):
        from torch_pruning import _helpers

        if self.reverse:
            out = {(int(i.idx) % self.channels, i.root_idx) for i in idxs}
            return [_helpers._HybridIndex(idx=j, root_idx=r) for j, r in sorted(out, key=lambda t: (t[0], str(t[1])))]
        return [_helpers._HybridIndex(idx=m * self.channels + int(i.idx), root_idx=i.root_idx)
                for i in idxs for m in range(self.factor)]


def _reshape_mapping(graph, node) -> None:
    """Reshapes of channels-last tensors, read from the real shapes. TP's flatten mapping assumes NCHW (channel c
    becomes positions ``c*k .. c*k+k-1``); when the reshape's input has its channels last (its last dim is the
    channel count of the producing layer), channels either stay the last-dim index (spatial reshapes, head
    splits: no mapping) or are merged with the dims before them (``m*C + c``). Anything else is left to TP."""
    from torch_pruning.dependency import index_mapping as im
    from torch_pruning.dependency import shape_infer as si

    g = node.grad_fn
    try:
        out_shape = [int(v) for v in g._input_metadata[0].shape]
        src = [(f, nr) for f, nr in g.next_functions if f is not None]
        in_shape = [int(v) for v in src[0][0]._input_metadata[src[0][1]].shape] if len(src) == 1 else None
    except Exception:
        in_shape = None
    channels = None
    if in_shape and len(in_shape) >= 3 and len(node.inputs) == 1:
        try:
            channels = si.infer_out_channels_recursively(graph, node.inputs[0], [0])
        except Exception:
            channels = None
    if (channels and in_shape[1] == channels and in_shape[-1] != channels and len(out_shape) == len(in_shape) + 1
            and out_shape[1] > 1 and out_shape[2] > 1 and out_shape[1] * out_shape[2] == channels
            and out_shape[3:] == in_shape[2:]):
        # channels-first split (B, k*C, ...) -> (B, k, C, ...) (selective-kernel attention over k paths): the
        # channel index of the result is the one within C, so position j of the input is channel j % C
        _set_reshape_mapping(node, _LastDimMerge(out_shape[2], out_shape[1], reverse=False),
                             _LastDimMerge(out_shape[2], out_shape[1], reverse=True))
        return None
    if not channels or in_shape[-1] != channels or in_shape[1] == channels:
        return im.update_reshape_index_mapping(graph, node)
    last = out_shape[-1] if out_shape else None
    if last is None or last <= channels or last % channels:
        return None  # channels stay the last-dim index (or split into heads, kept flat as TP does for heads)
    merged, j = 1, len(in_shape)
    while j > 1 and merged < last:
        j -= 1
        merged *= in_shape[j]
    if merged != last:
        return None
    factor = last // channels
    _set_reshape_mapping(node, _LastDimMerge(channels, factor, reverse=True),
                         _LastDimMerge(channels, factor, reverse=False))
    return None


def _set_reshape_mapping(node, to_input, from_input) -> None:
    """``to_input`` maps the reshape's channels back to its input's; ``from_input`` the other way."""
    in_node = node.inputs[0]
    for dep in node.dependencies:
        if dep.target is in_node:
            dep.index_mapping[0] = to_input
    for dep in in_node.dependencies:
        if dep.target is node:
            dep.index_mapping[0] = from_input


def _is_node_input(node, grad_fn) -> bool:
    variable = getattr(grad_fn, "variable", None)
    return any(n.module is variable for n in node.inputs)


def _components(dg, names: dict, pnames: dict, probe: nn.Module, problems: dict[int, str]) -> list[RawGroup]:
    """Channel coupling as connected components over (node, side, channel) triples.

    Torch-Pruning's own group search re-walks the graph for every distinct index subset, which explodes on
    models with channel slicing (ReXNet's partial residuals); propagating each channel once and joining
    coupled channels with union-find gives the same groups in time linear in the graph. An index mapping that
    raises (or returns channels without a root) poisons the nodes on both ends: the groups through them are
    reported with a ``problem`` instead of failing the walk.
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

    limits: dict[int, int] = {}

    def bound(node) -> int:
        """An upper bound on any channel index of ``node``: the per-sample size of its largest input or output
        (from autograd's shape records); it stops flatten mappings from multiplying indices without end."""
        b = limits.get(id(node))
        if b is None:
            b = _per_sample_size(node)
            limits[id(node)] = b
        return b

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
                    union(tid(key + (i,)), tid(tkey + (j,)))
                stack.append((dep.target, dep.handler, [j for j, _ in pairs]))

    # groups = components of sides; channel classes = components of triples
    side_of_class: dict[int, set] = {}
    for (nid, fn, _i), t in ids.items():
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
        problem = next((problems[k[0]] for k in members if k[0] in problems), None)
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
