"""Channel shuffles written as Reshape -> Transpose -> Reshape, turned into one Gather of channels.

ShuffleNet-style exports interleave channel groups with ``Reshape(N, g, C/g, H, W) -> Transpose(0, 2, 1, 3, 4) ->
Reshape(N, C, H, W)``, and torch's ``chunk`` then takes halves with ``Slice``. The same permutation is one
``Gather(axis=1)`` with constant indices, and a Slice of that is a Gather of a slice of the indices: one kernel per
branch instead of three or four. Two things follow:

- speed: on the digits ShuffleNetV2 the gathered form runs about 1.1x faster at batch 1 (reports/foundation.md);
- pruning: the dependency analysis follows a constant channel Gather (each output channel is a known input channel),
  whereas a Reshape/Transpose shuffle blocks every channel that passes through it. With the Gather form, the
  outputs of ShuffleNetV2's branch convs become prunable, which is most of its MACs.

A shuffle is rewritten only when the shapes are static and the pattern is exact (the first Reshape splits only the
channel axis, the Transpose swaps just the two new axes, the last Reshape merges them back) and its intermediate
tensors feed nothing else. The result is bit-identical: a Gather copies values.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.irutil import constant_array, new_initializer

_DEFAULT_DOMAINS = ("", "ai.onnx")


def fuse_channel_shuffles(graph: ir.Graph) -> dict[str, int]:
    """Rewrite every exact channel shuffle of ``graph`` (main graph only) as Gather; counts of what was rewritten."""
    counts = {"shuffles": 0, "slices": 0}
    for node in list(graph):
        if node.graph is not graph or node.op_type != "Reshape" or node.domain not in _DEFAULT_DOMAINS:
            continue
        match = _match_shuffle(node)
        if match is None:
            continue
        x, chain, indices = match
        counts["slices"] += _rewrite(graph, x, chain, indices)
        counts["shuffles"] += 1
    return counts


def _match_shuffle(first: ir.Node) -> tuple[ir.Value, list[ir.Node], np.ndarray] | None:
    """``(x, [reshape, transpose, reshape], gather indices)`` when ``first`` starts an exact channel shuffle."""
    x = first.inputs[0]
    if x is None or x.shape is None or len(x.shape) < 3 or not all(isinstance(d, int) for d in x.shape[1:]):
        return None  # the batch dim may be symbolic; the others must be known
    dims = [d if isinstance(d, int) else -1 for d in x.shape]
    channels = dims[1]
    split = constant_array(first.inputs[1]) if len(first.inputs) > 1 else None
    if split is None or split.ndim != 1 or len(split) != len(dims) + 1:
        return None
    split = [int(v) for v in split]
    groups, per_group = split[1], split[2]
    if groups * per_group != channels or groups < 2 or per_group < 1 or split[0] not in (0, -1, dims[0]) \
            or split[3:] != dims[2:]:
        return None
    transpose = _sole_use(first.outputs[0])
    if transpose is None or transpose.op_type != "Transpose":
        return None
    perm = list(transpose.attributes.get_ints("perm", []) or [])
    if perm != [0, 2, 1, *range(3, len(dims) + 1)]:
        return None
    last = _sole_use(transpose.outputs[0])
    if last is None or last.op_type != "Reshape" or len(last.inputs) < 2:
        return None
    merged = constant_array(last.inputs[1])
    if merged is None or merged.ndim != 1 or len(merged) != len(dims) or int(merged[0]) not in (0, -1, dims[0]) \
            or [int(v) for v in merged[1:]] != dims[1:]:
        return None
    if first.outputs[0].is_graph_output() or transpose.outputs[0].is_graph_output():
        return None
    # out[j * groups + i] = in[i * per_group + j]
    indices = np.arange(channels).reshape(groups, per_group).T.reshape(-1).astype(np.int64)
    return x, [first, transpose, last], indices


def _rewrite(graph: ir.Graph, x: ir.Value, chain: list[ir.Node], indices: np.ndarray) -> int:
    """Replace ``chain`` by Gathers; returns how many channel Slices of its output became Gathers of ``x``."""
    out = chain[-1].outputs[0]
    base = chain[-1].name or "shuffle"
    sliced = 0
    for use, _ in list(out.uses()):
        piece = _channel_slice(use, len(indices), len(x.shape))
        if piece is None or use.graph is not graph or use.outputs[0].is_graph_output():
            continue
        start, stop = piece
        gather = _gather(graph, x, indices[start:stop], f"{use.name or base}_gather")
        gather.outputs[0].type, gather.outputs[0].shape = use.outputs[0].type, use.outputs[0].shape
        graph.insert_before(use, [gather])
        name = use.outputs[0].name
        use.outputs[0].replace_all_uses_with(gather.outputs[0])
        graph.remove(use, safe=True)
        gather.outputs[0].name = name
        sliced += 1
    if out.uses() or out.is_graph_output():
        gather = _gather(graph, x, indices, f"{base}_gather")
        gather.outputs[0].type, gather.outputs[0].shape = out.type, out.shape
        graph.insert_before(chain[-1], [gather])
        name = out.name
        out.replace_all_uses_with(gather.outputs[0], replace_graph_outputs=True)
        graph.remove(chain, safe=True)
        gather.outputs[0].name = name
    else:
        graph.remove(chain, safe=True)
    return sliced


def _gather(graph: ir.Graph, x: ir.Value, indices: np.ndarray, name: str) -> ir.Node:
    taken = {v.name for v in graph.initializers.values()}
    key, n = f"{name}_indices", 0
    while key in taken:
        n += 1
        key = f"{name}_indices_{n}"
    const = new_initializer(graph, key, np.ascontiguousarray(indices, dtype=np.int64))
    node = ir.node("Gather", [x, const], attributes={"axis": 1})
    node.name = name
    return node


def _channel_slice(node: ir.Node, channels: int, rank: int) -> tuple[int, int] | None:
    """``(start, stop)`` when ``node`` is a constant, step-1 Slice of the channel axis only."""
    if node.op_type != "Slice" or node.domain not in _DEFAULT_DOMAINS or len(node.inputs) < 3:
        return None
    arrays = [constant_array(v) for v in node.inputs[1:]]
    if any(a is None for a in arrays[:2]) or any(v is not None and a is None for v, a in
                                                 zip(node.inputs[3:], arrays[2:])):
        return None
    starts, ends = (np.asarray(a).reshape(-1) for a in arrays[:2])
    axes = np.asarray(arrays[2]).reshape(-1) if len(arrays) > 2 and arrays[2] is not None else np.arange(len(starts))
    steps = np.asarray(arrays[3]).reshape(-1) if len(arrays) > 3 and arrays[3] is not None else np.ones(len(starts))
    if len(starts) != 1 or len(ends) != 1 or len(axes) != 1 or int(steps[0]) != 1:
        return None
    if int(axes[0]) % rank != 1:
        return None
    start, stop = int(starts[0]), int(ends[0])
    start = max(0, start + channels if start < 0 else min(start, channels))
    stop = max(0, stop + channels if stop < 0 else min(stop, channels))
    return (start, stop) if stop > start else None


def fold_channel_gathers(graph: ir.Graph) -> int:
    """Compose constant Gathers into one Gather (main graph only); returns how many nodes it saved.

    A Gather of a Gather along the same axis is one Gather of composed indices; a Concat of Gathers of one tensor
    along their axis is one Gather of the concatenated indices; a Gather of every index in order is the tensor
    itself. Such chains are what depth pruning leaves of a ShuffleNet unit whose branch it removed (two halves
    gathered, concatenated and gathered again). Values are copied, never computed: the result is bit-identical."""
    before = len(graph)
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if node.graph is not graph or node.domain not in _DEFAULT_DOMAINS:
                continue
            if node.op_type == "Gather":
                changed |= _fold_gather(graph, node)
            elif node.op_type == "Concat":
                changed |= _fold_concat(graph, node)
    return before - len(graph)


def _gather_parts(node: ir.Node | None) -> tuple[ir.Value, int, np.ndarray] | None:
    """``(data, axis, indices)`` of a Gather with constant, 1-D indices along a dim of known size."""
    if node is None or node.op_type != "Gather" or node.domain not in _DEFAULT_DOMAINS or len(node.inputs) != 2:
        return None
    data, indices = node.inputs[0], constant_array(node.inputs[1])
    if data is None or data.shape is None or indices is None or indices.ndim != 1:
        return None
    axis = node.attributes.get_int("axis", 0)
    axis = axis + len(data.shape) if axis < 0 else axis
    size = data.shape[axis] if 0 <= axis < len(data.shape) else None
    if not isinstance(size, int) or indices.size and (indices.min() < -size or indices.max() >= size):
        return None
    return data, axis, np.where(indices < 0, indices + size, indices).astype(np.int64)


def _replace(graph: ir.Graph, old: ir.Node, data: ir.Value, axis: int, indices: np.ndarray) -> None:
    """Put a Gather of ``data`` (or ``data`` itself, for every index in order) in place of ``old``'s output."""
    out = old.outputs[0]
    if data.shape[axis] == len(indices) and np.array_equal(indices, np.arange(len(indices))) \
            and not out.is_graph_output():  # type: ignore[index]
        out.replace_all_uses_with(data)
        graph.remove(old, safe=True)
        return
    node = _gather(graph, data, indices, f"{old.name or 'gather'}_folded")
    node.attributes["axis"] = ir.AttrInt64("axis", axis)
    node.outputs[0].type, node.outputs[0].shape = out.type, out.shape
    graph.insert_before(old, [node])
    name = out.name
    out.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
    graph.remove(old, safe=True)
    node.outputs[0].name = name


