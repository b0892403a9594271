"""The normalize pass on real exports (Caffe2-era light models, PaddlePaddle, torch) and hand-built graphs.

Every normalized model must pass the ONNX checker, load in ONNX Runtime and compute what the input computed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from onnx_builders import GraphBuilder, compare_models, random_feeds, run

from onnxopt.calib_data.base import Batch, DataSource
from onnxopt.errors import BadInputError, DataError, PassFailedError, RecipeError
from onnxopt.modelio import load_model, to_proto
from onnxopt.passes import bn_fold
from onnxopt.passes.normalize import NormalizePass
from onnxopt.pipeline import registry
from onnxopt.pipeline.context import PassContext

TOLERANCE = 1e-4
LIGHT_MODELS = [
    "light_bvlc_alexnet",
    "light_densenet121",
    "light_inception_v1",
    "light_inception_v2",
    "light_resnet50",
    "light_shufflenet",
    "light_squeezenet",
    "light_vgg19",
    "light_zfnet512",
]
LIGHT_WITH_BATCHNORM = {"light_densenet121", "light_inception_v2", "light_resnet50", "light_shufflenet"}
# Their ConstantOfShape-generated weights are 250-575 MB once onnxsim folds them, and its check then runs the 224x224
# model twice (5-17 s each on 2 cores); simplification is covered by the six other light models.
LIGHT_FAT = {"light_bvlc_alexnet", "light_vgg19", "light_zfnet512"}
TORCH_BATCHNORMS = {"mobilenetv2": 14, "resnet": 9, "shufflenetv2": 15, "transformer": 0}
PADDLE_SHAPE = (1, 3, 48, 192)


def normalize(model, *, input_shapes=None, calib=None, **params) -> tuple[onnx.ModelProto, NormalizePass]:
    """Normalize a path / proto with a fresh pass; returns the result and the pass (for notes and details)."""
    step = NormalizePass(**params)
    step.bind(PassContext(input_shapes=dict(input_shapes or {}), calib=calib))
    source = load_model(model) if not isinstance(model, onnx.ModelProto) else ir.serde.deserialize_model(model)
    return to_proto(step.apply(source)), step


def assert_valid(proto: onnx.ModelProto) -> None:
    """Checker-clean, every node named (uniquely), no weights posing as inputs."""
    onnx.checker.check_model(proto, full_check=True)
    names = [node.name for node in proto.graph.node]
    assert all(names) and len(set(names)) == len(names)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    assert not [value.name for value in proto.graph.input if value.name in initializers]


def op_count(proto: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for node in proto.graph.node if node.op_type == op_type)


def default_opset(proto: onnx.ModelProto) -> int:
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def input_dims(proto: onnx.ModelProto, index: int = 0) -> list[int | str]:
    dims = proto.graph.input[index].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


class ArrayData(DataSource):
    """In-memory calibration data, enough for the pass to read sample shapes."""

    description = "arrays"

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def num_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def has_labels(self) -> bool:
        return False

    def iter_batches(self, specs, batch_size: int = 1):
        for start in range(0, self.num_samples(), batch_size):
            yield Batch({name: array[start : start + batch_size] for name, array in self.arrays.items()})


# -- real exports ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_models(light_models, name):
    # Every weight of these models is 0.02, so every channel carries the same value and the outputs are uniform: the
    # numeric comparison here is a smoke test. Folding numerics are checked on the Paddle, torch and built models.
    path = next((p for p in light_models if p.stem == name), None)
    if path is None:
        pytest.skip(f"{name} is not shipped by this onnx version")
    original = onnx.load(str(path))
    result, step = normalize(path, simplify=name not in LIGHT_FAT)

    assert_valid(result)
    assert default_opset(result) == 13 and result.ir_version >= 7
    assert step.details["initializer_inputs_removed"] > 0
    assert compare_models(original, result, random_feeds(original, batch=1)) <= TOLERANCE
    if name in LIGHT_WITH_BATCHNORM and name not in LIGHT_FAT:
        assert step.details["folded_batchnorms"] > 0
        assert op_count(result, "BatchNormalization") < op_count(original, "BatchNormalization")
    if name not in LIGHT_FAT:
        assert step.details["simplified"]
        assert op_count(result, "ConstantOfShape") == 0  # generated weights became initializers


def test_paddle_classifier(paddle_cls_path):
    original = onnx.load(str(paddle_cls_path))
    assert op_count(original, "Constant") > 300  # the export keeps every weight in a Constant node
    result, step = normalize(paddle_cls_path, input_shapes={"x": PADDLE_SHAPE})

    assert_valid(result)
    assert op_count(result, "Constant") == 0
    assert default_opset(result) >= 13
    assert input_dims(result) == list(PADDLE_SHAPE)
    assert step.details["constants_lifted"] >= 308
    assert step.details["folded_batchnorms"] == op_count(original, "BatchNormalization") == 35
    assert op_count(result, "BatchNormalization") == 0
    conv_weights = {node.input[1] for node in result.graph.node if node.op_type == "Conv"}
    assert conv_weights <= {tensor.name for tensor in result.graph.initializer}
    feeds = random_feeds(result)
    assert compare_models(original, result, feeds) <= TOLERANCE
    assert any("fixed input x to [1,3,48,192]" in note for note in step.notes)


def test_paddle_classifier_keeps_dynamic_dims_without_shapes(paddle_cls_path):
    original = onnx.load(str(paddle_cls_path))
    result, step = normalize(paddle_cls_path)

    assert_valid(result)
    dims = input_dims(result)
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))  # -1 became symbolic
    assert "fixed_inputs" not in step.details
    feeds = random_feeds(result, dims={"x": (3, 3, 48, 160)})
    assert compare_models(original, result, feeds) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(TORCH_BATCHNORMS))
def test_torch_models(torch_models, name):
    original = onnx.load(str(torch_models[name]))
    result, step = normalize(torch_models[name])

    assert_valid(result)
    assert default_opset(result) >= 13
    assert input_dims(result) == ["batch", 3, 32, 32]  # nothing given: the batch dim stays dynamic
    assert step.details["folded_batchnorms"] == TORCH_BATCHNORMS[name]
    assert op_count(result, "BatchNormalization") == 0
    # Weights keep the names torch gave them (later passes and the torch bridge look them up by name).
    original_names = {tensor.name for tensor in original.graph.initializer}
    conv_weights = {node.input[1] for node in result.graph.node if node.op_type == "Conv"}
    assert conv_weights and conv_weights <= original_names
    for batch in (1, 3):
        assert compare_models(original, result, random_feeds(original, batch=batch, seed=batch)) <= TOLERANCE


def test_transformer_keeps_layernorm_and_attention(torch_models):
    result, _ = normalize(torch_models["transformer"])
    assert default_opset(result) == 17
    assert op_count(result, "LayerNormalization") == 3
    assert op_count(result, "Softmax") == 1 and op_count(result, "MatMul") >= 2


def test_min_opset_zero_keeps_opset(torch_models):
    result, step = normalize(torch_models["mobilenetv2"], min_opset=0)
    assert default_opset(result) == 11
    assert step.details["opset_before"] == step.details["opset_after"] == 11
    assert not any("raised opset" in note for note in step.notes)


# -- idempotence -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["paddle", "resnet", "shufflenetv2", "light_squeezenet"])
def test_normalizing_twice_changes_nothing_more(source, paddle_cls_path, torch_models, light_models):
    if source == "paddle":
        path, shapes = paddle_cls_path, {"x": PADDLE_SHAPE}
    elif source.startswith("light"):
        path, shapes = next(p for p in light_models if p.stem == source), {}
    else:
        path, shapes = torch_models[source], {}
    once, _ = normalize(path, input_shapes=shapes)
    twice, step = normalize(once, input_shapes=shapes)

    assert twice.SerializeToString(deterministic=True) == once.SerializeToString(deterministic=True)
    for key in ("constants_lifted", "folded_batchnorms", "removed_unused", "initializer_inputs_removed"):
        assert step.details.get(key, 0) == 0, key
    assert step.details["opset_before"] == step.details["opset_after"]


# -- input shapes --------------------------------------------------------------------------------------------------------


def test_given_input_shape_is_fixed_exactly(torch_models):
    original = onnx.load(str(torch_models["resnet"]))
    result, step = normalize(torch_models["resnet"], input_shapes={"input": (4, 3, 32, 32)})
    assert input_dims(result) == [4, 3, 32, 32]
    assert step.details["fixed_inputs"] == {"input": [4, 3, 32, 32]}
    assert compare_models(original, result, random_feeds(result)) <= TOLERANCE


@pytest.mark.parametrize(
    ("shapes", "pattern"),
    [
        ({"input": (1, 3, 32)}, r"input 'input' is \[1,3,32\] \(rank 3\), but the model's input is \[batch,3,32,32\]"),
        ({"input": (1, 3, 64, 64)}, r"input 'input' is \[1,3,64,64\], but the model fixes dim 2 .* to 32, not 64"),
        ({"image": (1, 3, 32, 32)}, r"names input 'image', which the model does not have .*input\[batch,3,32,32\]"),
        ({"input": (0, 3, 32, 32)}, r"every size must be positive"),
    ],
)
def test_bad_input_shapes_are_reported(torch_models, shapes, pattern):
    with pytest.raises(BadInputError, match=pattern):
        normalize(torch_models["resnet"], input_shapes=shapes)


def test_shapes_from_calibration_data_keep_batch_dynamic(paddle_cls_path):
    original = onnx.load(str(paddle_cls_path))
    data = ArrayData({"x": np.random.default_rng(0).standard_normal((4, 3, 48, 192)).astype(np.float32)})
    result, step = normalize(paddle_cls_path, calib=data)

    dims = input_dims(result)
    assert isinstance(dims[0], str) and dims[1:] == [3, 48, 192]
    assert any("calibration data" in note and "batch dim kept dynamic" in note for note in step.notes)
    for batch in (1, 3):
        feeds = random_feeds(result, batch=batch)
        assert compare_models(original, result, feeds) <= TOLERANCE


def test_given_shapes_win_over_data(paddle_cls_path):
    data = ArrayData({"x": np.zeros((2, 3, 48, 320), np.float32)})
    result, _ = normalize(paddle_cls_path, input_shapes={"x": PADDLE_SHAPE}, calib=data)
    assert input_dims(result) == list(PADDLE_SHAPE)


def test_data_that_contradicts_the_model_is_a_data_error(torch_models):
    data = ArrayData({"input": np.zeros((2, 3, 64, 64), np.float32)})
    with pytest.raises(DataError, match=r"calibration data's shape for input 'input'.*not 64"):
        normalize(torch_models["resnet"], calib=data)


def test_fix_shapes_off_ignores_given_shapes(torch_models):
    result, _ = normalize(torch_models["resnet"], input_shapes={"input": (4, 3, 32, 32)}, fix_shapes=False)
    assert input_dims(result) == ["batch", 3, 32, 32]


# -- old opsets ----------------------------------------------------------------------------------------------------------


def caffe2_style_model() -> onnx.ModelProto:
    """Opset 7, IR version 3, weights listed as graph inputs, no node names, ImageScaler/Upsample/Sum/Dropout."""
    g = GraphBuilder("caffe2_style", opset=7, named=False, weights_as="input", seed=3)
    x = g.input("data", [1, 3, 16, 16])
    x = g.node("ImageScaler", [x], scale=0.5, bias=[0.1, -0.2, 0.3])
    x = g.batchnorm(g.conv(x, 3, 8), 8)
    x = g.node("Relu", [x])
    pooled = g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    up = g.node("Upsample", [pooled], mode="nearest", scales=[1.0, 1.0, 2.0, 2.0])
    x = g.node("Sum", [x, up, x])
    x = g.node("Dropout", [x], ratio=0.5)
    x = g.node("Reshape", [x, g.weight("flat_shape", np.array([1, -1], np.int64))])
    x = g.node("Gemm", [x, g.weight("fc_w", (10, 8 * 16 * 16), 0.02), g.weight("fc_b", (10,))], transB=1)
    g.nodes.append(helper.make_node("Softmax", [x], ["prob"]))
    g.output("prob", [1, 10])
    return g.build()


def test_opset7_caffe2_style_model():
    original = caffe2_style_model()
    assert original.ir_version == 3
    result, step = normalize(original)

    assert_valid(result)
    assert default_opset(result) == 13 and result.ir_version >= 7
    assert op_count(result, "ImageScaler") == 0 and op_count(result, "BatchNormalization") == 0
    assert step.details["folded_batchnorms"] == 1
    assert step.details["nodes_named"] >= 9
    assert {"Conv", "Relu", "Resize", "Gemm", "Softmax", "ImageScaler_mul"} <= {n.name for n in result.graph.node}
    assert any(note == "raised opset 7 -> 13" for note in step.notes)
    assert any("ImageScaler" in note for note in step.notes)
    assert compare_models(original, result, random_feeds(original)) <= TOLERANCE


def test_unconvertible_op_names_op_and_node():
    g = GraphBuilder("old", opset=7)
    x = g.input("x", [1, 4])
    y = g.node("Relu", [x])
    g.nodes.append(helper.make_node("Affine", [y], ["out"], name="affine_layer", alpha=2.0, beta=1.0))
    g.output("out", [1, 4])
    with pytest.raises(PassFailedError, match=r"pass 'normalize' failed at node 'affine_layer'.*op 'Affine'.*7 to 13"):
        normalize(g.build())


# -- BatchNormalization folding -----------------------------------------------------------------------------------------


def bn_model(producer: str, **options) -> onnx.ModelProto:
    g = GraphBuilder(f"{producer}_bn", seed=7)
    if producer == "Gemm":
        x = g.input("x", ["n", 12])
        trans_b = options.get("transB", 1)
        inputs = [x, g.weight("fc.weight", (6, 12) if trans_b else (12, 6))]
        if options.get("bias", True):
            inputs.append(g.weight("fc.bias", (1, 6)))
        y = g.node("Gemm", inputs, transB=trans_b, alpha=options.get("alpha", 1.0), beta=options.get("beta", 1.0))
        channels = 6
    elif producer == "ConvTranspose":
        x = g.input("x", ["n", 4, 5, 5])
        inputs = [x, g.weight("up.weight", (4, 3, 3, 3))]  # groups=2: 6 output channels
        y = g.node("ConvTranspose", inputs, kernel_shape=[3, 3], strides=[2, 2], group=2)
        channels = 6
    else:
        x = g.input("x", ["n", 3, 8, 8])
        y = g.conv(x, 3, 6, bias=options.get("bias", True))
        channels = 6
    g.nodes.append(helper.make_node("BatchNormalization", [y, *_bn_params(g, channels)], ["out"], name="bn"))
    g.output("out")
    return g.build()


def _bn_params(g: GraphBuilder, channels: int) -> list[str]:
    return [
        g.positive("bn.weight", (channels,)),
        g.weight("bn.bias", (channels,)),
        g.weight("bn.running_mean", (channels,)),
        g.positive("bn.running_var", (channels,)),
    ]


@pytest.mark.parametrize(
    ("producer", "options"),
    [
        ("Conv", {}),
        ("Conv", {"bias": False}),
        ("ConvTranspose", {}),
        ("Gemm", {}),
        ("Gemm", {"transB": 0, "bias": False, "alpha": 0.7}),
        ("Gemm", {"beta": 0.5}),
    ],
)
def test_batchnorm_folds_into_producer(producer, options):
    original = bn_model(producer, **options)
    weight_name = original.graph.node[-2].input[1]
    result, step = normalize(original, simplify=False)

    assert_valid(result)
    assert step.details["folded_batchnorms_by_op"] == {producer: 1}
    assert [node.op_type for node in result.graph.node] == [producer]
    assert result.graph.node[0].input[1] == weight_name  # the weight keeps its initializer name
    assert result.graph.output[0].name == "out"
    assert compare_models(original, result, random_feeds(original, batch=3)) <= TOLERANCE


def test_conv_without_bias_gets_bias_named_after_weight():
    g = GraphBuilder("torchlike")
    x = g.input("x", [1, 3, 8, 8])
    y = g.node("Conv", [x, g.weight("block.conv.weight", (4, 3, 3, 3))], kernel_shape=[3, 3])
    g.nodes.append(helper.make_node("BatchNormalization", [y, *_bn_params(g, 4)], ["out"]))
    g.output("out")
    result, _ = normalize(g.build(), simplify=False)
    assert list(result.graph.node[0].input) == ["x", "block.conv.weight", "block.conv.bias"]


def test_batchnorm_that_cannot_be_folded_is_left_alone():
    g = GraphBuilder("unfoldable")
    x = g.input("x", [1, 3, 8, 8])
    standalone = g.batchnorm(x, 3)  # on a graph input
    conv = g.conv(standalone, 3, 4)
    after_conv = g.batchnorm(conv, 4)  # the Conv output also feeds the Relu below
    relu = g.node("Relu", [conv])
    g.nodes.append(helper.make_node("Add", [after_conv, relu], ["out"], name="add"))
    g.output("out")
    original = g.build()
    result, step = normalize(original)

    assert op_count(result, "BatchNormalization") == 2
    assert step.details["folded_batchnorms"] == 0
    assert any(note.startswith("left 2 BatchNormalization as they are") for note in step.notes)
    assert compare_models(original, result, random_feeds(original)) <= TOLERANCE


def test_shared_weight_gets_a_private_folded_copy():
    g = GraphBuilder("shared")
    x = g.input("x", [1, 3, 8, 8])
    w = g.weight("shared.weight", (3, 3, 3, 3))
    a = g.node("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    a = g.batchnorm(a, 3)
    b = g.node("Conv", [a, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.nodes.append(helper.make_node("BatchNormalization", [b, *_bn_params(g, 3)], ["out"]))
    g.output("out")
    original = g.build()
    result, step = normalize(original, simplify=False)

    assert step.details["folded_batchnorms"] == 2
    weights = [node.input[1] for node in result.graph.node if node.op_type == "Conv"]
    assert weights[1] == "shared.weight" and weights[0].startswith("shared.weight_bn_folded")
    assert compare_models(original, result, random_feeds(original)) <= TOLERANCE


def test_fold_batchnorm_off_keeps_batchnorm(torch_models):
    result, step = normalize(torch_models["resnet"], fold_batchnorm=False)
    assert op_count(result, "BatchNormalization") == 9
    assert "folded_batchnorms" not in step.details


def test_fold_result_counts_skips():
    model = ir.serde.deserialize_model(bn_model("Conv"))
    model.graph.node(-1).attributes["training_mode"] = ir.AttrInt64("training_mode", 1)
    result = bn_fold.fold_batchnorms(model.graph)
    assert result.total == 0 and result.skipped == {"training-mode or non-spatial BatchNormalization": 1}


# -- constants, names, onnxsim fallbacks ----------------------------------------------------------------------------------


def paddle_style_model() -> onnx.ModelProto:
    g = GraphBuilder("paddle_style", opset=11, named=False, weights_as="constant", seed=5)
    x = g.input("x", [-1, 3, 8, 8])
    x = g.node("Relu", [g.conv(x, 3, 4)])
    x = g.node("Clip", [x, g.weight("lo", np.array(0.0, np.float32)), g.weight("hi", np.array(6.0, np.float32))])
    x = g.node("GlobalAveragePool", [x])
    g.nodes.append(helper.make_node("Flatten", [x], ["out"]))
    g.output("out", [-1, 4])
    return g.build()


def test_constants_are_lifted_and_nodes_named_deterministically():
    original = paddle_style_model()
    first, step = normalize(original, simplify=False)
    second, _ = normalize(original, simplify=False)

    assert op_count(first, "Constant") == 0
    assert step.details["constants_lifted"] == 4
    assert [n.name for n in first.graph.node] == [n.name for n in second.graph.node]
    assert [n.name for n in first.graph.node] == ["Conv", "Relu", "Clip", "GlobalAveragePool", "Flatten"]
    assert compare_models(original, first, random_feeds(original)) <= TOLERANCE


def test_steps_can_be_switched_off():
    original = paddle_style_model()
    result, step = normalize(original, min_opset=0, lift_constants=False, name_nodes=False, simplify=False)
    assert op_count(result, "Constant") == 4
    assert default_opset(result) == 11
    assert not any(node.name for node in result.graph.node)
    assert step.notes == ["replaced 2 negative sizes (-1) of graph inputs/outputs with symbolic dims"]


def test_onnxsim_failure_keeps_model(monkeypatch, torch_models):
    import onnxsim

    def broken(*args, **kwargs):
        raise RuntimeError("simulated onnxsim crash\nwith a second line")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    original = onnx.load(str(torch_models["shufflenetv2"]))
    result, step = normalize(torch_models["shufflenetv2"])

    assert "onnxsim failed (simulated onnxsim crash); kept the model unsimplified" in step.notes
    assert step.details["simplified"] is False
    assert step.details["folded_batchnorms"] == 15  # the other steps still ran
    assert_valid(result)
    assert compare_models(original, result, random_feeds(original)) <= TOLERANCE


def test_onnxsim_check_failure_keeps_model(monkeypatch, torch_models):
    import onnxsim

    monkeypatch.setattr(onnxsim, "simplify", lambda model, **kwargs: (onnx.ModelProto(), False))
    result, step = normalize(torch_models["transformer"])
    assert any("onnxsim's check of its result failed" in note for note in step.notes)
    assert op_count(result, "LayerNormalization") == 3


def test_models_above_2gb_skip_onnxsim(monkeypatch, torch_models):
    import onnxopt.passes.normalize as module

    monkeypatch.setattr(module, "tensor_bytes", lambda model: 3 * 2**30)
    _, step = normalize(torch_models["resnet"])
    assert step.notes[0].startswith("skipped onnxsim: the model's weights exceed protobuf's 2 GB limit")
    assert step.details["folded_batchnorms"] == 9


def _mlp_with_folds() -> onnx.ModelProto:
    """x -> MatMul(W1) -> Add(b) -> Relu -> MatMul(Transpose(W2)) -> y: W1 (256 KB) can be lent; W2 feeds a
    Transpose that only onnxsim's constant folding resolves, so it must stay an initializer; b is small."""
    rng = np.random.default_rng(3)
    w1 = onnx.numpy_helper.from_array(rng.normal(0, 0.05, (256, 256)).astype(np.float32), "W1")
    w2 = onnx.numpy_helper.from_array(rng.normal(0, 0.05, (10, 256)).astype(np.float32), "W2")
    b = onnx.numpy_helper.from_array(rng.normal(0, 0.05, (256,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
         helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
         helper.make_node("Relu", ["hb"], ["r"], name="relu"),
         helper.make_node("Transpose", ["W2"], ["W2t"], name="t"),
         helper.make_node("MatMul", ["r", "W2t"], ["y"], name="mm2")],
        "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])], [w1, w2, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_lendable_weights_are_those_no_folding_can_touch():
    from onnxopt.passes import lent_weights

    model = ir.serde.deserialize_model(_mlp_with_folds())
    assert [v.name for v in lent_weights.lendable(model.graph, min_bytes=2048)] == ["W1"]
    assert [v.name for v in lent_weights.lendable(model.graph, min_bytes=0)] == ["W1", "b"]
    assert lent_weights.lendable(model.graph, min_bytes=10**6) == []
    model.graph.outputs.append(model.graph.initializers["W1"])  # a weight that is also an output stays
    assert lent_weights.lendable(model.graph, min_bytes=2048) == []
    # a weight a subgraph reads from the outer scope stays too
    proto = _mlp_with_folds()
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["z"], name="inner")], "branch", [],
                               [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)])
    proto.graph.input.append(helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []))
    proto.graph.node.append(helper.make_node("If", ["c"], ["w"], name="if", then_branch=branch, else_branch=branch))
    proto.graph.output.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None))
    model = ir.serde.deserialize_model(proto)
    assert lent_weights.lendable(model.graph, min_bytes=2048) == []


