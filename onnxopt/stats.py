"""Static model statistics: file size, parameters, node and op counts, multiply-accumulates (MACs).

MACs need the shape of every Conv/Gemm/MatMul operand, so dynamic input dims are fixed (the leading batch dim to
``batch_size``, the others from ``input_shapes``) and ONNX shape inference is run on a shapes-only copy of the graph:
large weights become typed graph inputs, so a 1 GB model is not copied to count its MACs. A node whose shapes stay
unknown contributes 0 MACs and is listed in ``macs_unknown_nodes`` rather than being guessed.

Conventions: one MAC is one multiply and one add; bias additions, activations, pooling and element-wise ops are not
counted (they are memory-bound and small next to Conv/Gemm/MatMul). Quantized variants (QLinearConv, ConvInteger,
QLinearMatMul, MatMulInteger, com.microsoft QGemm, ...) count like their float forms; a QDQ model
(DequantizeLinear -> Conv) counts the Conv itself.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.modelio import as_ir_model, input_specs, serialized_size
from onnxopt.passes.shapes import LONG_VECTOR_PREFIX

# Initializers up to this many elements keep their data in the shape-inference copy: shape tensors of Reshape,
# Resize scales, Slice starts need their values for data propagation; weights only need their shapes.
_SMALL_TENSOR = 1024

# Inputs that hold quantization parameters (scales and zero points), by op type: not counted as parameters, so that
# a quantized model has the parameter count of its float original.
_QPARAM_INPUTS: dict[str, frozenset[int]] = {
    "QuantizeLinear": frozenset({1, 2}),
    "DequantizeLinear": frozenset({1, 2}),
    "QLinearConv": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearMatMul": frozenset({1, 2, 4, 5, 6, 7}),
    "ConvInteger": frozenset({2, 3}),
    "MatMulInteger": frozenset({2, 3}),
    "QGemm": frozenset({1, 2, 4, 5, 7, 8}),
    "QLinearAdd": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearMul": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearSigmoid": frozenset({1, 2, 3, 4}),
    "QLinearLeakyRelu": frozenset({1, 2, 3, 4}),
    "QLinearGlobalAveragePool": frozenset({1, 2, 3, 4}),
    "QLinearAveragePool": frozenset({1, 2, 3, 4}),
    "QLinearSoftmax": frozenset({1, 2, 3, 4}),
    "MatMulIntegerToFloat": frozenset({2, 3, 4, 5}),
    "DynamicQuantizeMatMul": frozenset({2, 3}),
}
_INT8_TYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4})
# Integer initializers that are weights: the int32 bias of a quantized Conv/Gemm (float bias in the original).
_INT_BIAS_INPUTS: dict[str, int] = {"QLinearConv": 8, "QGemm": 6}


@dataclass
class ModelStats:
    """What a model weighs and costs; ``macs`` is for ``batch_size`` samples with the shapes in ``input_shapes``."""

    size_bytes: int
    params: int
    num_nodes: int
    op_counts: dict[str, int] = field(default_factory=dict)
    macs: int = 0
    macs_by_op: dict[str, int] = field(default_factory=dict)
    #: Nodes that do multiply-accumulates but whose shapes could not be inferred (counted as 0).
    macs_unknown_nodes: list[str] = field(default_factory=list)
    #: The input shapes the MACs were counted with (None for a dim that stayed unknown).
    input_shapes: dict[str, list[int | None]] = field(default_factory=dict)
    batch_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_stats(
    model: ir.Model | onnx.ModelProto | str,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 1,
    serialized: bytes | None = None,
) -> ModelStats:
    """Size, parameters, op counts and MACs of ``model`` (which is not changed).

    ``input_shapes`` gives the full shape of inputs with dynamic dims other than the batch; a dynamic leading dim
    is always set to ``batch_size`` (so MACs are for that many samples), a static one is kept. ``serialized``:
    the model's ``modelio.serialized_in_memory``, when the caller has it (its length is the file's size).
    """
    model = as_ir_model(model)
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    op_counts = Counter(node.op_type for node in nodes)
    fixed = _fixed_input_dims(model, dict(input_shapes or {}), batch_size)
    shapes = _infer_shapes(model, fixed)
    macs_by_op: Counter[str] = Counter()
    unknown: list[str] = []
    for index, node in enumerate(nodes):
        if node.op_type not in _MAC_COUNTERS:
            continue
        count = _MAC_COUNTERS[node.op_type](node, shapes)
        if count is None:
            unknown.append(node.name or f"{node.op_type}#{index}")
            continue
        macs_by_op[node.op_type] += count
    return ModelStats(
        size_bytes=serialized_size(model, serialized),
        params=count_params(model),
        num_nodes=len(nodes),
        op_counts=dict(sorted(op_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        macs=sum(macs_by_op.values()),
        macs_by_op=dict(sorted(macs_by_op.items(), key=lambda kv: (-kv[1], kv[0]))),
        macs_unknown_nodes=unknown,
        input_shapes={name: list(dims) for name, dims in fixed.items()},
        batch_size=batch_size,
    )


# ------------------------------------------------------------------------------------------------------- parameters
def count_params(model: ir.Model) -> int:
    """Elements of weight tensors: float initializers, int8/uint8/int4 weights, int32 biases of quantized ops.

    Each initializer is counted once however many nodes share it; weights stored in Constant nodes (PaddlePaddle
    exports) count too. Scales and zero points of quantization ops are not parameters, nor are shape tensors.
    """
    total = 0
    for graph in _all_graphs(model.graph):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None and _is_weight(tensor.dtype, value):
                total += _numel(tensor.shape)
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attributes:
                tensor = node.attributes["value"].value
                if tensor is not None and _is_weight(tensor.dtype, node.outputs[0]):
                    total += _numel(tensor.shape)
    return total


def _is_weight(dtype: ir.DataType, value: ir.Value) -> bool:
    uses = list(value.uses())
    if uses and all(index in _QPARAM_INPUTS.get(user.op_type, ()) for user, index in uses):
        return False
    if dtype.is_floating_point() or dtype in _INT8_TYPES:
        return True
    return any(_INT_BIAS_INPUTS.get(user.op_type) == index or (user.op_type == "DequantizeLinear" and index == 0)
               for user, index in uses)


def _all_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _all_graphs(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    yield from _all_graphs(sub)


def _numel(shape: Any) -> int:
    return math.prod(int(d) for d in shape)


# ----------------------------------------------------------------------------------------------------------- shapes
Shape = tuple[int | None, ...]


def _fixed_input_dims(model: ir.Model, input_shapes: dict[str, Sequence[int]], batch_size: int
                      ) -> dict[str, list[int | None]]:
    """Input dims to infer with: static dims kept, dynamic leading dim = batch, other dynamic dims from hints."""
    fixed: dict[str, list[int | None]] = {}
    for spec in input_specs(model):
        hint = input_shapes.get(spec.name)
        if not spec.shape:  # unknown rank (or a scalar): the hint, if any, is all there is
            fixed[spec.name] = [int(d) for d in hint] if hint else []
            continue
        dims: list[int | None] = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif axis == 0:
                dims.append(batch_size)
            elif hint is not None and len(hint) == len(spec.shape):
                dims.append(int(hint[axis]))
            else:
                dims.append(None)
        fixed[spec.name] = dims
    return fixed


def _infer_shapes(model: ir.Model, fixed: dict[str, list[int | None]]) -> dict[str, Shape]:
    """name -> inferred shape (None for unknown dims) for every value ONNX shape inference could type.

    Exporters compute Reshape targets at run time (Shape -> Gather -> Div -> Concat); ONNX's data propagation
    stops at ops such as Div or Cast to int32. Where that leaves a MAC-counting node untyped, the small shape
    computations are evaluated with numpy (onnx.reference) and inference is run again.
    """
    proto = _shape_proto(model, fixed)
    weights = {name: tuple(int(d) for d in value.const_value.shape)
               for name, value in model.graph.initializers.items() if value.const_value is not None}
    shapes = {**_run_inference(proto), **weights}
    for _ in range(_MAX_FOLD_ROUNDS):
        if not _mac_shapes_missing(proto.graph, shapes) or not _fold_shape_computations(proto, shapes):
            break
        shapes = {**_run_inference(proto), **weights}
    # Shapes the model already carries are safe to use where inference gave up (custom-domain ops), as long as no
    # input dim was changed here.
    declared = {spec.name: list(spec.shape) for spec in input_specs(model)}
    if all(declared[name] == dims for name, dims in fixed.items()):
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            for value in [*node.inputs, *node.outputs]:
                if value is not None and value.name and value.name not in shapes and value.shape is not None:
                    dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape)
                    if all(d is not None for d in dims):
                        shapes[value.name] = dims
    return shapes


def _run_inference(proto: onnx.ModelProto) -> dict[str, Shape]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - a model inference rejects still gets its size and op counts
        inferred = proto
    shapes: dict[str, Shape] = {}
    _collect_shapes(inferred.graph, shapes)
    return shapes


def _mac_shapes_missing(graph: onnx.GraphProto, shapes: Mapping[str, Shape]) -> bool:
    for node in graph.node:
        if node.op_type in _MAC_COUNTERS:
            shape = shapes.get(node.output[0])
            if shape is None or any(d is None for d in shape):
                return True
    return False


_MAX_FOLD_ROUNDS = 6
# Ops that are never folded: random, control flow, and ops whose output can be far larger than their inputs when
# inference does not say how large it is.
_NO_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                      "Bernoulli", "If", "Loop", "Scan", "SequenceConstruct", "SequenceAt", "SplitToSequence"})
_MAY_GROW = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Pad", "Resize", "Upsample", "OneHot",
                       "Constant"})


def _fold_shape_computations(proto: onnx.ModelProto, shapes: Mapping[str, Shape]) -> bool:
    """Replace small computable values (shape arithmetic) by initializers in ``proto``; True if any was folded."""
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    opsets = {entry.domain: entry.version for entry in proto.opset_import}
    known = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD or not node.output:
            continue
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            continue
        if not _small_or_bounded(node, shapes):
            continue
        if node.op_type in ("Shape", "Size"):
            outputs = _shape_node_value(node, shapes)
        elif node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            outputs = [onnx.numpy_helper.to_array(node.attribute[0].t)]
        elif all(not name or name in known for name in node.input):
            try:
                evaluator = ReferenceEvaluator(node, opsets={"": opsets.get("", opsets.get("ai.onnx", 13))})
                outputs = evaluator.run(None, {name: known[name] for name in node.input if name})
            except Exception:  # noqa: BLE001 - an op the reference cannot run here stays unfolded
                outputs = None
        else:
            outputs = None
        if outputs is None or len(outputs) != len(node.output):
            continue
        arrays = [np.asarray(value) for value in outputs]
        if any(array.size > _SMALL_TENSOR or array.dtype == object for array in arrays):
            continue
        for name, array in zip(node.output, arrays):
            if name:
                known[name] = array
        folded.append(node)
    if not folded:
        return False
    for node in folded:
        graph.node.remove(node)
        for name, array in zip(node.output, (known.get(n) for n in node.output)):
            if name and array is not None:
                graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return True


def _small_or_bounded(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> bool:
    for name in node.output:
        shape = shapes.get(name)
        if shape is not None and all(d is not None for d in shape):
            if math.prod(shape) > _SMALL_TENSOR:  # type: ignore[arg-type]
                return False
        elif node.op_type in _MAY_GROW:
            return False
    return True


def _shape_node_value(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> list[np.ndarray] | None:
    shape = shapes.get(node.input[0])
    if shape is None or any(d is None for d in shape):
        return None
    if node.op_type == "Size":
        return [np.array(math.prod(shape), dtype=np.int64)]  # type: ignore[arg-type]
    attrs = {attr.name: attr.i for attr in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return [np.array(shape[start:end] if "end" in attrs else shape[start:], dtype=np.int64)]


def _shape_proto(model: ir.Model, fixed: dict[str, list[int | None]]) -> onnx.ModelProto:
    """A copy of the graph for shape inference: fixed inputs, big weights as typed inputs, no stale value_info."""
    graph = onnx.GraphProto(name=model.graph.name or "graph")
    initializers = model.graph.initializers
    for value in model.graph.inputs:
        if value.name in initializers:
            continue
        dtype = value.dtype.value if value.dtype is not None else onnx.TensorProto.FLOAT
        dims = fixed.get(value.name or "")
        shape = None if (value.shape is None and not dims) else [d if d is not None else "?" for d in dims or []]
        graph.input.append(onnx.helper.make_tensor_value_info(value.name, dtype, shape))
    for name, value in initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        if _numel(tensor.shape) <= _SMALL_TENSOR and not isinstance(tensor, ir.ExternalTensor):
            proto_tensor = ir.serde.serialize_tensor(tensor)
            proto_tensor.name = name
            graph.initializer.append(proto_tensor)
        else:
            dims: list[int | str] = list(tensor.shape)
            if len(dims) == 1:  # hidden from ONNX's data propagation (passes/shapes.py); the real shape is put back
                dims = [f"{LONG_VECTOR_PREFIX}{name}"]
            graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.dtype.value, dims))
    for node in model.graph:
        graph.node.append(ir.serde.serialize_node(node))
    for value in model.graph.outputs:
        dtype = value.dtype.value if value.dtype is not None else onnx.TensorProto.UNDEFINED
        graph.output.append(onnx.helper.make_tensor_value_info(value.name, dtype, None))
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(domain, version)
                              for domain, version in model.opset_imports.items()])
    proto.ir_version = max(model.ir_version or 0, 4)
    for function in model.functions.values():
        proto.functions.append(ir.serde.serialize_function(function))
    return proto


def _collect_shapes(graph: onnx.GraphProto, shapes: dict[str, Shape]) -> None:
    for info in [*graph.input, *graph.output, *graph.value_info]:
        tensor_type = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                      for d in tensor_type.shape.dim)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _collect_shapes(attr.g, shapes)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _collect_shapes(sub, shapes)


# ------------------------------------------------------------------------------------------------------------- MACs
def _shape_of(value: ir.Value | None, shapes: Mapping[str, Shape]) -> Shape | None:
    """The static shape of ``value``, looking through DequantizeLinear/Identity/Cast to a QDQ weight's shape."""
    seen = 0
    while value is not None and seen < 4:
        shape = shapes.get(value.name or "")
        if shape is not None and all(d is not None for d in shape):
            return shape
        producer = value.producer()
        if producer is None or producer.op_type not in ("DequantizeLinear", "QuantizeLinear", "Identity", "Cast"):
            return None
        value = producer.inputs[0] if producer.inputs else None
        seen += 1
    return None


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _conv_macs(w: int):  # noqa: ANN202 - returns a counter
    def count(node: ir.Node, shapes: Mapping[str, Shape]) -> int | None:
        """Every output element costs one weight slice: (C_in / group) x kernel MACs = prod(W.shape[1:])."""
        out = _shape_of(node.outputs[0], shapes)
        weight = _shape_of(_input(node, w), shapes)
        if out is None or weight is None or len(weight) < 2:
            return None
        return _numel(out) * _numel(weight[1:])

    return count


