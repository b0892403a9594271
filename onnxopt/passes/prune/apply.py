"""Rewrite an ONNX model for a pruning plan: slice initializers, fix channel-count attributes and shape constants."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt.passes.prune.depgraph import DepGraph, Layout, layout_entries


def apply_plan(proto: onnx.ModelProto, graph: DepGraph, removed: Mapping[int, np.ndarray],
               means: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A pruned copy of ``proto``: ``removed[group_id]`` are the channel indices (within the group) to drop.

    With ``means`` (consumer input name -> mean per channel/feature on calibration data), each Conv/Gemm that loses
    input channels gets their mean contribution added to its bias (mean replacement), so the next layer's output
    keeps its expected value instead of shifting; consumers without a bias are left as they are."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    drop: dict[tuple[str, int], set[int]] = defaultdict(set)
    for gid, idx in removed.items():
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            continue
        for cut in graph.groups[gid].cuts:
            drop[(cut.init, cut.axis)].update(int(p) for p in cut.positions(idx))
    inits = {init.name: init for init in out.graph.initializer}
    if means:
        _compensate(out, graph, removed, means, inits)
    by_init: dict[str, list[tuple[int, set[int]]]] = defaultdict(list)
    for (name, axis), positions in drop.items():
        by_init[name].append((axis, positions))
    for name, items in by_init.items():
        array = numpy_helper.to_array(inits[name])
        for axis, positions in items:
            array = np.delete(array, sorted(positions), axis=axis)
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    gone = {gid: {int(i) for i in idx} for gid, idx in removed.items()}

    def kept(entry: tuple[int, int]) -> bool:
        return entry[1] not in gone.get(graph.space_root[entry[0]], ())

    def width(layout: Layout) -> int:
        if layout.order is not None:
            return sum(kept(e) for e in layout.order)
        total = 0
        for seg in layout.segs:
            gid = graph.space_root[seg.space]
            n = graph.space_size[seg.space] - len(removed.get(gid, ()))
            total += n * seg.block
        return total

    nodes = {node.name: node for node in out.graph.node if node.name}
    for rewrite in graph.rewrites:
        node = nodes.get(rewrite.node)
        if node is None:
            continue
        if rewrite.kind == "group":
            _set_int_attr(node, "group", width(rewrite.layouts[0]))
        elif rewrite.kind == "split":
            sizes = [width(lay) for lay in rewrite.layouts]
            if any(a.name == "split" for a in node.attribute):
                for a in node.attribute:
                    if a.name == "split":
                        del a.ints[:]
                        a.ints.extend(sizes)
            elif len(node.input) > 1 and node.input[1]:
                node.input[1] = _new_const(out, f"{node.input[1]}_pruned", np.asarray(sizes, dtype=np.int64))
            elif _opset(out) >= 13:  # an equal split before pruning may not be one after
                for a in [a for a in node.attribute if a.name == "num_outputs"]:
                    node.attribute.remove(a)
                const = _new_const(out, f"{node.name}_split_sizes", np.asarray(sizes, dtype=np.int64))
                node.input[:] = [node.input[0], const]
            else:
                node.attribute.append(onnx.helper.make_attribute("split", sizes))
        elif rewrite.kind in ("gather", "slice"):
            # by position, not by channel identity: one channel may sit at two positions (see depgraph.seg_cuts)
            before = rewrite.layouts[0]
            alive = np.asarray([kept(e) for e in layout_entries(before, graph.space_size)], dtype=bool)
            new_position = np.cumsum(alive) - 1
            if rewrite.kind == "gather":
                picked = numpy_helper.to_array(inits[node.input[1]]).astype(np.int64)
                picked = np.where(picked < 0, picked + alive.size, picked)
                indices = new_position[picked[alive[picked]]]
                node.input[1] = _new_const(out, f"{node.input[1]}_pruned", indices.astype(np.int64))
            else:  # a run of the input stays a run of the pruned input
                _set_slice_run(out, node, inits, before, alive)
        elif rewrite.kind == "reshape" and len(node.input) > 1:
            shape = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
            if shape is not None and shape.size >= 2 and shape[1] > 0:
                shape = shape.copy()
                shape[1] = width(rewrite.layouts[0])
                node.input[1] = _new_const(out, f"{node.input[1]}_pruned_{node.name}", shape)
    used = {name for node in out.graph.node for name in node.input} | {o.name for o in out.graph.output}
    used |= {i.name for i in out.graph.input}
    used |= {name for node in out.graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
             for inner in a.g.node for name in inner.input}
    unused = [i for i in out.graph.initializer if i.name not in used]
    for init in unused:
        out.graph.initializer.remove(init)
    del out.graph.value_info[:]
    try:
        out = onnx.shape_inference.infer_shapes(out)
    except Exception:  # noqa: BLE001 - value_info is optional; the checker judges the model
        pass
    return out


def round_selections(graph: DepGraph, removed: Mapping[int, np.ndarray],
                     scores: Mapping[int, np.ndarray] | None = None, round_to: int = 1) -> dict[int, np.ndarray]:
    """``removed``, less the best-scored removed channels of every explicit channel selection (a Gather or Slice of
    channels, a Split or depthwise Conv of reordered channels) that would otherwise keep no channel, or a count
    that is not a multiple of ``round_to`` (nor the selection's full width).

    Groups are rounded by the allocation, but a selection takes parts of several groups (a ShuffleNet unit's half
    is half of each of two convs' outputs), so its width is rounded here: ONNX Runtime's blocked (NCHWc) conv
    kernels refuse odd channel counts, and a depthwise conv of 89 channels ran 3x slower than one of 96 on the
    digits ShuffleNetV2. Restoring a channel widens its group and other selections too, so groups are held to the
    same rule and this repeats until all hold (at worst every channel is back: the original widths)."""
    gone = {gid: {int(i) for i in idx} for gid, idx in removed.items()}
    constraints = [[(graph.space_root[space], channel) for space, channel in lay.order]
                   for rw in graph.rewrites if rw.kind in ("gather", "slice", "split", "group")
                   for lay in (rw.layouts if rw.kind in ("split", "group") else rw.layouts[1:]) if lay.order is not None]
    if constraints:  # groups only need the care when a selection may have changed them
        constraints += [[(gid, c) for c in range(graph.groups[gid].size)] for gid in removed]
    step = max(round_to, 1)

    def score(entry: tuple[int, int]) -> float:
        return float(scores[entry[0]][entry[1]]) if scores else 0.0

    def holds(width: int, full: int) -> bool:
        return width > 0 and (width % step == 0 or width == full or full <= step)

    changed = True
    while changed:
        changed = False
        for entries in constraints:
            width = sum(channel not in gone.get(gid, ()) for gid, channel in entries)
            if holds(width, len(entries)):
                continue
            for gid, channel in sorted({e for e in entries if e[1] in gone.get(e[0], ())}, key=score, reverse=True):
                gone[gid].discard(channel)
                width += entries.count((gid, channel))
                changed = True
                if holds(width, len(entries)):
                    break
    return {gid: np.asarray(sorted(idx), dtype=np.int64) for gid, idx in gone.items()}


def _set_slice_run(model: onnx.ModelProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                   layout: Layout, alive: np.ndarray) -> None:
    """Move the channel-axis bounds of Slice ``node`` (step 1) to the pruned input, whose positions ``alive`` are
    the input's that survive; the other axes' bounds stay."""
    def run(start: int, stop: int) -> tuple[int, int]:
        start, stop = (int(np.clip(v + alive.size if v < 0 else v, 0, alive.size)) for v in (start, stop))
        return int(alive[:start].sum()), int(alive[:stop].sum())

    def channel_index(axes: list[int]) -> int:
        return [a + layout.rank if a < 0 else a for a in axes].index(layout.axis)

    if len(node.input) == 1:  # opset < 10: attributes
        attrs = {a.name: a for a in node.attribute}
        k = channel_index(list(attrs["axes"].ints) if "axes" in attrs else list(range(len(attrs["starts"].ints))))
        attrs["starts"].ints[k], attrs["ends"].ints[k] = run(attrs["starts"].ints[k], attrs["ends"].ints[k])
        return
    starts = numpy_helper.to_array(inits[node.input[1]]).astype(np.int64).reshape(-1).copy()
    ends = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64).reshape(-1).copy()
    axes = numpy_helper.to_array(inits[node.input[3]]).reshape(-1).tolist() if len(node.input) > 3 and node.input[3] \
        else list(range(starts.size))
    k = channel_index([int(a) for a in axes])
    starts[k], ends[k] = run(int(starts[k]), int(ends[k]))
    node.input[1] = _new_const(model, f"{node.input[1]}_pruned_{node.name}", starts)
    node.input[2] = _new_const(model, f"{node.input[2]}_pruned_{node.name}", ends)


def _compensate(model: onnx.ModelProto, graph: DepGraph, removed: Mapping[int, np.ndarray],
                means: Mapping[str, np.ndarray], inits: dict[str, onnx.TensorProto]) -> None:
    nodes = {node.name: node for node in model.graph.node if node.name}
    deltas: dict[str, np.ndarray] = {}
    for gid, idx in removed.items():
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            continue
        for cut in graph.groups[gid].cuts:
            node = nodes.get(cut.node)
            if cut.kind != "consumer" or node is None or node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 \
                    or node.input[2] not in inits or node.input[0] not in means:
                continue
            if node.op_type == "Conv" and any(a.name == "group" and a.i != 1 for a in node.attribute):
                continue
            pos = cut.positions(idx)
            if pos.size == 0:
                continue
            mean = np.asarray(means[node.input[0]], dtype=np.float64)
            if pos.max() >= mean.size:
                continue
            w = numpy_helper.to_array(inits[cut.init]).astype(np.float64)
            if node.op_type == "Conv":
                contrib = w[:, pos].reshape(w.shape[0], pos.size, -1).sum(axis=2) @ mean[pos]
            elif cut.axis == 1:  # Gemm transB=1: W [O, F]
                contrib = w[:, pos] @ mean[pos]
            else:
                contrib = w[pos, :].T @ mean[pos]
            deltas[node.input[2]] = deltas.get(node.input[2], 0.0) + contrib
    for name, delta in deltas.items():
        bias = numpy_helper.to_array(inits[name])
        if bias.size != np.size(delta):
            continue
        updated = (bias.astype(np.float64) + np.reshape(delta, bias.shape)).astype(bias.dtype)
        inits[name].CopyFrom(numpy_helper.from_array(updated, name))


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _set_int_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _new_const(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    taken = {i.name for i in model.graph.initializer}
    base, n = name, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return name
