"""Empirical bias correction (Nagel et al. 2019, section 4.2): int8 weight rounding shifts the mean of each output
channel by ``E[(W_q - W) x]``; subtracting that shift from the bias removes the biased part of the error.

The paper's data-free variant takes ``E[x]`` from the preceding BatchNorm's statistics, which are gone after
``normalize`` folded BN, so the shift is measured on calibration data instead: a copy of the model gets, for each
corrected conv or Gemm, a twin node with weight ``W_q - W`` (no bias) reading the same float input, reduced to its
per-channel mean; one run over the calibration samples gives every shift. The weight grid mirrors what ONNX Runtime's
quantizer will use (symmetric int8, per channel or per tensor, reduce_range) with the same weight method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.calib_data.base import DataSource
from onnxopt.modelio import InputSpec
from onnxopt.runtime import make_session

#: fake-quantized weight of (node, weight array) -> array, as the quantizer will store it.
WeightQuantizer = Callable[[onnx.NodeProto, np.ndarray], np.ndarray]
_BATCH = 32


def correct_biases(model: onnx.ModelProto, nodes: Sequence[str], quantize_weight: WeightQuantizer, data: DataSource,
                   specs: Sequence[InputSpec], samples: int, threads: int | None = None) -> dict[str, float]:
    """Subtract the measured mean shift from the bias of each named Conv/Gemm in ``model`` (in place).

    Returns node name -> largest |shift| corrected (for the report). Convs without bias get one.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    wanted = set(nodes)
    targets = [n for n in graph.node if n.name in wanted and n.op_type in ("Conv", "Gemm") and n.input[1] in inits
               and not _transposed_a(n)]
    if not targets:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    outputs: list[str] = []
    for k, node in enumerate(targets):
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        delta = (quantize_weight(node, weight) - weight).astype(np.float32)
        dname, yname, mname = f"_bc_w{k}", f"_bc_y{k}", f"_bc_m{k}"
        probe.graph.initializer.append(numpy_helper.from_array(delta, dname))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            probe.graph.node.append(helper.make_node("Conv", [node.input[0], dname], [yname], **attrs))
            axes = [0, *range(2, 2 + weight.ndim - 2)]
        else:
            attrs.pop("beta", None)
            probe.graph.node.append(helper.make_node("Gemm", [node.input[0], dname], [yname], **attrs))
            axes = [0]
        probe.graph.node.append(helper.make_node("ReduceMean", [yname], [mname], axes=axes, keepdims=0))
        outputs.append(mname)
    probe.graph.output.extend(helper.make_tensor_value_info(m, onnx.TensorProto.FLOAT, None) for m in outputs)
    _set_reduce_mean_opset(probe)
    session = make_session(probe, threads=threads, optimization="basic", what="the bias-correction probe")
    sums = [np.zeros(1) for _ in outputs]
    seen = 0
    for batch in data.iter_samples(specs, samples, batch_size=_BATCH):
        for k, value in enumerate(session.run(outputs, batch.inputs)):
            sums[k] = sums[k] + np.asarray(value, dtype=np.float64) * batch.size
        seen += batch.size
    shifts: dict[str, float] = {}
    for k, node in enumerate(targets):
        shift = (sums[k] / max(seen, 1)).astype(np.float32)
        channels = inits[node.input[1]].dims[0] if node.op_type == "Conv" else shift.shape[0]
        if len(node.input) > 2 and node.input[2] and node.input[2] in inits:
            bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
            inits[node.input[2]].CopyFrom(numpy_helper.from_array(bias - shift, node.input[2]))
        elif node.op_type == "Conv":
            name = f"{node.input[1]}_bias_corrected"
            graph.initializer.append(numpy_helper.from_array(-shift.reshape(channels), name))
            if len(node.input) < 3:
                node.input.append(name)
            else:
                node.input[2] = name
        else:
            continue  # Gemm without C: its bias would need broadcasting rules; left as is
        shifts[node.name] = float(np.max(np.abs(shift)))
    return shifts


def _transposed_a(node: onnx.NodeProto) -> bool:
    return any(a.name == "transA" and a.i for a in node.attribute)


def _set_reduce_mean_opset(model: onnx.ModelProto) -> None:
    """ReduceMean takes ``axes`` as an attribute up to opset 17; the probe is built that way, so cap it there."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version >= 18:
            for node in model.graph.node:
                if node.op_type == "ReduceMean" and node.output[0].startswith("_bc_m"):
                    axes = next(a for a in node.attribute if a.name == "axes")
                    name = node.output[0] + "_axes"
                    model.graph.initializer.append(numpy_helper.from_array(np.array(axes.ints, np.int64), name))
                    node.attribute.remove(axes)
                    node.input.append(name)


__all__ = ["correct_biases"]