def _drop_if_unused(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    for node in dict.fromkeys(nodes):
        if node.graph is graph and not any(out.uses() or out.is_graph_output() for out in node.outputs):
            graph.remove(node, safe=True)


def _fold_gather(graph: ir.Graph, node: ir.Node) -> bool:
    outer = _gather_parts(node)
    if outer is None:
        return False
    data, axis, indices = outer
    inner_node = data.producer()
    inner = _gather_parts(inner_node)
    if inner is not None and inner[1] == axis:
        _replace(graph, node, inner[0], axis, inner[2][indices])
        _drop_if_unused(graph, [inner_node])  # type: ignore[list-item]
        return True
    if data.shape[axis] == len(indices) and np.array_equal(indices, np.arange(len(indices))) \
            and not node.outputs[0].is_graph_output():  # type: ignore[index]
        _replace(graph, node, data, axis, indices)
        return True
    return False


def _fold_concat(graph: ir.Graph, node: ir.Node) -> bool:
    if not node.inputs or node.outputs[0].shape is None:
        return False
    axis = node.attributes.get_int("axis", 0)
    axis = axis + len(node.outputs[0].shape) if axis < 0 else axis
    producers = [v.producer() if v is not None else None for v in node.inputs]
    parts = [_gather_parts(p) for p in producers]
    first = parts[0]
    if first is None or any(p is None or p[1] != axis or p[0] is not first[0] for p in parts):
        return False
    _replace(graph, node, first[0], axis, np.concatenate([p[2] for p in parts]))  # type: ignore[index]
    _drop_if_unused(graph, producers)  # type: ignore[arg-type]
    return True


def _sole_use(value: ir.Value) -> ir.Node | None:
    if value.is_graph_output() or len(value.uses()) != 1:
        return None
    node = value.uses()[0][0]
    return node if node.domain in _DEFAULT_DOMAINS else None


__all__ = ["fold_channel_gathers", "fuse_channel_shuffles"]
