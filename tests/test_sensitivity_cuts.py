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


def test_the_table_sums_per_sample_what_the_joined_outputs_give(prepared):
    """Each row's SQNR, summed one sample at a time, is the SQNR of the probe's outputs joined over the samples
    (what the table computed before), for the graph output and the layer's own output; labels give accuracy."""
    proto, layers, ranges, feeds = prepared
    quantize_weight = weight_quantizer(True, False, "minmax")
    output = proto.graph.output[0].name
    labels = np.arange(len(feeds)) % 10
    rows = {row.node: row for row in layer_sensitivity(proto, layers, ranges, quantize_weight, feeds, labels, False,
                                                       False, cuts=False)}
    inits = {init.name: init for init in proto.graph.initializer}
    reference = sensitivity._run_parts(proto, feeds, [output, *(n.output[0] for n in layers)], None)  # as the table
    for node in layers[::7]:
        probe = sensitivity._simulate(proto, node, inits, ranges, quantize_weight, False)
        names = [output, node.output[0]]
        probed = sensitivity._run_parts(probe, feeds, names, None)
        joined = {name: (np.concatenate(reference[name]), np.concatenate(probed[name])) for name in names}
        assert rows[node.name].output_sqnr_db == pytest.approx(sensitivity.sqnr_db(*joined[output]), abs=1e-4)
        assert rows[node.name].layer_sqnr_db == pytest.approx(sensitivity.sqnr_db(*joined[node.output[0]]), abs=1e-4)
        accuracy = float(np.mean(joined[output][1].reshape(len(feeds), -1).argmax(1) == labels))
        assert rows[node.name].accuracy == pytest.approx(accuracy)


def test_sqnr_sums_float32_in_float64_and_reads_non_finite_outputs_as_the_worst():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 3, 50, 50)).astype(np.float32)
    noisy = ref + np.float32(0.01) * rng.standard_normal(ref.shape).astype(np.float32)
    exact = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref.astype(np.float64) - noisy) ** 2))
    assert sensitivity.sqnr_db(ref, noisy) == pytest.approx(exact, abs=1e-6)
    assert sensitivity.sqnr_db(ref, ref.copy()) == float("inf")
    for bad in (np.nan, np.inf, -np.inf):
        broken = noisy.copy()
        broken[0, 0, 0, 0] = bad
        assert sensitivity.sqnr_db(ref, broken) == float("-inf")
    huge = np.full(8, 1e20, np.float32)  # squares beyond float32's range: summed again in float64, not "non-finite"
    assert sensitivity.sqnr_db(huge, huge * np.float32(0.5)) == pytest.approx(10 * np.log10(4.0))
    ints = np.arange(1, 9, dtype=np.int64)
    assert sensitivity.sqnr_db(ints, ints + 1) == pytest.approx(10 * np.log10(np.sum(ints ** 2.0) / 8))
