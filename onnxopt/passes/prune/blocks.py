"""Depth pruning: remove whole blocks (a residual branch, or a layer whose output has its input's shape).

Why: on small nets ONNX Runtime's time at batch 1 is dominated by per-node overhead, not by MACs. Channel pruning
that halves the MACs of the digits nets gives 1.3x-1.5x, while removing a block also removes its nodes' fixed cost.

A *block* is a single-entry single-exit region of the graph: a value ``exit`` that depends, apart from weights, on
one value ``entry`` only, through nodes whose other outputs stay inside the region, with shape(entry) ==
shape(exit) and at least one Conv/ConvTranspose/Gemm/MatMul inside. Removing it rewires ``exit``'s consumers to
``entry``: a residual ``Add(x, f(x))`` becomes ``x``, a stride-1 ShuffleNet unit or a VGG conv layer with as many
output as input channels becomes the identity. Graph outputs and regions that are read from outside are never
touched. Importance is measured, not guessed: how far the model's outputs move when that block *alone* is removed,
on calibration data (or seeded random inputs); the least important go first. Accuracy comes back with ``distill``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.calib_data.base import DataSource
from onnxopt.modelio import InputSpec
from onnxopt.passes.prune.depgraph import _inferred, _shapes_of, _subgraph_inputs

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Ancestor values tried as the entry of a block ending at one value (nearest first) and the largest region.
MAX_ENTRY_CANDIDATES = 48
MAX_REGION_NODES = 256


@dataclass(frozen=True)
class Block:
    """A removable region: ``nodes`` are indices into ``graph.node`` of the model it was found in."""

    entry: str
    exit: str
    nodes: frozenset[int]
    weighted: tuple[str, ...]  # names (or op types) of the weighted nodes inside, for reports

    def describe(self) -> str:
        return f"{self.entry} -> {self.exit} ({len(self.nodes)} nodes: {', '.join(self.weighted[:3])})"


def value_shapes(proto: onnx.ModelProto,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int | None]]:
    """Inferred shapes of every value, with the graph's dynamic input dims fixed from ``input_shapes`` first."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for value in fixed.graph.input:
        if not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        dims = (input_shapes or {}).get(value.name)
        if dims is None:  # batch 1 for a symbolic first dim; other symbolic dims stay unknown
            dims = [d.dim_value if d.HasField("dim_value") else (1 if i == 0 else 0) for i, d in enumerate(shape.dim)]
        if len(shape.dim) != len(dims) or 0 in dims:
            continue
        for dim, size in zip(shape.dim, dims):
            dim.Clear()
            dim.dim_value = int(size)
    inferred = _inferred(fixed)
    shapes = _shapes_of(inferred)
    unknown = [o for n in fixed.graph.node for o in n.output
               if o and (shapes.get(o) is None or None in shapes[o])]
    if unknown:
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
        shapes.update(_measured_shapes(fixed, unknown, types))
    return shapes


def _measured_shapes(proto: onnx.ModelProto, names: Sequence[str],
                     types: Mapping[str, int]) -> dict[str, list[int | None]]:
    """Shapes of ``names`` (element types from shape inference) from one ONNX Runtime run on zeros: static inference
    cannot follow shape arithmetic on run-time shapes, e.g. a channel shuffle's Reshape. {} when the inputs' shapes
    are not all known."""
    feeds = {}
    for value in proto.graph.input:
        t = value.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        if not value.type.HasField("tensor_type") or any(d <= 0 for d in dims):
            return {}
        feeds[value.name] = np.zeros(dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {o.name for o in probe.graph.output}
    wanted = [n for n in names if types.get(n) and n not in present]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in wanted)
    try:
        from onnxopt.runtime import make_session

        session = make_session(probe, optimization="disable", what="the shape probe")
        values = session.run(wanted, feeds)
    except Exception:  # noqa: BLE001 - shapes are a help: without them fewer blocks are found
        return {}
    return {n: list(v.shape) for n, v in zip(wanted, values)}


