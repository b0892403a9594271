"""Hard-swish and hard-sigmoid written out as elementwise chains, fused into ONNX's own activation ops.

Exporters that predate (or avoid) the ``HardSwish`` op spell it ``x * Clip(x + 3, 0, 6) / 6``: four kernels, each
reading and writing a whole feature map. PaddlePaddle's MobileNetV3 exports (the OCR cls model has 18 of them) and
Keras models through tf2onnx do this. ONNX Runtime has no transformer that fuses the chain, so on small CNNs it is a
large share of the run time: in reports/foundation.md the normalized Paddle cls model runs 1.82x faster than the
export, almost all of it from this fusion (PP-OCRv4 det/rec: 1.09x). The chain is replaced by

- ``HardSwish(x)`` (opset >= 14), or ``Mul(x, HardSigmoid(x, alpha=1/6, beta=0.5))`` below opset 14 (two kernels);
- ``HardSigmoid(x, alpha=1/6, beta=0.5)`` for ``Clip(x + 3, 0, 6) / 6`` alone;
- ``HardSwish(x)`` for ``x * HardSigmoid(x, alpha=1/6, beta=0.5)`` (torch's export below opset 14) at opset >= 14.

Division by 6 may be written as a multiplication by 1/6, and Add and Mul may take their operands in either order.
A chain is fused only when its intermediate tensors feed nothing else and are not graph outputs; the last tensor
keeps its name, so graph outputs and downstream references are unchanged. The result equals the chain up to float
rounding of ``(x + 3) / 6`` versus ``x / 6 + 0.5``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from onnxopt.irutil import constant_array

_DEFAULT_DOMAINS = ("", "ai.onnx")
_SIXTH = 1.0 / 6.0


def fuse_activations(graph: ir.Graph, opset: int) -> Counter[str]:
    """Fuse every hard-swish / hard-sigmoid chain of ``graph`` (main graph only); counts by the op written."""
    fused: Counter[str] = Counter()
    for node in list(graph):
        if node.graph is not graph or node.op_type != "Clip" or node.domain not in _DEFAULT_DOMAINS:
            continue  # already removed by an earlier fusion, or not a candidate
        kind = _fuse_clip_chain(graph, node, opset)
        if kind:
            fused[kind] += 1
    if opset >= 14:
        for node in list(graph):
            if node.graph is graph and node.op_type == "Mul" and node.domain in _DEFAULT_DOMAINS:
                fused["HardSwish"] += _fuse_mul_hard_sigmoid(graph, node)
    return fused


def _fuse_clip_chain(graph: ir.Graph, clip: ir.Node, opset: int) -> str | None:
    """``Clip(x + 3, 0, 6)`` and what follows it; the op written, or None when the chain does not match."""
    if len(clip.inputs) != 3 or _scalar(clip.inputs[1]) != 0.0 or _scalar(clip.inputs[2]) != 6.0:
        return None
    add = _sole_producer(clip.inputs[0])
    if add is None or add.op_type != "Add":
        return None
    x = _other_operand(add, lambda v: _scalar(v) == 3.0)
    clipped = _sole_use(clip.outputs[0])
    if x is None or clipped is None or not _keeps_rank(add, x):
        return None
    chain = [add, clip, clipped]
    if _is_div_by_six(clipped):  # hard-sigmoid, maybe times x
        times_x = _sole_use(clipped.outputs[0])
        gated = times_x is not None and times_x.op_type == "Mul"
        if gated and _other_operand(times_x, lambda v: v is clipped.outputs[0]) is x:
            _replace(graph, [*chain, times_x], _hard_swish(x, opset))
            return "HardSwish"
        _replace(graph, chain, [_hard_sigmoid(x)])
        return "HardSigmoid"
    if clipped.op_type == "Mul" and _other_operand(clipped, lambda v: v is clip.outputs[0]) is x:
        scaled = _sole_use(clipped.outputs[0])
        if scaled is not None and _is_div_by_six(scaled):
            _replace(graph, [*chain, scaled], _hard_swish(x, opset))
            return "HardSwish"
    return None


def _fuse_mul_hard_sigmoid(graph: ir.Graph, mul: ir.Node) -> int:
    """``x * HardSigmoid(x, 1/6, 0.5)`` -> ``HardSwish(x)``; 1 when fused."""
    for index in (0, 1):
        gate = _sole_producer(mul.inputs[index])
        x = mul.inputs[1 - index]
        if (gate is not None and gate.op_type == "HardSigmoid" and gate.inputs[0] is x
                and np.isclose(gate.attributes.get_float("alpha", 0.2), _SIXTH)
                and np.isclose(gate.attributes.get_float("beta", 0.5), 0.5)):
            _replace(graph, [gate, mul], _hard_swish(x, 14))
            return 1
    return 0


def _hard_sigmoid(x: ir.Value) -> ir.Node:
    return ir.node("HardSigmoid", [x], attributes={"alpha": _SIXTH, "beta": 0.5})


def _hard_swish(x: ir.Value, opset: int) -> list[ir.Node]:
    if opset >= 14:
        return [ir.node("HardSwish", [x])]
    gate = _hard_sigmoid(x)
    return [gate, ir.node("Mul", [x, gate.outputs[0]])]


def _replace(graph: ir.Graph, chain: list[ir.Node], nodes: list[ir.Node]) -> None:
    """Put ``nodes`` where ``chain`` was; the last new output takes over the chain's output and its name."""
    old, new = chain[-1].outputs[0], nodes[-1].outputs[0]
    base = chain[-1].name or chain[-1].op_type
    for k, node in enumerate(nodes):
        node.name = f"{base}_{node.op_type.lower()}" if k == len(nodes) - 1 else f"{base}_{node.op_type.lower()}_{k}"
        for output in node.outputs:
            output.type = old.type
            output.shape = old.shape
    graph.insert_before(chain[-1], nodes)
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(chain, safe=True)
    new.name = name
    for k, node in enumerate(nodes[:-1]):
        node.outputs[0].name = f"{name}_{node.op_type.lower()}_{k}"