def test_weights_lent_to_onnxsim_give_the_same_model():
    """Lending W1 to onnxsim (forced with lend_weights_from_mb=0) writes the very model it writes without lending,
    initializer order included, and the lent weight is the caller's tensor again."""
    source = _mlp_with_folds()
    lent, step = normalize(source, lend_weights_from_mb=0)
    plain, _ = normalize(source, lend_weights=False)
    assert step.details["onnxsim_lent_weights"] == 1 and step.details["simplified"]
    assert any(note.startswith("lent 1 weights") for note in step.notes)
    assert op_count(lent, "Transpose") == 0  # onnxsim still folded the Transpose of the weight it kept
    assert lent.SerializeToString() == plain.SerializeToString()
    assert_valid(lent)
    assert compare_models(source, lent, random_feeds(source)) <= TOLERANCE
    _, default = normalize(source)  # 256 KB of weights: far below the default threshold, nothing lent
    assert "onnxsim_lent_weights" not in default.details


def test_weights_over_the_protobuf_limit_go_to_onnxsim_when_lending_brings_the_rest_under_it(monkeypatch):
    """A model of 2 GB and more fits onnxsim's one protobuf message once its large weights are lent: with the limit
    scaled down to 100 kB, the MLP's 267 kB of weights skip onnxsim as they are, and pass with W1 (256 kB) lent."""
    import onnxopt.passes.normalize as module

    monkeypatch.setattr(module, "PROTOBUF_LIMIT", 100_000)
    source = _mlp_with_folds()
    unlent, skipped = normalize(source, lend_weights=False)
    assert "skipped onnxsim: the model's weights exceed protobuf's 2 GB limit" in skipped.notes
    assert op_count(unlent, "Transpose") == 1
    lent, step = normalize(source, lend_weights_from_mb=0)
    assert step.details["simplified"] and step.details["onnxsim_lent_weights"] == 1
    assert op_count(lent, "Transpose") == 0
    assert compare_models(source, lent, random_feeds(source)) <= TOLERANCE
    monkeypatch.setattr(module, "PROTOBUF_LIMIT", 5_000)  # W2 (10 kB) alone is over it: still skipped, and said so
    _, over = normalize(source, lend_weights_from_mb=0)
    assert ("skipped onnxsim: the model's weights exceed protobuf's 2 GB limit (0.0 GB of them even with 1 lent as "
            "graph inputs)") in over.notes


