"""Patches to Torch-Pruning's index mappings, applied only while the tracer builds its dependency graph.

Torch-Pruning infers how channels map through concatenations, splits, slices and reshapes from neighbouring
layers and assumes NCHW layouts. The passes here read the real shapes autograd recorded instead, and run node by
node, so one operation that cannot be mapped poisons only the groups passing through it (the tracer reports those
with a ``problem``) instead of failing the whole build. :func:`guarded_index_mapping` swaps them in and restores
Torch-Pruning's own functions on exit; nothing else in the package touches Torch-Pruning's internals.
"""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["guarded_index_mapping"]


@contextmanager
def guarded_index_mapping(problems: dict[int, str]):
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
    to_inputs: list = []
    from_inputs: list = []
    for k, in_node in zip(tracked, node.inputs, strict=True):
        span = offsets[k: k + 2]
        _claim(node.dependencies, in_node, to_inputs, im._ConcatIndexMapping(offset=span, reverse=True))
        _claim(in_node.dependencies, node, from_inputs, im._ConcatIndexMapping(offset=span, reverse=False))
    return None


def _claim(deps, target, used: list, mapping) -> None:
    """Give ``mapping`` to the first dependency on ``target`` in ``deps`` not ``used`` yet (one node may feed a
    concat twice: each of its inputs takes its own dependency)."""
    for dep in deps:
        if dep.target is target and not any(dep is d for d in used):
            dep.index_mapping[1] = mapping
            used.append(dep)
            return


def _split_mapping(graph, node) -> None:
    """Split/chunk offsets from the real output shapes, each consumer matched to the output it reads.

    TP sizes a split by counting its consumer nodes and gives them offsets in the order they were traced, which
    goes wrong as soon as one split output feeds two layers (CSP stages: the second half feeds a block and its
    residual add). Autograd records which output index every consumer reads. A split along a dim that is not the
    producing layer's channel dim (tokens, heads) leaves channels in place, as in TP.
    """
    from torch_pruning.dependency import index_mapping as im

    g = node.grad_fn
    try:
        outs = [list(m.shape) for m in g._input_metadata]
        src = [(f, nr) for f, nr in g.next_functions if f is not None]
        in_shape = list(src[0][0]._input_metadata[src[0][1]].shape)
        dim = int(g._saved_dim) % len(in_shape)
    except Exception:
        return im.update_split_index_mapping(graph, node)
    channels = _producer_channels(graph, node.inputs)
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

    g = node.grad_fn
    sizes = getattr(g, "_saved_self_sym_sizes", None)
    dim = getattr(g, "_saved_dim", None)
    if sizes is not None and dim is not None and 0 <= int(dim) < len(sizes):
        channels = _producer_channels(graph, node.inputs)
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

    g = node.grad_fn
    try:
        out_shape = [int(v) for v in g._input_metadata[0].shape]
        src = [(f, nr) for f, nr in g.next_functions if f is not None]
        in_shape = [int(v) for v in src[0][0]._input_metadata[src[0][1]].shape] if len(src) == 1 else None
    except Exception:
        in_shape = None
    channels = None
    if in_shape and len(in_shape) >= 3 and len(node.inputs) == 1:
        channels = _producer_channels(graph, node.inputs[:1])
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


def _producer_channels(graph, nodes) -> int | None:
    """The output channel count of the first of ``nodes`` whose producing layer Torch-Pruning can infer."""
    from torch_pruning.dependency import shape_infer as si

    for n in nodes:
        try:
            channels = si.infer_out_channels_recursively(graph, n, [0])
        except Exception:
            channels = None
        if channels is not None:
            return channels
    return None
