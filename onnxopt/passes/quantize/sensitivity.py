"""Per-layer quantization sensitivity: quantize one Conv/Gemm/MatMul at a time and measure what it costs.

For each layer the model is copied with only that layer simulated in int8 - its float input activation through a
QuantizeLinear/DequantizeLinear pair with the calibrated range, its weight replaced by its fake-quantized value - and
run next to FP32 on the same samples: SQNR of the model's first output and of the layer's own output (dB, higher is
better) and, where the samples carry labels, accuracy. Simulation runs FP32 kernels, so it is fast and independent of
ORT's graph rewriting; the mixed-precision search then checks real int8 models. The probes run at ORT's full
optimization level (NCHWc kernels; a lone Quantize/Dequantize pair before a float Conv is left as it is):
``benchmarks/sensitivity_levels.py`` measured it against the basic level (the one used before) on the PaddleOCR v4
models and the digits nets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.passes.quantize.qparams import TensorRange, quant_params
from onnxopt.runtime import make_full_session, make_session

WeightQuantizer = Callable[[onnx.NodeProto, np.ndarray], np.ndarray]


@dataclass
class LayerSensitivity:
    node: str
    op_type: str
    output_sqnr_db: float
    layer_sqnr_db: float
    accuracy: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "op_type": self.op_type, "output_sqnr_db": round(float(self.output_sqnr_db), 2),
                "layer_sqnr_db": round(float(self.layer_sqnr_db), 2),
                "accuracy": None if self.accuracy is None else round(self.accuracy, 4)}


def sqnr_db(reference: np.ndarray, noisy: np.ndarray) -> float:
    """10 log10(signal power / noise power); inf when identical, -inf when not finite."""
    if not np.all(np.isfinite(noisy)):
        return float("-inf")
    noise = float(np.mean(np.square(reference.astype(np.float64) - noisy)))
    signal = float(np.mean(np.square(reference.astype(np.float64))))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def layer_sensitivity(model: onnx.ModelProto, layers: Sequence[onnx.NodeProto], ranges: Mapping[str, TensorRange],
                      quantize_weight: WeightQuantizer, feeds: Sequence[dict[str, np.ndarray]],
                      labels: np.ndarray | None, reduce_range: bool, symmetric: bool,
                      threads: int | None = None, optimization: str = "all") -> list[LayerSensitivity]:
    """One entry per layer of ``layers``, most sensitive (lowest output SQNR) first. ``optimization``: ORT's graph
    optimization level for the probes (a graph the full level cannot optimize runs at the basic one)."""
    output = model.graph.output[0].name
    reference = _run(model, feeds, [output, *(n.output[0] for n in layers)], threads, optimization)
    table = []
    inits = {init.name: init for init in model.graph.initializer}
    for k, node in enumerate(layers):
        probe = _simulate(model, node, inits, ranges, quantize_weight, symmetric)
        outs = _run(probe, feeds, [output, node.output[0]], threads, optimization)
        accuracy = None
        if labels is not None:
            accuracy = float(np.mean(np.argmax(outs[0].reshape(len(labels), -1), axis=1) == labels))
        table.append(LayerSensitivity(node.name, node.op_type, sqnr_db(reference[0], outs[0]),
                                      sqnr_db(reference[k + 1], outs[1]), accuracy))
    table.sort(key=lambda row: (row.accuracy if row.accuracy is not None else 0.0, row.output_sqnr_db))
    return table


def _simulate(model: onnx.ModelProto, node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto],
              ranges: Mapping[str, TensorRange], quantize_weight: WeightQuantizer, symmetric: bool) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    target = next(n for n in graph.node if n.name == node.name)
    x = target.input[0]
    if x in ranges and x not in inits:
        params = quant_params(ranges[x], "uint8", symmetric, False)
        scale, zero = f"_sens_{x}_s", f"_sens_{x}_z"
        graph.initializer.extend([numpy_helper.from_array(np.array(params.scale, np.float32).reshape(()), scale),
                                  numpy_helper.from_array(np.array(params.zero_point, np.uint8).reshape(()), zero)])
        q, dq = f"_sens_{x}_q", f"_sens_{x}_dq"
        graph.node.extend([helper.make_node("QuantizeLinear", [x, scale, zero], [q]),
                           helper.make_node("DequantizeLinear", [q, scale, zero], [dq])])
        target.input[0] = dq
    w = target.input[1] if len(target.input) > 1 else ""
    if w in inits:
        weight = numpy_helper.to_array(inits[w]).astype(np.float32)
        name = f"_sens_{w}_fq"
        graph.initializer.append(numpy_helper.from_array(quantize_weight(target, weight).astype(np.float32), name))
        target.input[1] = name
    _sort(graph)
    return probe


def _sort(graph: onnx.GraphProto) -> None:
    """Topological order after appending the Q/DQ nodes at the end."""
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in produced for i in n.input):
                ordered.append(n)
                produced.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _run(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str],
         threads: int | None, optimization: str = "all") -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in present)
    if optimization == "all":
        session = make_full_session(probe, threads=threads, what="the sensitivity probe")
    else:
        session = make_session(probe, threads=threads, optimization=optimization, what="the sensitivity probe")
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for feed in feeds:
        for k, value in enumerate(session.run(list(names), feed)):
            parts[k].append(np.asarray(value))
    return [np.concatenate(p, axis=0) if p and p[0].ndim else np.stack(p) for p in parts]


__all__ = ["LayerSensitivity", "layer_sensitivity", "sqnr_db"]
