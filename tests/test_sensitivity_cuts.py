"""The sensitivity table's probes run from the last cut before their layer: where the cuts are, and that the table
is the one the whole graph gives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import examples
from onnxopt.calib_data import open_data
from onnxopt.modelio import input_specs, load_model
from onnxopt.passes import NormalizePass
from onnxopt.passes.quantize import sensitivity
from onnxopt.passes.quantize.collect import collect_statistics, tensors_to_calibrate
from onnxopt.passes.quantize.pass_ import _with_inferred_shapes
from onnxopt.passes.quantize.placement import HEAVY_OPS
from onnxopt.passes.quantize.sensitivity import cut_points, layer_sensitivity
from onnxopt.passes.quantize.weights_prep import weight_quantizer
from onnxopt.pipeline.context import PassContext


def _graph(nodes, inputs=("x",), inits=()) -> onnx.GraphProto:
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, [1, 4]) for i in inputs],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], list(inits))


def test_cuts_of_a_chain_and_around_a_residual_block():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="n0"),
             helper.make_node("Sigmoid", ["a"], ["b"], name="n1"),  # a is read again by the Add: no cut before n2
             helper.make_node("Tanh", ["b"], ["c"], name="n2"),
             helper.make_node("Add", ["a", "c"], ["d"], name="n3"),
             helper.make_node("Relu", ["d"], ["y"], name="n4")]
    assert cut_points(_graph(nodes)) == [(1, ("a",)), (4, ("d",))]


def test_cuts_of_several_activations_where_a_skip_connection_is_pending():
    """A U-Net-like graph: a is saved for the Add at the end, so past n1 the only one-activation cut is gone, but
    the tail from n2 can be fed (a, b) and the tail from n3 (a, c)."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="n0"),
             helper.make_node("Sigmoid", ["a"], ["b"], name="n1"),
             helper.make_node("Tanh", ["b"], ["c"], name="n2"),
             helper.make_node("Relu", ["c"], ["d"], name="n3"),
             helper.make_node("Add", ["a", "d"], ["y"], name="n4")]
    assert cut_points(_graph(nodes)) == [(1, ("a",))]
    assert cut_points(_graph(nodes), max_tensors=2) == [(1, ("a",)), (2, ("a", "b")), (3, ("a", "c")),
                                                       (4, ("a", "d"))]


def test_no_cut_while_a_second_input_or_an_early_output_is_pending():
    two_inputs = [helper.make_node("Relu", ["x"], ["a"], name="n0"),
                  helper.make_node("Relu", ["a"], ["b"], name="n1"),
                  helper.make_node("Add", ["b", "z"], ["y"], name="n2")]
    assert cut_points(_graph(two_inputs, inputs=("x", "z"))) == []
    graph = _graph([helper.make_node("Relu", ["x"], ["a"], name="n0"),
                    helper.make_node("Relu", ["a"], ["y"], name="n1")])
    graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4]))  # a stays live to the end
    assert cut_points(graph) == []


def test_no_cut_in_a_graph_with_subgraphs():
    branch = helper.make_graph([helper.make_node("Relu", ["a"], ["r"])], "branch", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="n0"),
             helper.make_node("If", ["cond"], ["y"], name="n1", then_branch=branch, else_branch=branch)]
    assert cut_points(_graph(nodes, inits=[cond])) == []


@pytest.fixture(scope="module")
def prepared():
    """The example net as the quantize pass hands it to the table: normalized, shapes inferred, min/max ranges."""
    model = load_model(examples.default_model_path())
    NormalizePass().bind(PassContext()).apply(model)
    proto = _with_inferred_shapes(model)
    specs = input_specs(model)
    data = open_data(str(examples.default_calib_path()))
    calibrator, _ = collect_statistics(proto, tensors_to_calibrate(proto, sorted(HEAVY_OPS)), data, specs,
                                       samples=8, histograms=False)
    feeds = [batch.inputs for batch in data.iter_batches(specs, batch_size=1)][:8]
    layers = [n for n in proto.graph.node if n.op_type in HEAVY_OPS and n.name and len(n.input) > 1]
    return proto, layers, calibrator.compute("minmax", symmetric=False), feeds


def _table(prepared, cuts: bool) -> dict[str, sensitivity.LayerSensitivity]:
    proto, layers, ranges, feeds = prepared
    rows = layer_sensitivity(proto, layers, ranges, weight_quantizer(True, False, "minmax"), feeds, None, False,
                             False, cuts=cuts)
    return {row.node: row for row in rows}


def test_probes_from_cuts_give_the_whole_graph_table(prepared):
    """On the example (residual blocks: 28 of its 29 layers start at a cut), every figure within float rounding
    (ORT fuses differently at a cut) and the same order."""
    proto, layers, _, feeds = prepared
    starts = sensitivity._probe_starts(proto, layers, len(feeds), 1)
    assert len(starts) >= len(layers) - 2
    assert any(len(tensors) > 1 for _, tensors in starts.values())  # inside a residual block: block input + branch
    whole, cut = _table(prepared, cuts=False), _table(prepared, cuts=True)
    assert list(whole) == list(cut)
    for name, row in whole.items():
        assert abs(row.output_sqnr_db - cut[name].output_sqnr_db) < 0.1
        assert abs(row.layer_sqnr_db - cut[name].layer_sqnr_db) < 0.1


def test_cut_values_over_the_memory_bound_fall_back_to_the_whole_graph(prepared, monkeypatch):
    proto, layers, _, feeds = prepared
    monkeypatch.setattr(sensitivity, "CUT_VALUES_BYTES", 0)
    assert sensitivity._probe_starts(proto, layers, len(feeds), 1) == {}
    one_cut = min(v for v in (sensitivity._tensor_bytes(i, 1) for i in proto.graph.value_info) if v)
    monkeypatch.setattr(sensitivity, "CUT_VALUES_BYTES", one_cut * len(feeds))
    kept = {start for start in sensitivity._probe_starts(proto, layers, len(feeds), 1).values()}
    assert len(kept) <= 1  # only what fits: the latest cuts first


def test_a_tail_that_cannot_run_falls_back_to_the_whole_graph(prepared, monkeypatch):
    """A cut whose recorded shape is wrong (a stale value_info): ORT refuses the tail's feed, and the layer is probed
    over the whole graph instead, with the same figures."""
    real = sensitivity._tail

    def stale(model, index, tensors):
        tail = real(model, index, tensors)
        dims = tail.graph.input[0].type.tensor_type.shape.dim
        dims[len(dims) - 1].dim_value = dims[len(dims) - 1].dim_value + 1
        return tail

    whole = _table(prepared, cuts=False)
    monkeypatch.setattr(sensitivity, "_tail", stale)
    cut = _table(prepared, cuts=True)
    assert list(whole) == list(cut)
    assert all(abs(row.output_sqnr_db - cut[name].output_sqnr_db) < 1e-6 for name, row in whole.items())