def test_a_long_vector_is_lent_with_a_symbolic_length():
    """ONNX's data propagation through Gather expands a 1-D input of known length one dim per element (a 2 GiB weight
    lent to onnxsim passed 16 GB): a lent vector longer than shapes.LONG_VECTOR_ELEMENTS has a symbolic length
    while lent, and its own shape again afterwards."""
    from onnxopt.passes import lent_weights, shapes

    table = onnx.numpy_helper.from_array(np.arange(20_000, dtype=np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "idx"], ["y"], name="pick")], "g",
                              [helper.make_tensor_value_info("idx", onnx.TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])], [table])
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model = ir.serde.deserialize_model(source)
    lent = lent_weights.lendable(model.graph)
    assert [value.name for value in lent] == ["table"]
    with lent_weights.lent_as_inputs(model.graph, lent):
        assert [str(d) for d in model.graph.inputs[-1].shape] == [f"{shapes.LONG_VECTOR_PREFIX}table"]
    assert list(model.graph.initializers["table"].shape) == [20_000]
    result, step = normalize(source, lend_weights_from_mb=0)
    assert step.details["onnxsim_lent_weights"] == 1 and step.details["simplified"]
    assert list(result.graph.initializer[0].dims) == [20_000]
    assert compare_models(source, result, {"idx": np.array([0, 5, 19_999, 7], np.int64)}) == 0.0