def find_blocks(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int | None]]) -> list[Block]:
    """Every removable block of the top graph, the largest region kept where several share the same weights."""
    graph = proto.graph
    nodes = list(graph.node)
    constants = {t.name for t in graph.initializer} | {
        o for n in nodes if n.op_type == "Constant" for o in n.output}
    outputs = {o.name for o in graph.output}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in set(n.input) | _subgraph_inputs(n):
            consumers.setdefault(name, []).append(i)

    def shape_of(name: str) -> tuple[int | None, ...] | None:
        dims = shapes.get(name)
        if dims is None or len(dims) < 3 or any(d is None for d in list(dims)[1:]):
            return None  # blocks carry feature maps or token sequences: shape arithmetic (1-D) never is one
        return tuple(dims[1:])

    found: dict[frozenset[int], Block] = {}
    for i, node in enumerate(nodes):
        if node.op_type == "Constant":
            continue
        for exit_name in node.output:
            if not exit_name or exit_name in outputs or shape_of(exit_name) is None:
                continue
            block = _nearest_block(exit_name, nodes, producer, consumers, constants, outputs, shape_of)
            if block is None:
                continue
            key = frozenset(j for j in block.nodes if nodes[j].op_type in WEIGHTED_OPS)
            if key not in found or len(block.nodes) > len(found[key].nodes):
                found[key] = block
    return sorted(found.values(), key=lambda b: min(b.nodes))


def _nearest_block(exit_name: str, nodes: list[onnx.NodeProto], producer: Mapping[str, int],
                   consumers: Mapping[str, list[int]], constants: set[str], outputs: set[str],
                   shape_of) -> Block | None:  # noqa: ANN001 - a closure over the shapes
    """The block ending at ``exit_name`` whose entry is the nearest ancestor value of the same shape, if any."""
    target = shape_of(exit_name)
    ancestors: list[str] = []
    seen: set[str] = set()
    stack = [producer[exit_name]]
    visited_nodes: set[int] = set()
    while stack and len(visited_nodes) < MAX_REGION_NODES:
        j = stack.pop()
        if j in visited_nodes:
            continue
        visited_nodes.add(j)
        for name in nodes[j].input:
            if name and name not in constants and name not in seen:
                seen.add(name)
                ancestors.append(name)
                if name in producer:
                    stack.append(producer[name])
    # nearest first: the later a value is produced, the closer it is to the exit
    ancestors.sort(key=lambda v: producer.get(v, -1), reverse=True)
    tried = 0
    for entry in ancestors:
        if shape_of(entry) != target:
            continue
        tried += 1
        if tried > MAX_ENTRY_CANDIDATES:
            break
        region = _region(exit_name, entry, nodes, producer, constants)
        if region is None:
            continue
        if not any(nodes[j].op_type in WEIGHTED_OPS for j in region):
            continue
        if _leaks(region, exit_name, nodes, consumers, outputs):
            continue
        weighted = tuple(nodes[j].name or nodes[j].op_type for j in sorted(region)
                         if nodes[j].op_type in WEIGHTED_OPS)
        return Block(entry, exit_name, frozenset(region), weighted)
    return None


def _region(exit_name: str, entry: str, nodes: list[onnx.NodeProto], producer: Mapping[str, int],
            constants: set[str]) -> set[int] | None:
    """Nodes between ``entry`` and ``exit_name``, or None when the exit also depends on another non-constant value."""
    region: set[int] = set()
    stack = [producer[exit_name]]
    while stack:
        j = stack.pop()
        if j in region:
            continue
        region.add(j)
        if len(region) > MAX_REGION_NODES:
            return None
        for name in list(nodes[j].input) + sorted(_subgraph_inputs(nodes[j])):
            if not name or name == entry or name in constants:
                continue
            if name not in producer:  # a graph input other than the entry
                return None
            stack.append(producer[name])
    return region


