"""Channel dependency groups on an ONNX graph (the DepGraph idea of Fang et al. 2023, on ONNX instead of torch).

Every Conv/ConvTranspose/Gemm/MatMul with constant weights creates a *channel space* (its output channels). Walking
the graph in topological order, each tensor gets a *layout*: which spaces its channel axis is made of (a Concat
stacks several; a Flatten turns each channel into a block of features). Ops that must see the same channels (a
residual Add, the Mul of a squeeze-and-excitation block, a depthwise Conv) unite spaces; a group is one union of
spaces, pruned with one index set everywhere it appears.

A Gather of constant channel indices (a channel shuffle after ``normalize``, see
:mod:`onnxopt.passes.shuffle_fusion`) gives an *explicit* layout: the (space, channel) at each position. Split,
Concat, depthwise Conv and the consumers' weights follow explicit layouts position by position, so channels keep
their identity through any number of shuffles.

The analysis is conservative: an op it does not understand, a Reshape/Transpose that moves channels (an unfused
channel shuffle), a graph output, a shared weight or a protected node *blocks* every space it touches, with a
reason. A blocked group is left whole and listed in the report.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt.modelio import all_nodes

#: Ops whose first output has the channels of their first input, whatever the other inputs (scalars) are.
UNARY_SAME = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu", "Gelu",
    "Softplus", "Softsign", "Mish", "Swish", "Identity", "Dropout", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Erf", "Floor", "Ceil", "Round", "Cast", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool", "ThresholdedRelu", "Shrink", "Sign",
})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow"})
REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd"})


@dataclass(frozen=True)
class Seg:
    """A whole channel space inside a tensor's channel axis; each channel spans ``block`` consecutive features."""

    space: int
    block: int = 1


@dataclass(frozen=True)
class Layout:
    """Which channel spaces make up a tensor's channel axis.

    Canonical (``order`` None): the spaces of ``segs`` one after another, each whole. Explicit: ``order`` gives the
    (space, channel) at each position (block 1), e.g. after a channel Gather; ``segs`` then lists the spaces met."""

    axis: int
    rank: int
    segs: tuple[Seg, ...]
    order: tuple[tuple[int, int], ...] | None = None


def layout_entries(layout: Layout, space_size: dict[int, int]) -> list[tuple[int, int]]:
    """The (space, channel) at each channel position of ``layout`` (blocks not expanded)."""
    if layout.order is not None:
        return list(layout.order)
    return [(seg.space, c) for seg in layout.segs for c in range(space_size[seg.space])]


@dataclass(frozen=True)
class Cut:
    """Channel i of a space is the slice ``offset + i*block ... + block`` of initializer ``init`` along ``axis``."""

    init: str
    axis: int
    offset: int
    block: int
    kind: str  # producer | consumer | param | bn_scale
    node: str = ""  # the node whose weight this is
    #: explicit layouts: the position of each channel of the space (-1: not in this tensor); then ``offset`` is 0
    index: tuple[int, ...] | None = None

    def positions(self, channels: np.ndarray) -> np.ndarray:
        """Indices along ``axis`` of ``init`` that hold ``channels`` of the space (absent channels skipped)."""
        channels = np.asarray(channels, dtype=np.int64).reshape(-1)
        if self.index is not None:
            slots = np.asarray(self.index, dtype=np.int64)[channels]
            channels = slots[slots >= 0]
        return self.offset + (channels[:, None] * self.block + np.arange(self.block)[None, :]).ravel()


@dataclass
class Group:
    """Coupled channel spaces pruned together (one index set)."""

    id: int
    size: int
    spaces: list[int]
    producers: list[str]
    cuts: list[Cut]
    blocked: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.blocked


@dataclass
class Rewrite:
    """An attribute or shape constant that depends on channel counts, recomputed after pruning."""

    kind: str  # group (depthwise Conv), split, reshape, gather, slice
    node: str
    layouts: list[Layout]


@dataclass
class DepGraph:
    groups: list[Group]
    rewrites: list[Rewrite]
    space_root: dict[int, int]
    space_size: dict[int, int]

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def blocked_report(self) -> list[dict[str, object]]:
        return [{"group": g.id, "channels": g.size, "producers": g.producers, "reasons": sorted(set(g.blocked))[:5]}
                for g in self.groups if g.blocked]


def lift_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose tensor Constant nodes (top graph) are initializers, so weights are found in one place."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    keep = []
    for node in out.graph.node:
        tensor = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                      None)
        if node.op_type == "Constant" and tensor is not None and len(node.attribute) == 1:
            init = onnx.TensorProto()
            init.CopyFrom(tensor)
            init.name = node.output[0]
            out.graph.initializer.append(init)
        else:
            keep.append(node)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    return _shapes_of(_inferred(proto))


