"""Hard-swish / hard-sigmoid chains fused into single ops: same outputs, fewer nodes, nothing fused wrongly."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.modelio import to_proto
from onnxopt.passes import NormalizePass
from onnxopt.passes.act_fusion import fuse_activations
from onnxopt.runtime import make_session


def _const(name: str, value: float, shape: tuple[int, ...] = ()) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full(shape, value, np.float32), name)


def _model(nodes: list[onnx.NodeProto], outputs: tuple[str, ...] = ("y",), opset: int = 13,
           consts: tuple[onnx.TensorProto, ...] = (), rank: int = 4) -> onnx.ModelProto:
    shape = [2, 3, 5, 5][:rank]
    inits = [_const("three", 3.0), _const("zero", 0.0), _const("six", 6.0), _const("sixth", 1.0 / 6.0), *consts]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _hard_swish_chain(div: bool = True, swap: bool = False) -> list[onnx.NodeProto]:
    add_inputs = ["three", "x"] if swap else ["x", "three"]
    mul_inputs = ["c", "x"] if swap else ["x", "c"]
    last = helper.make_node("Div", ["m", "six"], ["y"]) if div else helper.make_node("Mul", ["sixth", "m"], ["y"])
    return [helper.make_node("Add", add_inputs, ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
            helper.make_node("Mul", mul_inputs, ["m"]), last]


def _fused(model: onnx.ModelProto, opset: int = 13) -> tuple[onnx.ModelProto, Counter[str]]:
    ir_model = ir.serde.deserialize_model(model)
    counts = fuse_activations(ir_model.graph, opset)
    return to_proto(ir_model), counts


def _assert_same(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    x = np.linspace(-8, 8, 150, dtype=np.float32).reshape(2, 3, 5, 5)
    ya = make_session(a, threads=1).run(None, {"x": x})
    yb = make_session(b, threads=1).run(None, {"x": x})
    for u, v in zip(ya, yb):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("div", [True, False])
@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("opset", [13, 14])
def test_hard_swish_chain_becomes_one_op_with_the_same_outputs(div, swap, opset):
    model = _model(_hard_swish_chain(div, swap), opset=opset)
    fused, counts = _fused(model, opset)
    onnx.checker.check_model(fused)
    assert counts == Counter({"HardSwish": 1})
    ops = [n.op_type for n in fused.graph.node]
    assert ops == (["HardSwish"] if opset >= 14 else ["HardSigmoid", "Mul"])
    assert [o.name for o in fused.graph.output] == ["y"]
    _assert_same(model, fused)


def test_hard_sigmoid_chain_and_torchs_hard_swish_export():
    hsig = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
            helper.make_node("Div", ["c", "six"], ["y"])]
    model = _model(hsig)
    fused, counts = _fused(model)
    assert counts == Counter({"HardSigmoid": 1}) and [n.op_type for n in fused.graph.node] == ["HardSigmoid"]
    _assert_same(model, fused)

    torch_style = [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=1.0 / 6.0, beta=0.5),
                   helper.make_node("Mul", ["x", "h"], ["y"])]
    model = _model(torch_style, opset=14)
    fused, counts = _fused(model, 14)
    assert counts == Counter({"HardSwish": 1}) and [n.op_type for n in fused.graph.node] == ["HardSwish"]
    _assert_same(model, fused)
    _, counts = _fused(_model(torch_style, opset=13), 13)
    assert not counts  # below opset 14 that form is already the fused one


def test_chains_whose_parts_are_read_elsewhere_are_left_whole():
    shared = _model(_hard_swish_chain(), outputs=("y", "c"))  # the Clip output is also a graph output
    fused, counts = _fused(shared)
    assert not counts and len(fused.graph.node) == 4
    extra = _model([*_hard_swish_chain(), helper.make_node("Relu", ["a"], ["r"])], outputs=("y", "r"))
    _, counts = _fused(extra)
    assert not counts
    wrong = _model([*_hard_swish_chain()[:3], helper.make_node("Div", ["m", "three"], ["y"])])
    _, counts = _fused(wrong)
    assert not counts
    # A [1, 1, 1] constant 3 broadcasts a 2-D x to 3-D: fusing would change the output shape.
    nodes = _hard_swish_chain()
    nodes[0] = helper.make_node("Add", ["x", "three3"], ["a"])
    broad = _model(nodes, consts=(_const("three3", 3.0, (1, 1, 1)),), rank=2)  # its declared output is 2-D
    _, counts = _fused(broad)
    assert not counts


def test_normalize_fuses_and_reports_it():
    model = _model(_hard_swish_chain(), opset=13)
    out = NormalizePass().apply(model)
    proto = out if isinstance(out, onnx.ModelProto) else to_proto(out)
    assert Counter(n.op_type for n in proto.graph.node) == Counter({"HardSigmoid": 1, "Mul": 1})
    _assert_same(model, proto)
    off = NormalizePass(fuse_activations=False).apply(model)
    off = off if isinstance(off, onnx.ModelProto) else to_proto(off)
    assert len(off.graph.node) == 4