def _leaks(region: set[int], exit_name: str, nodes: list[onnx.NodeProto], consumers: Mapping[str, list[int]],
           outputs: set[str]) -> bool:
    """Whether a value made inside the region (other than its exit) is read outside it or is a graph output."""
    for j in region:
        for name in nodes[j].output:
            if not name or name == exit_name:
                continue
            if name in outputs or any(k not in region for k in consumers.get(name, ())):
                return True
    return False


def remove_blocks(proto: onnx.ModelProto, blocks: Sequence[Block]) -> onnx.ModelProto:
    """A copy of ``proto`` without ``blocks`` (found in ``proto``, regions disjoint); unused weights dropped."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    dropped: set[int] = set().union(*(b.nodes for b in blocks)) if blocks else set()
    alias: dict[str, str] = {}

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    for block in sorted(blocks, key=lambda b: min(b.nodes)):
        alias[block.exit] = resolve(block.entry)
    kept = []
    for i, node in enumerate(graph.node):
        if i in dropped:
            continue
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = resolve(name)
        kept.append(node)
    graph_outputs = {o.name for o in graph.output}
    for name in sorted(graph_outputs & set(alias)):  # never the case for found blocks; kept for safety
        kept.append(onnx.helper.make_node("Identity", [resolve(name)], [name], name=f"{name}__block_identity"))
    del graph.node[:]
    graph.node.extend(kept)
    used = {n for node in graph.node for n in node.input} | {
        n for node in graph.node for n in _subgraph_inputs(node)} | graph_outputs
    keep_init = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_init)
    keep_vi = [v for v in graph.value_info if v.name in used or any(v.name in n.output for n in graph.node)]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    return out


def block_scores(proto: onnx.ModelProto, blocks: Sequence[Block], data: DataSource | None,
                 specs: Sequence[InputSpec], samples: int, threads: int | None, seed: int,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[float]:
    """Relative squared change of the model's outputs when each block alone is removed (lower = less important)."""
    from onnxopt.runtime import make_session

    feeds = _feeds(data, specs, samples, seed, input_shapes)
    reference = _run(make_session(proto, threads=threads, what="the model to prune"), feeds)
    scores = []
    for block in blocks:
        session = make_session(remove_blocks(proto, [block]), threads=threads, what=f"block {block.describe()}")
        outputs = _run(session, feeds)
        num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(outputs, reference))
        den = sum(float(np.sum(b ** 2)) for b in reference) or 1.0
        scores.append(num / den)
    return scores


def _feeds(data: DataSource | None, specs: Sequence[InputSpec], samples: int, seed: int,
           input_shapes: Mapping[str, Sequence[int]] | None) -> list[dict[str, np.ndarray]]:
    if data is not None:
        feeds, count = [], 0
        for batch in data.iter_batches(specs, batch_size=16):
            feeds.append(dict(batch.inputs))
            count += len(next(iter(batch.inputs.values())))
            if count >= samples:
                break
        return feeds
    from onnxopt.calib_data.synthetic import RandomSource

    source = RandomSource(min(samples, 32), seed=seed, input_shapes=input_shapes)
    return [dict(b.inputs) for b in source.iter_batches(specs, batch_size=min(samples, 32))]


def _run(session, feeds: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:  # noqa: ANN001 - ORT session
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(names, feed) for feed in feeds]
    return [np.concatenate([p[k].astype(np.float64) for p in parts]) for k in range(len(names))]


def select(blocks: Sequence[Block], scores: Sequence[float], count: int) -> list[Block]:
    """The ``count`` least important blocks whose regions do not overlap (greedy, lowest score first)."""
    chosen: list[Block] = []
    taken: set[int] = set()
    for _, block in sorted(zip(scores, blocks), key=lambda p: p[0]):
        if len(chosen) >= count:
            break
        if block.nodes & taken:
            continue
        chosen.append(block)
        taken |= block.nodes
    return chosen