def test_lent_weights_come_back_when_onnxsim_fails(monkeypatch):
    import onnxsim

    seen = {}

    def broken(model, check_n=0, input_data=None):
        seen["inputs"] = [value.name for value in model.graph.input]
        seen["data"] = sorted(input_data or {})
        raise RuntimeError("simulated onnxsim crash")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    source = _mlp_with_folds()
    result, step = normalize(source, lend_weights_from_mb=0)
    assert seen == {"inputs": ["x", "W1"], "data": ["W1", "x"]}  # lent as an input, real values for the check
    assert "onnxsim failed (simulated onnxsim crash); kept the model unsimplified" in step.notes
    assert [value.name for value in result.graph.input] == ["x"]
    assert sorted(init.name for init in result.graph.initializer) == ["W1", "W2", "b"]
    assert compare_models(source, result, random_feeds(source)) <= TOLERANCE
    with pytest.raises(ValueError, match="lend_weights_from_mb"):
        NormalizePass(lend_weights_from_mb=-1)


# -- configuration -----------------------------------------------------------------------------------------------------


def test_registry_builds_the_pass_from_recipe_values():
    step = registry.create("normalize", {"min-opset": "11", "simplify": "false"})
    assert isinstance(step, NormalizePass)
    assert step.min_opset == 11 and step.simplify is False
    assert NormalizePass.exact and NormalizePass.name == "normalize"


@pytest.mark.parametrize("params", [{"min_opset": 99}, {"min_opset": -1}, {"fold_bn": True}])
def test_bad_parameters_are_recipe_errors(params):
    with pytest.raises(RecipeError):
        registry.create("normalize", params)


def test_pass_reports_no_change_on_clean_model():
    g = GraphBuilder("clean")
    x = g.input("x", [1, 4])
    g.nodes.append(helper.make_node("Relu", [x], ["out"], name="relu"))
    g.output("out", [1, 4])
    result = NormalizePass()(ir.serde.deserialize_model(g.build()))
    assert result.modified is False
    assert run(ir.serde.serialize_model(result.model), {"x": -np.ones((1, 4), np.float32)})[0].max() == 0