def _keeps_rank(add: ir.Node, x: ir.Value) -> bool:
    """The constant ``3`` does not broadcast ``x`` to a higher rank (a [1, 1, 1] constant would, on a 2-D ``x``)."""
    const = next(v for v in add.inputs if v is not x)
    assert const is not None and const.const_value is not None
    rank = len(const.const_value.shape)
    return rank <= 1 or (x.shape is not None and len(x.shape) >= rank)


def _is_div_by_six(node: ir.Node) -> bool:
    if node.op_type == "Div" and len(node.inputs) == 2:
        return _scalar(node.inputs[1]) == 6.0
    if node.op_type == "Mul" and len(node.inputs) == 2:
        return _other_operand(node, lambda v: _close(_scalar(v), _SIXTH)) is not None
    return False


def _other_operand(node: ir.Node, matches) -> ir.Value | None:  # noqa: ANN001 - a predicate on ir.Value
    """The operand of a binary commutative ``node`` whose partner satisfies ``matches``."""
    if len(node.inputs) != 2 or node.domain not in _DEFAULT_DOMAINS:
        return None
    a, b = node.inputs
    if b is not None and matches(b):
        return a
    if a is not None and matches(a):
        return b
    return None


def _sole_producer(value: ir.Value | None) -> ir.Node | None:
    """The node making ``value`` when ``value`` feeds exactly one node and is no graph output."""
    if value is None or value.is_graph_output() or len(value.uses()) != 1:
        return None
    producer = value.producer()
    return producer if producer is not None and producer.domain in _DEFAULT_DOMAINS else None


def _sole_use(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value`` when nothing else does (graph outputs included)."""
    if value.is_graph_output() or len(value.uses()) != 1:
        return None
    node = value.uses()[0][0]
    return node if node.domain in _DEFAULT_DOMAINS else None


def _scalar(value: ir.Value | None) -> float | None:
    """A one-element float constant's value (an initializer the caller cannot override), else None."""
    array = constant_array(value)
    if array is None or array.size != 1 or array.dtype.kind != "f":
        return None
    return float(array.reshape(()))


def _close(value: float | None, target: float) -> bool:
    return value is not None and bool(np.isclose(value, target, rtol=1e-6, atol=0.0))


__all__ = ["fuse_activations"]