def _inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with ONNX shape inference applied, or ``proto`` itself where inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - shapes are a help; without them fewer groups are prunable
        return proto


def _shapes_of(inferred: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Dims of every value with shape information (inputs, value_info, outputs, initializers); None = unknown."""
    result: dict[str, list[int | None]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            result[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for init in g.initializer:
        result[init.name] = list(init.dims)
    return result


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Analysis:
    def __init__(self, proto: onnx.ModelProto, protect: set[str]):
        self.proto = proto
        self.protect = protect
        self.inits = {i.name: i for i in proto.graph.initializer}
        self.shapes = _shapes(proto)
        self.uses: dict[str, int] = defaultdict(int)
        for node in all_nodes(proto.graph):
            for name in node.input:
                self.uses[name] += 1
        for out in proto.graph.output:
            self.uses[out.name] += 1
        self.parent: list[int] = []
        self.size: list[int] = []
        self.producers: dict[int, list[str]] = defaultdict(list)
        self.cuts: dict[int, list[Cut]] = defaultdict(list)
        self.blocked: dict[int, list[str]] = defaultdict(list)
        self.rewrites: list[Rewrite] = []
        self.layouts: dict[str, Layout | None] = {}
        #: a space cut into sub-spaces (``split_space``): its sub-spaces and their sizes, in channel order
        self.subspaces: dict[int, list[int]] = {}
        self.split_sizes: dict[int, list[int]] = {}

    # ---------------------------------------------------------------------------------------------- union-find
    def new_space(self, size: int, producer: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        sid = len(self.parent) - 1
        self.producers[sid].append(producer)
        return sid

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def block(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            for seg in layout.segs:
                self.blocked[seg.space].append(reason)

    def data_layout(self, layouts: list[Layout | None], why: str) -> Layout | None:
        """The data input's layout; channels reaching the node through its other inputs (weights, sizes, shapes)
        are blocked with ``why``, since a cut there would not follow them."""
        for lay in layouts[1:]:
            self.block(lay, why)
        return layouts[0]

    def const(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def cut(self, space: int, init: str, axis: int, offset: int, block: int, kind: str, node: str,
            index: tuple[int, ...] | None = None) -> None:
        if self.uses[init] > 1:
            self.blocked[space].append(f"initializer {init} is shared by several nodes ({node})")
        self.cuts[space].append(Cut(init, axis, offset, block, kind, node, index))

    def width(self, layout: Layout) -> int:
        """Features along the layout's axis."""
        if layout.order is not None:
            return len(layout.order)
        return sum(self.size[s.space] * s.block for s in layout.segs)

    def explicit(self, axis: int, rank: int, order: list[tuple[int, int]]) -> Layout:
        """A layout for ``order``, canonical again when it is whole spaces in their own channel order."""
        segs = tuple(Seg(space) for space in dict.fromkeys(space for space, _ in order))
        canonical = [(seg.space, c) for seg in segs for c in range(self.size[seg.space])]
        return Layout(axis, rank, segs, None if canonical == order else tuple(order))

    def seg_cuts(self, layout: Layout, init: str, axis: int, kind: str, node: str) -> None:
        if layout.order is not None:  # one cut per occurrence: a channel may appear twice (Concat of two
            for seg in layout.segs:     # depthwise convs of one tensor), and both positions go with it
                where: dict[int, list[int]] = defaultdict(list)
                for pos, (space, channel) in enumerate(layout.order):
                    if space == seg.space:
                        where[channel].append(pos)
                for k in range(max(len(v) for v in where.values())):
                    index = tuple(where[c][k] if len(where[c]) > k else -1 for c in range(self.size[seg.space]))
                    self.cut(seg.space, init, axis, 0, 1, kind, node, index)
            return
        offset = 0
        for seg in layout.segs:
            self.cut(seg.space, init, axis, offset, seg.block, kind, node)
            offset += self.size[seg.space] * seg.block

    def dims(self, name: str) -> list[int | None] | None:
        return self.shapes.get(name)

    # ------------------------------------------------------------------------------------------------- walk
    def run(self) -> DepGraph:
        for node in self.proto.graph.node:
            layouts = [self.layouts.get(x) if x else None for x in node.input]
            name = node.name or f"{node.op_type}:{node.output[0]}"
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                for lay in layouts:
                    self.block(lay, f"{node.op_type} node {name} has subgraphs")
                for sub in _subgraph_inputs(node):
                    self.block(self.layouts.get(sub), f"used inside the subgraph of {name}")
                continue
            if name in self.protect:
                for lay in layouts:
                    self.block(lay, f"protected node {name}")
            out = self.visit(node, name, layouts)
            if node.output:
                self.layouts[node.output[0]] = out
                if name in self.protect:
                    self.block(out, f"protected node {name}")
            for extra in node.output[1:]:
                if extra and self.uses[extra] and node.op_type != "Split":
                    self.block(out, f"{node.op_type} node {name} has a second output in use")
        for out in self.proto.graph.output:
            self.block(self.layouts.get(out.name), f"graph output {out.name}")
        return self.result()

    def visit(self, node: onnx.NodeProto, name: str, layouts: list[Layout | None]) -> Layout | None:
        op = node.op_type
        lay0 = layouts[0] if layouts else None
        if op in ("Conv", "ConvTranspose"):
            return self.conv(node, name, layouts)
        if op == "Gemm":
            return self.gemm(node, name, layouts)
        if op == "MatMul":
            return self.matmul(node, name, layouts)
        if op in UNARY_SAME or op == "BatchNormalization" or op == "PRelu" or op == "InstanceNormalization":
            if lay0 is None:
                for lay in layouts[1:]:
                    self.block(lay, f"{op} node {name}: channels in a parameter input")
                return None
            if op in ("BatchNormalization", "InstanceNormalization"):
                for i, inp in enumerate(node.input[1:], start=1):
                    if inp not in self.inits:
                        self.block(lay0, f"{op} node {name} has non-constant parameters")
                        return None
                    self.seg_cuts(lay0, inp, 0, "bn_scale" if i == 1 and op == "BatchNormalization" else "param", name)
                return lay0
            if op == "PRelu":
                return self.elementwise(node, name, layouts)
            for lay in layouts[1:]:
                self.block(lay, f"{op} node {name}: channels in a parameter input")
            if op in ("MaxPool", "AveragePool", "LpPool") and lay0.axis != 1:
                self.block(lay0, f"{op} node {name} pools over the channel axis")
            return lay0
        if op in ELEMENTWISE:
            return self.elementwise(node, name, layouts)
        if op == "Concat":
            return self.concat(node, name, layouts)
        if op == "Split":
            return self.split(node, name, layouts)
        if all(lay is None for lay in layouts):
            return None
        if op in ("Flatten", "Reshape"):
            return self.reshape(node, name, layouts)
        if op == "Gather":
            return self.gather(node, name, layouts)
        if op in ("Squeeze", "Unsqueeze"):
            return self.squeeze(node, name, layouts)
        if op in REDUCE or op in ("Softmax", "LogSoftmax", "Slice", "Pad", "Resize", "Upsample"):
            return self.axis_preserving(node, name, layouts)
        for lay in layouts:
            self.block(lay, f"{op} node {name} is not understood by the dependency analysis")
        return None

    def conv(self, node: onnx.NodeProto, name: str, layouts: list[Layout | None]) -> Layout | None:
        lay0 = self.data_layout(layouts, f"{node.op_type} node {name}: channels in a weight input")
        w = self.const(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            self.block(lay0, f"{node.op_type} node {name} has non-constant weights")
            return None
        if lay0 is not None and lay0.axis != 1:
            self.block(lay0, f"{node.op_type} node {name}: channels not on axis 1")
            lay0 = None
        group = int(_attr(node, "group", 1))  # type: ignore[arg-type]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        transpose = node.op_type == "ConvTranspose"
        c_out = w.shape[1] * group if transpose else w.shape[0]
        c_in = w.shape[0] if transpose else w.shape[1] * group
        if group == 1:
            if lay0 is not None:
                if any(seg.block != 1 for seg in lay0.segs):
                    self.block(lay0, f"{node.op_type} node {name}: flattened channels")
                else:
                    self.seg_cuts(lay0, node.input[1], 0 if transpose else 1, "consumer", name)
            space = self.new_space(c_out, name)
            self.cut(space, node.input[1], 1 if transpose else 0, 0, 1, "producer", name)
            if bias:
                self.cut(space, bias, 0, 0, 1, "producer", name)
            return Layout(1, w.ndim, (Seg(space),))
        if not transpose and group == c_in == c_out and w.shape[1] == 1 and lay0 is not None:
            self.seg_cuts(lay0, node.input[1], 0, "param", name)
            if bias:
                self.seg_cuts(lay0, bias, 0, "param", name)
            self.rewrites.append(Rewrite("group", name, [lay0]))
            return lay0
        self.block(lay0, f"{node.op_type} node {name} is a grouped convolution (group={group})")
        space = self.new_space(c_out, name)
        self.blocked[space].append(f"{node.op_type} node {name} is a grouped convolution (group={group})")
        return Layout(1, w.ndim, (Seg(space),))

    def gemm(self, node: onnx.NodeProto, name: str, layouts: list[Layout | None]) -> Layout | None:
        lay0 = self.data_layout(layouts, f"Gemm node {name}: channels in a weight input")
        w = self.const(node.input[1])
        if w is None or w.ndim != 2 or _attr(node, "transA", 0):
            self.block(lay0, f"Gemm node {name}: weights not a constant matrix (or transA)")
            return None
        trans_b = bool(_attr(node, "transB", 0))
        if lay0 is not None:
            self.seg_cuts(lay0, node.input[1], 1 if trans_b else 0, "consumer", name)
        space = self.new_space(w.shape[0] if trans_b else w.shape[1], name)
        self.cut(space, node.input[1], 0 if trans_b else 1, 0, 1, "producer", name)
        if len(node.input) > 2 and node.input[2]:
            c = self.const(node.input[2])
            if c is None:
                self.blocked[space].append(f"Gemm node {name}: non-constant bias")
            elif c.ndim >= 1 and c.shape[-1] == self.size[space] and c.size == self.size[space]:
                self.cut(space, node.input[2], c.ndim - 1, 0, 1, "producer", name)
            elif c.size != 1:
                self.blocked[space].append(f"Gemm node {name}: bias of shape {list(c.shape)}")
        return Layout(1, 2, (Seg(space),))

    def matmul(self, node: onnx.NodeProto, name: str, layouts: list[Layout | None]) -> Layout | None:
        lay0, lay1 = layouts[0], layouts[1]
        w = self.const(node.input[1])
        self.block(lay1, f"MatMul node {name}: channels in the right operand")
        if w is None or w.ndim != 2:
            self.block(lay0, f"MatMul node {name}: right operand not a constant matrix")
            return None
        if lay0 is not None:
            if lay0.axis != lay0.rank - 1:
                self.block(lay0, f"MatMul node {name}: channels not on the last axis")
            else:
                self.seg_cuts(lay0, node.input[1], 0, "consumer", name)
        space = self.new_space(w.shape[1], name)
        self.cut(space, node.input[1], 1, 0, 1, "producer", name)
        rank = len(self.dims(node.input[0]) or [None, None])
        return Layout(rank - 1, rank, (Seg(space),))

    def elementwise(self, node: onnx.NodeProto, name: str, layouts: list[Layout | None]) -> Layout | None:
        ref = next((lay for lay in layouts if lay is not None), None)
        if ref is None:
            return None
        out_rank = max([len(self.dims(x) or []) for x in node.input] + [ref.rank])
        if out_rank != ref.rank:
            for lay in layouts:
                self.block(lay, f"{node.op_type} node {name} broadcasts to a higher rank")
            return None
        width = self.width(ref)
        ref_index = next(i for i, lay in enumerate(layouts) if lay is not None)
        for index, (inp, lay) in enumerate(zip(node.input, layouts)):
            if index == ref_index:
                continue
            if lay is not None:
                lay, ref = self.layouts_now(lay), self.layouts_now(ref)
                if lay.order is not None or ref.order is not None:
                    if lay.order == ref.order and lay.axis == ref.axis and lay.rank == ref.rank:
                        continue  # the very same channels
                    for other in layouts:
                        self.block(other, f"{node.op_type} node {name} combines differently ordered channels")
                    return None
                if not self.same_layout(ref, lay):
                    refined = self.refine(ref, lay)
                    if refined is None:
                        for other in layouts:
                            self.block(other, f"{node.op_type} node {name} combines differently made channels")
                        return None
                    ref, lay = refined
                for a, b in zip(ref.segs, lay.segs):
                    self.union(a.space, b.space)
                continue
            dims = self.dims(inp)
            axis = ref.axis - (ref.rank - len(dims)) if dims is not None else None
            if dims is not None and (axis is None or axis < 0 or dims[axis] == 1):
                continue  # broadcast along the channels
            if dims is not None and dims[axis] == width and inp in self.inits:
                self.seg_cuts(ref, inp, axis, "param", name)
                continue
            self.block(ref, f"{node.op_type} node {name}: other operand {inp} has fixed channels")
            return None
        return ref

    def refine(self, a: Layout, b: Layout) -> tuple[Layout, Layout] | None:
        """Cut the spaces of two layouts of one width at each other's boundaries (e.g. the output of an SE block's
        last conv against a Concat), so they can be united segment by segment; None when a space that must be cut
        is already coupled to others, or the layouts differ otherwise."""
        if a.axis != b.axis or a.rank != b.rank or a.order is not None or b.order is not None:
            return None

        def bounds(lay: Layout) -> list[int]:
            out, pos = [], 0
            for seg in lay.segs:
                pos += self.size[seg.space] * seg.block
                out.append(pos)
            return out

        if bounds(a)[-1] != bounds(b)[-1]:
            return None
        cuts = sorted(set(bounds(a)) | set(bounds(b)))
        for lay in (a, b):
            pos = 0
            for seg in lay.segs:
                width = self.size[seg.space] * seg.block
                inner = [c - pos for c in cuts if pos < c < pos + width]
                if inner and (any(c % seg.block for c in inner) or not self.splittable(seg.space)):
                    return None
                if inner:
                    sizes = [y - x for x, y in zip([0] + inner, inner + [width])]
                    self.split_space(seg.space, [v // seg.block for v in sizes])
                pos += width
        a2, b2 = self.layouts_now(a), self.layouts_now(b)
        return (a2, b2) if self.same_layout(a2, b2) else None

    def splittable(self, space: int) -> bool:
        return self.find(space) == space and all(self.find(s) != space for s in range(len(self.parent)) if s != space)

    def split_space(self, space: int, sizes: list[int]) -> None:
        """Replace ``space`` by consecutive sub-spaces of ``sizes`` everywhere (cuts, layouts, rewrites)."""
        subs, start = [], 0
        for n in sizes:
            sid = self.new_space(n, self.producers[space][0])
            self.producers[sid] = list(self.producers[space])
            self.blocked[sid] = list(self.blocked[space])
            self.cuts[sid] = [replace(c, offset=c.offset + start * c.block) if c.index is None
                              else replace(c, index=c.index[start:start + n]) for c in self.cuts[space]]
            subs.append(sid)
            start += n
        self.cuts[space] = []
        self.producers[space] = []
        self.blocked[space] = []
        self.size[space] = 0
        self.subspaces[space] = subs
        self.split_sizes[space] = list(sizes)
        for key, lay in list(self.layouts.items()):
            if lay is not None:
                self.layouts[key] = self.layouts_now(lay)
        for rewrite in self.rewrites:
            rewrite.layouts[:] = [self.layouts_now(lay) for lay in rewrite.layouts]

    def layouts_now(self, lay: Layout) -> Layout:
        subs = self.subspaces
        if not any(seg.space in subs for seg in lay.segs):
            return lay
        if lay.order is not None:
            order = []
            for space, channel in lay.order:
                while space in subs:
                    for sub, n in zip(subs[space], self.split_sizes[space]):
                        if channel < n:
                            space = sub
                            break
                        channel -= n
                order.append((space, channel))
            return Layout(lay.axis, lay.rank, tuple(Seg(s) for s in dict.fromkeys(s for s, _ in order)), tuple(order))
        segs: list[Seg] = []
        stack = list(reversed(lay.segs))
        while stack:
            seg = stack.pop()
            if seg.space in subs:
                stack.extend(reversed([Seg(s, seg.block) for s in subs[seg.space]]))
            else:
                segs.append(seg)
        return Layout(lay.axis, lay.rank, tuple(segs))

    def same_layout(self, a: Layout, b: Layout) -> bool:
        if a.order is not None or b.order is not None:
            return a.order == b.order and a.axis == b.axis and a.rank == b.rank
        return (a.axis == b.axis and a.rank == b.rank and len(a.segs) == len(b.segs)
                and all(x.block == y.block and self.size[x.space] == self.size[y.space]
                        for x, y in zip(a.segs, b.segs)))

    def concat(self, node: onnx.NodeProto, name: str, layouts: list[Layout | None]) -> Layout | None:
        if all(lay is None for lay in layouts):
            return None
        ref = next(lay for lay in layouts if lay is not None)
        axis = int(_attr(node, "axis", 0))  # type: ignore[arg-type]
        axis = axis + ref.rank if axis < 0 else axis
        if axis != ref.axis or any(lay is None or lay.axis != ref.axis or lay.rank != ref.rank for lay in layouts):
            for lay in layouts:
                self.block(lay, f"Concat node {name} along another axis or with fixed inputs")
            return None
        if any(lay.order is not None for lay in layouts):  # type: ignore[union-attr]
            if any(seg.block != 1 for lay in layouts for seg in lay.segs):  # type: ignore[union-attr]
                for lay in layouts:
                    self.block(lay, f"Concat node {name} joins shuffled and flattened channels")
                return None
            order = [e for lay in layouts for e in layout_entries(lay, self.size_of())]  # type: ignore[arg-type]
            return self.explicit(ref.axis, ref.rank, order)
        return Layout(ref.axis, ref.rank, tuple(seg for lay in layouts for seg in lay.segs))  # type: ignore[union-attr]

    def size_of(self) -> dict[int, int]:
        return dict(enumerate(self.size))

    def gather(self, node: onnx.NodeProto, name: str, layouts: list[Layout | None]) -> Layout | None:
        """A Gather of constant, distinct indices along the channel axis is a known reordering (a fused channel
        shuffle, or a channel subset); along another axis it keeps the channels."""
        lay0 = self.data_layout(layouts, f"Gather node {name}: channels in the indices input")
        if lay0 is None:
            return None
        axis = int(_attr(node, "axis", 0))  # type: ignore[arg-type]
        axis = axis + lay0.rank if axis < 0 else axis
        indices = self.const(node.input[1])
        if axis != lay0.axis:
            if indices is None or indices.ndim != 1:
                self.block(lay0, f"Gather node {name} changes the rank around the channel axis")
                return None
            return lay0
        entries = layout_entries(lay0, self.size_of())
        if indices is None or indices.ndim != 1 or any(seg.block != 1 for seg in lay0.segs):
            self.block(lay0, f"Gather node {name} picks channels by non-constant or non-1-D indices")
            return None
        picked = [int(i) + len(entries) if int(i) < 0 else int(i) for i in indices]
        if len(set(picked)) != len(picked) or any(not 0 <= i < len(entries) for i in picked):
            self.block(lay0, f"Gather node {name} repeats channels or indexes out of range")
            return None
        out = self.explicit(lay0.axis, lay0.rank, [entries[i] for i in picked])
        self.rewrites.append(Rewrite("gather", name, [lay0, out]))
        return out

    def split(self, node: onnx.NodeProto, name: str, layouts: list[Layout | None]) -> Layout | None:
        lay0 = self.data_layout(layouts, f"Split node {name}: channels in the sizes input")
        if lay0 is None:
            return None
        axis = int(_attr(node, "axis", 0))  # type: ignore[arg-type]
        axis = axis + lay0.rank if axis < 0 else axis
        if axis != lay0.axis:
            for out in node.output:
                self.layouts[out] = lay0
            return lay0
        width = [self.size[s.space] * s.block for s in lay0.segs]
        sizes = _attr(node, "split")
        if sizes is None and len(node.input) > 1 and node.input[1]:
            arr = self.const(node.input[1])
            sizes = None if arr is None else [int(v) for v in arr]
        if sizes is None:
            n = len(node.output)
            total = sum(width)
            sizes = [total // n] * n if total % n == 0 else None
        if sizes is None:
            self.block(lay0, f"Split node {name}: unknown split sizes")
            return None
        if lay0.order is not None:
            if sum(sizes) != len(lay0.order):
                self.block(lay0, f"Split node {name}: split sizes do not add up to the channels")
                return None
            starts = [0, *np.cumsum(sizes).tolist()]
            result = [self.explicit(lay0.axis, lay0.rank, list(lay0.order[a:b])) for a, b in zip(starts, starts[1:])]
            for out, lay in zip(node.output, result):
                self.layouts[out] = lay
            self.rewrites.append(Rewrite("split", name, result))
            return result[0]
        bounds = list(np.cumsum(sizes))
        pos = 0
        for seg, w in zip(lay0.segs, width):
            inner = [int(b) - pos for b in bounds if pos < b < pos + w]
            if inner and not any(c % seg.block for c in inner) and self.splittable(seg.space):
                pieces = [y - x for x, y in zip([0] + inner, inner + [w])]
                self.split_space(seg.space, [v // seg.block for v in pieces])
            pos += w
        lay0 = self.layouts_now(lay0)
        width = [self.size[s.space] * s.block for s in lay0.segs]
        outs: list[list[Seg]] = []
        index = 0
        for size in sizes:
            segs, taken = [], 0
            while taken < size and index < len(lay0.segs):
                segs.append(lay0.segs[index])
                taken += width[index]
                index += 1
            if taken != size:
                self.block(lay0, f"Split node {name} cuts through a channel space")
                return None
            outs.append(segs)
        result = [Layout(lay0.axis, lay0.rank, tuple(s)) for s in outs]
        for out, lay in zip(node.output, result):
            self.layouts[out] = lay
        self.rewrites.append(Rewrite("split", name, result))
        return result[0]

    def reshape(self, node: onnx.NodeProto, name: str, layouts: list[Layout | None]) -> Layout | None:
        lay0 = self.data_layout(layouts, f"{node.op_type} node {name}: channels in the shape input")
        if lay0 is None:
            return None
        din, dout = self.dims(node.input[0]), self.dims(node.output[0])
        why = f"{node.op_type} node {name} moves channels (e.g. a channel shuffle)"
        if din is None or dout is None or lay0.axis != 1 or any(d is None for d in din[1:]) or \
                any(d is None for d in dout[1:]):
            self.block(lay0, why if din and dout else f"{node.op_type} node {name}: shapes unknown")
            return None
        if list(din[1:]) == list(dout[1:]):
            if node.op_type == "Reshape":
                self.rewrites.append(Rewrite("reshape", name, [lay0]))
            return lay0
        inner = int(np.prod(din[2:])) if len(din) > 2 else 1
        if len(dout) == 2 and dout[1] == int(np.prod(din[1:])) and \
                (node.op_type == "Reshape" or int(_attr(node, "axis", 1)) == 1):  # type: ignore[arg-type]
            if lay0.order is not None and inner != 1:
                self.block(lay0, f"{node.op_type} node {name} flattens reordered channels")
                return None
            out = replace(lay0, axis=1, rank=2, segs=tuple(Seg(s.space, s.block * inner) for s in lay0.segs))
            if node.op_type == "Reshape":
                self.rewrites.append(Rewrite("reshape", name, [out]))
            return out
        self.block(lay0, why)
        return None

    def squeeze(self, node: onnx.NodeProto, name: str, layouts: list[Layout | None]) -> Layout | None:
        lay0 = layouts[0]
        assert lay0 is not None
        axes = _attr(node, "axes")
        if axes is None and len(node.input) > 1:
            arr = self.const(node.input[1])
            axes = None if arr is None else [int(v) for v in arr]
        if axes is None:
            self.block(lay0, f"{node.op_type} node {name}: axes unknown")
            return None
        if node.op_type == "Squeeze":
            axes = [a + lay0.rank if a < 0 else a for a in axes]
            if lay0.axis in axes:
                self.block(lay0, f"Squeeze node {name} removes the channel axis")
                return None
            return replace(lay0, axis=lay0.axis - sum(a < lay0.axis for a in axes), rank=lay0.rank - len(axes))
        rank = lay0.rank + len(axes)
        axes = sorted(a + rank if a < 0 else a for a in axes)
        kept = [i for i in range(rank) if i not in axes]
        return replace(lay0, axis=kept[lay0.axis], rank=rank)

    def axis_preserving(self, node: onnx.NodeProto, name: str, layouts: list[Layout | None]) -> Layout | None:
        """Ops that keep the channels unless they act on the channel axis (reductions, Softmax, Slice, Pad, Resize)."""
        op = node.op_type
        lay0 = self.data_layout(layouts, f"{op} node {name}: channels in a parameter input")
        if lay0 is None:
            return None
        din, dout = self.dims(node.input[0]), self.dims(node.output[0])
        if op in REDUCE or op in ("Softmax", "LogSoftmax"):
            axes = _attr(node, "axes")
            if axes is None and op in ("Softmax", "LogSoftmax"):
                axes = [_attr(node, "axis", -1)]
            if axes is None and len(node.input) > 1 and node.input[1]:
                arr = self.const(node.input[1])
                axes = None if arr is None else [int(v) for v in arr]
            keep = int(_attr(node, "keepdims", 1))  # type: ignore[arg-type]
            axes = None if axes is None else [a + lay0.rank if a < 0 else a for a in axes]
            if axes is None or lay0.axis in axes:
                self.block(lay0, f"{op} node {name} acts on the channel axis")
                return None
            if op in REDUCE and not keep:  # reduced axes vanish: the channel axis moves left past those before it
                return replace(lay0, axis=lay0.axis - sum(a < lay0.axis for a in set(axes)),
                               rank=lay0.rank - len(set(axes)))
            return lay0
        if op == "Slice" and not (din is not None and dout is not None and len(din) == len(dout)
                                  and din[lay0.axis] is not None and din[lay0.axis] == dout[lay0.axis]):
            return self.channel_slice(node, name, lay0)
        # Slice, Pad, Resize, Upsample: fine when the channel dim is the same before and after.
        if din is None or dout is None or len(din) != len(dout) or din[lay0.axis] is None \
                or din[lay0.axis] != dout[lay0.axis]:
            self.block(lay0, f"{op} node {name} changes (or may change) the channel axis")
            return None
        if op in ("Resize", "Upsample") and len(node.input) > 3 and node.input[3]:
            self.block(lay0, f"{op} node {name} has explicit output sizes")
            return None
        if op == "Pad" and din[lay0.axis] is None:
            self.block(lay0, f"Pad node {name}: shapes unknown")
            return None
        return lay0

    def channel_slice(self, node: onnx.NodeProto, name: str, lay0: Layout) -> Layout | None:
        """A Slice with constant bounds and step 1 on the channel axis picks a known run of channels (torch's
        ``chunk`` of a ShuffleNet unit): an explicit layout. After pruning, the kept channels of the run are still a
        run of the pruned input, so only its bounds change."""
        bounds = _slice_bounds(node, self.const)
        why = f"Slice node {name} changes (or may change) the channel axis"
        if bounds is None or any(seg.block != 1 for seg in lay0.segs):
            self.block(lay0, why)
            return None
        starts, ends, axes, steps = bounds
        axes = [a + lay0.rank if a < 0 else a for a in axes]
        if axes.count(lay0.axis) != 1 or steps[axes.index(lay0.axis)] != 1:
            self.block(lay0, why)
            return None
        k = axes.index(lay0.axis)
        entries = layout_entries(lay0, self.size_of())
        picked = entries[starts[k]:ends[k]]
        if not picked:
            self.block(lay0, f"Slice node {name} keeps no channel")
            return None
        out = self.explicit(lay0.axis, lay0.rank, picked)
        self.rewrites.append(Rewrite("slice", name, [lay0, out]))
        return out

    def result(self) -> DepGraph:
        members: dict[int, list[int]] = defaultdict(list)
        for s in range(len(self.parent)):
            if self.size[s] > 0:  # 0: replaced by sub-spaces
                members[self.find(s)].append(s)
        groups = []
        for gid, (root, spaces) in enumerate(sorted(members.items())):
            groups.append(Group(
                id=gid, size=self.size[root], spaces=spaces,
                producers=list(dict.fromkeys(p for s in spaces for p in self.producers[s])),
                cuts=[], blocked=[r for s in spaces for r in self.blocked[s]],
            ))
        root_to_group = {root: g.id for (root, _), g in zip(sorted(members.items()), groups)}
        space_root = {s: root_to_group[self.find(s)] for s in range(len(self.parent)) if self.size[s] > 0}
        for space, items in self.cuts.items():
            if space in space_root:
                groups[space_root[space]].cuts.extend(items)
        return DepGraph(groups=groups, rewrites=self.rewrites, space_root=space_root,
                        space_size={s: self.size[s] for s in range(len(self.parent))})


def _slice_bounds(node: onnx.NodeProto, const) -> tuple[list[int], list[int], list[int], list[int]] | None:  # noqa: ANN001
    """(starts, ends, axes, steps) of a Slice whose bounds are constants (inputs from opset 10, else attributes)."""
    if len(node.input) == 1:  # opset < 10
        starts, ends = _attr(node, "starts"), _attr(node, "ends")
        if starts is None or ends is None:
            return None
        axes = _attr(node, "axes", list(range(len(starts))))  # type: ignore[arg-type]
        return list(starts), list(ends), list(axes), [1] * len(starts)  # type: ignore[arg-type]
    arrays = [const(v) if v else None for v in node.input[1:5]]
    if arrays[0] is None or arrays[1] is None or any(v and a is None for v, a in zip(node.input[3:5], arrays[2:])):
        return None
    starts, ends = [int(v) for v in arrays[0].reshape(-1)], [int(v) for v in arrays[1].reshape(-1)]
    axes = [int(v) for v in arrays[2].reshape(-1)] if len(arrays) > 2 and arrays[2] is not None \
        else list(range(len(starts)))
    steps = [int(v) for v in arrays[3].reshape(-1)] if len(arrays) > 3 and arrays[3] is not None else [1] * len(starts)
    return starts, ends, axes, steps


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in all_nodes(sub):
                names.update(inner.input)
    return names


def analyze(proto: onnx.ModelProto, protect: set[str] | frozenset[str] = frozenset()) -> DepGraph:
    """Dependency groups of ``proto`` (whose Constant weights must already be initializers: :func:`lift_constants`)."""
    return _Analysis(proto, set(protect)).run()
