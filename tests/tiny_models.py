"""Small ONNX models built with onnx.helper, deterministic, for tests that need no torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


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
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    shape = [d.dim_value or samples for d in model.graph.input[0].type.tensor_type.shape.dim]
    shape[0] = samples
    x = rng.normal(0, 1, shape).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {model.graph.input[0].name: x})[0].argmax(-1).astype(np.int64)
    np.savez(path, **{model.graph.input[0].name: x, "y": y})
    return path


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