def _conv_transpose_macs(node: ir.Node, shapes: Mapping[str, Shape]) -> int | None:
    """Every input element is scattered through (C_out / group) x kernel weights: numel(X) x prod(W.shape[1:])."""
    x = _shape_of(_input(node, 0), shapes)
    weight = _shape_of(_input(node, 1), shapes)
    if x is None or weight is None or len(weight) < 2:
        return None
    return _numel(x) * _numel(weight[1:])


def _matmul_macs(a: int, b: int):  # noqa: ANN202 - returns a counter
    def count(node: ir.Node, shapes: Mapping[str, Shape]) -> int | None:
        """numpy matmul semantics: each output element is a dot product of length K."""
        out = _shape_of(node.outputs[0], shapes)
        a_shape, b_shape = _shape_of(_input(node, a), shapes), _shape_of(_input(node, b), shapes)
        if node.attributes.get_int("transA", 0) and a_shape is not None and len(a_shape) >= 2:  # FusedMatMul
            a_shape = (*a_shape[:-2], a_shape[-1], a_shape[-2])
        k = _reduction_length(a_shape, b_shape)
        if out is None or k is None:
            return None
        return _numel(out) * k

    return count


def _reduction_length(a: Shape | None, b: Shape | None) -> int | None:
    if a:
        return a[-1]
    if b:
        return b[0] if len(b) == 1 else b[-2]
    return None


