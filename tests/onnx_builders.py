"""Building small ONNX models with onnx.helper, and comparing two models' outputs on ONNX Runtime.

Shared by test files: ``GraphBuilder`` for hand-made graphs (any opset, unnamed nodes, weights as Constant nodes or
as graph inputs, the shapes of old exports); ``conv_classifier`` / ``labelled_npz`` / ``save`` for a ready-made
classifier with data it classifies perfectly (the CLI and pipeline fixtures); ``compare_models`` / ``random_feeds``
for numeric checks. Everything is deterministic and needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ModelLike = "onnx.ModelProto | ir.Model | str | Path"


class GraphBuilder:
    """Append nodes one by one; values are referred to by name.

    ``named=False`` leaves nodes without names (as several exporters do); ``weights_as="constant"`` stores weights in
    Constant nodes (PaddlePaddle style); ``weights_as="input"`` also lists initializers as graph inputs (Caffe2 style,
    IR version 3).
    """

    def __init__(
        self,
        name: str = "graph",
        *,
        opset: int = 13,
        seed: int = 0,
        named: bool = True,
        weights_as: str = "initializer",
    ):
        if weights_as not in ("initializer", "constant", "input"):
            raise ValueError(weights_as)
        self.name = name
        self.opset = opset
        self.named = named
        self.weights_as = weights_as
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0

    def fresh(self, prefix: str = "t") -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def input(self, name: str, shape: Sequence[int | str | None], dtype: Any = np.float32) -> str:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, name: str, shape: Sequence[int | str | None] | None = None, dtype: Any = np.float32) -> str:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.outputs.append(helper.make_tensor_value_info(name, elem, None if shape is None else list(shape)))
        return name

    def weight(self, name: str, value: np.ndarray | Sequence[int], scale: float = 0.2) -> str:
        """A constant tensor: ``value`` itself, or random normal data of shape ``value`` times ``scale``."""
        if isinstance(value, np.ndarray):
            array = value
        else:
            array = (self.rng.standard_normal(tuple(value)) * scale).astype(np.float32)
        if self.weights_as == "constant":
            self.nodes.append(
                helper.make_node(
                    "Constant", [], [name], name=f"{name}_const" if self.named else "",
                    value=numpy_helper.from_array(array, name),
                )
            )
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
            if self.weights_as == "input":
                elem = helper.np_dtype_to_tensor_dtype(array.dtype)
                self.inputs.append(helper.make_tensor_value_info(name, elem, list(array.shape)))
        return name

    def positive(self, name: str, shape: Sequence[int], low: float = 0.5, high: float = 2.0) -> str:
        return self.weight(name, self.rng.uniform(low, high, tuple(shape)).astype(np.float32))

    def node(self, op: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, **attrs: Any) -> Any:
        """Add a node; returns its output name (or the list of names when it has several)."""
        names = [self.fresh(op.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op, list(inputs), names, name=self.fresh(op) if self.named else "", **attrs))
        return names[0] if len(names) == 1 else names

    def conv(self, x: str, cin: int, cout: int, kernel: int = 3, *, bias: bool = True, groups: int = 1, **attrs):
        w = self.weight(self.fresh("conv_w"), (cout, cin // groups, kernel, kernel))
        inputs = [x, w] + ([self.weight(self.fresh("conv_b"), (cout,))] if bias else [])
        return self.node("Conv", inputs, kernel_shape=[kernel, kernel], pads=[kernel // 2] * 4, group=groups, **attrs)

    def batchnorm(self, x: str, channels: int, **attrs: Any) -> str:
        params = [
            self.positive(self.fresh("bn_gamma"), (channels,)),
            self.weight(self.fresh("bn_beta"), (channels,)),
            self.weight(self.fresh("bn_mean"), (channels,)),
            self.positive(self.fresh("bn_var"), (channels,)),
        ]
        return self.node("BatchNormalization", [x, *params], epsilon=1e-3, **attrs)

    def build(self, *, ir_version: int | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="tests")
        if ir_version is None:
            ir_version = 3 if self.weights_as == "input" else helper.find_min_ir_version_for(model.opset_import)
        model.ir_version = max(ir_version, 3)
        return model

    def save(self, path: str | Path, **kwargs: Any) -> Path:
        path = Path(path)
        onnx.save(self.build(**kwargs), str(path))
        return path


# -- a ready-made classifier -------------------------------------------------------------------------------------------


def conv_classifier(num_classes: int = 4, channels: int = 8, size: int = 8, batch: int | str = "N",
                    opset: int = 13, seed: int = 0, with_bn: bool = True) -> onnx.ModelProto:
    """input [batch,3,size,size] -> Conv -> (BN) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> logits."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (channels, 3, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "conv.bias"),
        numpy_helper.from_array(rng.normal(0, 0.5, (num_classes, channels)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(rng.normal(0, 0.1, num_classes).astype(np.float32), "fc.bias"),
    ]
    nodes = [helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["conv_out"], name="conv",
                              pads=[1, 1, 1, 1])]
    act_in = "conv_out"
    if with_bn:
        inits += [
            numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "bn.scale"),
            numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "bn.bias"),
            numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "bn.mean"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "bn.var"),
        ]
        nodes.append(helper.make_node("BatchNormalization", ["conv_out", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
                                      ["bn_out"], name="bn"))
        act_in = "bn_out"
    nodes += [
        helper.make_node("Relu", [act_in], ["relu_out"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu_out"], ["pool_out"], name="pool"),
        helper.make_node("Flatten", ["pool_out"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, num_classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxopt-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def labelled_npz(path: Path, model: onnx.ModelProto, samples: int = 32, seed: int = 1) -> Path:
    """Random inputs labelled with the model's own predictions (so accuracy is 100% before any change)."""
    rng = np.random.default_rng(seed)
    shape = [d.dim_value or samples for d in model.graph.input[0].type.tensor_type.shape.dim]
    shape[0] = samples
    x = rng.normal(0, 1, shape).astype(np.float32)
    predictor = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = predictor.run(None, {model.graph.input[0].name: x})[0].argmax(-1).astype(np.int64)
    np.savez(path, **{model.graph.input[0].name: x, "y": y})
    return path


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` to ``path`` and return the path (for fixtures)."""
    onnx.save(model, str(path))
    return path


# -- running and comparing ---------------------------------------------------------------------------------------------


def as_proto(model: ModelLike) -> onnx.ModelProto:  # type: ignore[valid-type]
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, ir.Model):
        return ir.serde.serialize_model(model)
    return onnx.load(str(model))


def session(model: ModelLike) -> ort.InferenceSession:  # type: ignore[valid-type]
    """An ORT session with graph optimizations off, so that the model itself is what gets compared."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(as_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def random_feeds(
    model: ModelLike,  # type: ignore[valid-type]
    *,
    batch: int = 2,
    seed: int = 0,
    dims: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input: dynamic leading dims get ``batch``; other dynamic dims need ``dims``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for meta in session(model).get_inputs():
        if dims and meta.name in dims:
            shape = list(dims[meta.name])
        else:
            shape = [d if isinstance(d, int) and d > 0 else batch for d in meta.shape]
        dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}[meta.type]
        feeds[meta.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run(model: ModelLike, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:  # type: ignore[valid-type]
    return session(model).run(None, dict(feeds))


def relative_error(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """Largest absolute difference over each output's largest magnitude (worst output)."""
    assert len(expected) == len(actual), "output counts differ"
    worst = 0.0
    for a, b in zip(expected, actual):
        assert a.shape == b.shape, f"output shapes differ: {a.shape} vs {b.shape}"
        scale = float(np.abs(a).max()) if a.size else 0.0
        diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0
        worst = max(worst, diff / max(scale, 1e-12))
    return worst


def compare_models(reference: ModelLike, candidate: ModelLike, feeds: Mapping[str, np.ndarray]) -> float:  # type: ignore[valid-type]
    """Relative error of ``candidate``'s outputs against ``reference``'s on the same inputs."""
    return relative_error(run(reference, feeds), run(candidate, feeds))


def outlier_net(batch: int | str = "N") -> onnx.ModelProto:
    """Conv -> Relu -> Add -> Conv -> Relu -> Conv -> Sigmoid (a probability map, judged by SQNR) whose Add lifts one
    channel of the middle conv's input by 300: one scale for the whole tensor crushes the other seven, so
    every candidate that quantizes that input fails the 20 dB bar (the first conv and the head, the regions the
    search keeps FP32, are not the cause); with the middle conv FP32 the other two are int8 and pass. A fixed
    ``batch`` makes the search's checks run one sample at a time."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32)
    offset = np.zeros((1, 8, 1, 1), np.float32)
    offset[0, 0] = 300.0
    w2 = rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    w2[:, 0] /= 300.0
    w3 = rng.normal(0, 0.3, (1, 8, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Add", ["r1", "offset"], ["m1"], name="outlier"),
             helper.make_node("Conv", ["m1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c3"], ["y"], name="prob")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])]
    graph = helper.make_graph(nodes, "outlier", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1, 8, 8])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(offset, "offset"),
                               numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(w3, "w3")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def sparse_gather_model(folder: Path) -> tuple[Path, Path]:
    """``big.onnx``, whose one initializer (a 1-D float weight, 2 GiB + 4 KiB of zeros) lives in the sparse file
    ``big.bin``: Gather picks four values, so inputs and outputs stay tiny. No disk blocks, no time to create.
    (tests/test_reliability.py; benchmarks/large_model.py)"""
    count = 2**31 // 4 + 1024
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL, dims=[count])
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(count * 4))):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Gather", ["W", "idx"], ["y"], name="pick")], "big",
                              [helper.make_tensor_value_info("idx", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path, data = folder / "big.onnx", folder / "big.bin"
    onnx.save(model, str(path))
    with open(data, "wb") as handle:
        handle.truncate(count * 4)
    return path, data