def _gemm_macs(a: int, b: int):  # noqa: ANN202 - returns a counter
    def count(node: ir.Node, shapes: Mapping[str, Shape]) -> int | None:
        """Y[M, N] = A'[M, K] B'[K, N]: M*N*K, with transA/transB deciding where K sits."""
        out = _shape_of(node.outputs[0], shapes)
        a_shape = _shape_of(_input(node, a), shapes)
        b_shape = _shape_of(_input(node, b), shapes)
        trans_a, trans_b = node.attributes.get_int("transA", 0), node.attributes.get_int("transB", 0)
        a_dims = None if a_shape is None or len(a_shape) != 2 else (a_shape[::-1] if trans_a else a_shape)  # [M, K]
        b_dims = None if b_shape is None or len(b_shape) != 2 else (b_shape[::-1] if trans_b else b_shape)  # [K, N]
        k = a_dims[1] if a_dims is not None else (b_dims[0] if b_dims is not None else None)
        if out is None and a_dims is not None and b_dims is not None:  # a contrib op left Y untyped
            out = (a_dims[0], b_dims[1])
        if out is None or k is None:
            return None
        return _numel(out) * k

    return count


# op_type -> counter(node, shapes) returning MACs, or None when shapes are unknown.
_MAC_COUNTERS = {
    "Conv": _conv_macs(1),
    "FusedConv": _conv_macs(1),
    "NhwcFusedConv": _conv_macs(1),
    "ConvInteger": _conv_macs(1),
    "QLinearConv": _conv_macs(3),
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs(0, 1),
    "FusedGemm": _gemm_macs(0, 1),
    "QGemm": _gemm_macs(0, 3),
    "MatMul": _matmul_macs(0, 1),
    "FusedMatMul": _matmul_macs(0, 1),
    "MatMulInteger": _matmul_macs(0, 1),
    "MatMulIntegerToFloat": _matmul_macs(0, 1),
    "DynamicQuantizeMatMul": _matmul_macs(0, 1),
    "QLinearMatMul": _matmul_macs(0, 3),
}


def format_count(value: float) -> str:
    """1234567 -> '1.23M' (for tables of params and MACs)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:g}"


__all__ = ["ModelStats", "count_params", "format_count", "model_stats"]
