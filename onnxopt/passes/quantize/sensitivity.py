"""Per-layer quantization sensitivity: quantize one Conv/Gemm/MatMul at a time and measure what it costs.

For each layer the model is copied with only that layer simulated in int8 - its float input activation through a
QuantizeLinear/DequantizeLinear pair with the calibrated range, its weight replaced by its fake-quantized value - and
run next to FP32 on the same samples: SQNR of the model's first output and of the layer's own output (dB, higher is
better) and, where the samples carry labels, accuracy. Simulation runs FP32 kernels, so it is fast and independent of
ORT's graph rewriting; the mixed-precision search then checks real int8 models. The probes run at ORT's full
optimization level (NCHWc kernels; a lone Quantize/Dequantize pair before a float Conv is left as it is):
``benchmarks/sensitivity_levels.py`` measured it against the basic level (the one used before) on the PaddleOCR v4
models and the digits nets.

A probe need not run what lies upstream of its layer, which is FP32 and the same as in the reference run: where few
activations computed upstream are still read downstream before the layer (a *cut*: one activation in a chain or
after a residual block, the current activation and the saved stage outputs in a U-Net or an FPN), the probe is the
graph's tail from there, fed those activations' values from the reference run (:func:`cut_points`).
``benchmarks/sensitivity_cuts.py`` measures what it saves and that the table stays the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.modelio import copy_fields
from onnxopt.passes.quantize.agreement import noise_sum, square_sum
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
    return _sqnr_from_sums(square_sum(reference), noise_sum(reference, noisy), max(int(np.size(reference)), 1))


def _sqnr_from_sums(signal: float, noise: float, count: int) -> float:
    """SQNR in dB from summed signal and noise powers over ``count`` values (-inf for infinite noise)."""
    if noise == float("inf") or noise != noise:
        return float("-inf")
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal / count, 1e-30) / (noise / count))


#: The cut activations kept from the reference run for the probes, at most (bytes, all samples): above it the
#: earliest cuts are dropped (their layers' probes start at an earlier cut, or run the whole graph).
CUT_VALUES_BYTES = 512 << 20
#: A cut has at most this many activations (each probe's tail gets them all as inputs).
MAX_CUT_TENSORS = 8

Cut = tuple[int, tuple[str, ...]]  # (index of the tail's first node, the activations it is fed)


def layer_sensitivity(model: onnx.ModelProto, layers: Sequence[onnx.NodeProto], ranges: Mapping[str, TensorRange],
                      quantize_weight: WeightQuantizer, feeds: Sequence[dict[str, np.ndarray]],
                      labels: np.ndarray | None, reduce_range: bool, symmetric: bool,
                      threads: int | None = None, optimization: str = "all",
                      cuts: bool = True, max_cut_tensors: int = MAX_CUT_TENSORS) -> list[LayerSensitivity]:
    """One entry per layer of ``layers``, most sensitive (lowest output SQNR) first. ``optimization``: ORT's graph
    optimization level for the probes (a graph the full level cannot optimize runs at the basic one); ``cuts``:
    probes run the graph's tail from the last cut of at most ``max_cut_tensors`` activations before their layer
    (:func:`cut_points`), else the whole graph."""
    output = model.graph.output[0].name
    batch = max((int(np.shape(v)[0]) for v in feeds[0].values() if np.ndim(v)), default=1) if feeds else 1
    starts = _probe_starts(model, layers, len(feeds), batch, max_cut_tensors) if cuts else {}
    cut_names = sorted({tensor for _, tensors in starts.values() for tensor in tensors})
    names = [output, *(n.output[0] for n in layers)]
    parts = _run_parts(model, feeds, [*names, *cut_names], threads, optimization)
    reference = {name: parts[name] for name in names}  # one value per feed, never joined
    signal = {name: (sum(square_sum(v) for v in values), sum(v.size for v in values))
              for name, values in reference.items()}
    cut_values = {name: parts[name] for name in cut_names}
    tails: dict[Cut, tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]] = {}  # with its initializers
    table = []
    whole_inits = {init.name: init for init in model.graph.initializer}

    def measure(probe: onnx.ModelProto, probe_feeds: Sequence[dict[str, np.ndarray]],
                node: onnx.NodeProto) -> tuple[float, float, float | None]:
        """The probe's output and layer SQNR against the reference, summed one feed at a time, and its accuracy."""
        watched = list(dict.fromkeys([output, node.output[0]]))
        noise = dict.fromkeys(watched, 0.0)
        predictions = []
        for i, values in enumerate(_each_feed(probe, probe_feeds, watched, threads, optimization)):
            for name, value in zip(watched, values):
                noise[name] += noise_sum(reference[name][i], value)
            if labels is not None:
                predictions.append(values[0])
        accuracy = None
        if labels is not None:
            accuracy = float(np.mean(np.argmax(_joined(predictions).reshape(len(labels), -1), axis=1) == labels))
        output_db, layer_db = (_sqnr_from_sums(signal[name][0], noise[name], signal[name][1])
                               for name in (output, node.output[0]))
        return output_db, layer_db, accuracy

    for node in layers:
        start = starts.get(node.name)
        if start is None:
            outcome = measure(_simulate(model, node, whole_inits, ranges, quantize_weight, symmetric), feeds, node)
        else:
            if start not in tails:
                tail = _tail(model, *start)
                tails[start] = tail, {init.name: init for init in tail.graph.initializer}
            tail, tail_inits = tails[start]
            probe = _simulate(tail, node, tail_inits, ranges, quantize_weight, symmetric)
            try:
                tail_feeds = [{tensor: cut_values[tensor][i] for tensor in start[1]} for i in range(len(feeds))]
                outcome = measure(probe, tail_feeds, node)
            except Exception:  # noqa: BLE001 - ORT refuses the tail (a stale shape of the cut in the graph's
                # value_info, say): the whole graph, whose own errors are raised
                outcome = measure(_simulate(model, node, whole_inits, ranges, quantize_weight, symmetric), feeds, node)
        table.append(LayerSensitivity(node.name, node.op_type, *outcome))
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


def added_noise_ranking(fp32: onnx.ModelProto, quantized: onnx.ModelProto, layers: Sequence[onnx.NodeProto],
                        feeds: Sequence[dict[str, np.ndarray]], threads: int | None = None) -> list[str]:
    """``layers``' names, the one that adds the most quantization noise first, from one run of the int8 model
    ``quantized`` (every layer quantized) beside ``fp32`` on ``feeds``: each layer's added noise-to-signal power is
    its output's minus its input's (10^(-SQNR/10) against FP32), the noise arriving from upstream taken to pass
    through at the same relative power. Two runs instead of one probe per layer; a different order than the probes'
    (it sees each layer amid the others' noise), so the mixed-precision fallback bisects on both and lets the timing
    choose (:meth:`QuantizePass._mixed_fallback`)."""
    names = list(dict.fromkeys(name for node in layers for name in (node.input[0], node.output[0])))
    signal, noise = np.zeros(len(names)), np.zeros(len(names))
    for reference, noisy in zip(_each_feed(fp32, feeds, names, threads), _each_feed(quantized, feeds, names, threads)):
        for i, (ref, out) in enumerate(zip(reference, noisy)):  # one sample's activations held at a time
            signal[i] += square_sum(ref)
            noise[i] += noise_sum(ref, out)
    ratio = {name: (n / s if s > 0 else np.inf) if n > 0 else 0.0 for name, s, n in zip(names, signal, noise)}
    added = {node.name: ratio[node.output[0]] - ratio[node.input[0]] for node in layers}
    return sorted(added, key=lambda name: -added[name] if added[name] == added[name] else 0.0)  # NaN: inf - inf


def cut_points(graph: onnx.GraphProto, max_tensors: int = 1) -> list[Cut]:
    """``(i, tensors)`` for each node index ``i`` before which ``tensors`` (at most ``max_tensors`` of them, sorted)
    are the only activations computed so far that a node from ``i`` on (or a graph output) still reads: the graph
    from node ``i`` on, fed ``tensors``, computes every output. Nodes must be in topological order (ONNX requires
    it); none where a node has a subgraph (it may read outer values that its inputs do not list), and none while a
    graph input is still to be read or a graph output has been computed."""
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node
           for attr in n.attribute):
        return []
    constants = {init.name for init in graph.initializer}
    last_read: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in constants:
                last_read[name] = index
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input if i.name not in constants}
    live = set(inputs)
    cuts: list[Cut] = []
    for index, node in enumerate(graph.node):
        live = {name for name in live if name in outputs or last_read.get(name, -1) >= index}
        if index and 1 <= len(live) <= max_tensors and not live & (inputs | outputs):  # the tail computes every output
            cuts.append((index, tuple(sorted(live))))
        live.update(name for name in node.output if name)
    return cuts


def _probe_starts(model: onnx.ModelProto, layers: Sequence[onnx.NodeProto], samples: int,
                  batch: int, max_tensors: int = MAX_CUT_TENSORS) -> dict[str, Cut]:
    """Layer name -> the cut its probe starts at: the last one at or before the layer, among the cuts whose values
    for ``samples`` feeds of ``batch`` fit ``CUT_VALUES_BYTES`` together (the latest kept first: they skip the
    most; an activation in several cuts counts once)."""
    graph = model.graph
    cuts = cut_points(graph, max_tensors)
    if not cuts:
        return {}
    position = {node.name: index for index, node in enumerate(graph.node) if node.name}
    wanted = {}
    for layer in layers:
        before = [cut for cut in cuts if cut[0] <= position.get(layer.name, -1)]
        if before:
            wanted[layer.name] = before[-1]
    sizes = {info.name: _tensor_bytes(info, batch) for info in graph.value_info}
    kept: set[Cut] = set()
    held: set[str] = set()
    total = 0
    for cut in sorted(set(wanted.values()), reverse=True):
        new = [tensor for tensor in cut[1] if tensor not in held]
        needed = [sizes.get(tensor) for tensor in new]
        if any(size is None for size in needed):
            continue
        extra = sum(size for size in needed if size is not None) * samples
        if total + extra <= CUT_VALUES_BYTES:
            kept.add(cut)
            held.update(new)
            total += extra
    starts = {}
    for layer in layers:
        if layer.name not in wanted:
            continue
        usable = [cut for cut in cuts if cut in kept and cut[0] <= position[layer.name]]
        if usable:
            starts[layer.name] = usable[-1]
    return starts


def _tensor_bytes(info: onnx.ValueInfoProto, batch: int) -> int | None:
    """Bytes of one feed's float32 value of ``info`` (a symbolic leading dim counts as ``batch``), when its type is
    float and every other dim is known."""
    tensor = info.type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT or not tensor.HasField("shape") or not tensor.shape.dim:
        return None
    dims = [d.dim_value for d in tensor.shape.dim]
    dims[0] = dims[0] if dims[0] > 0 else batch
    if any(d <= 0 for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) * 4


def _tail(model: onnx.ModelProto, index: int, tensors: Sequence[str]) -> onnx.ModelProto:
    """The graph from node ``index`` on, with ``tensors`` (a cut) as its inputs and only the initializers it
    reads."""
    graph = model.graph
    nodes = list(graph.node)[index:]
    read = {name for node in nodes for name in node.input}
    tail = onnx.ModelProto()
    copy_fields(tail, model, skip="graph")
    copy_fields(tail.graph, graph, skip="node")
    del tail.graph.initializer[:]
    tail.graph.initializer.extend(init for init in graph.initializer if init.name in read)
    del tail.graph.input[:]
    infos = {v.name: v for v in [*graph.value_info, *graph.input]}
    for tensor in tensors:
        info = infos.get(tensor)
        tail.graph.input.append(info if info is not None
                                else helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    tail.graph.node.extend(nodes)
    return tail


def _run_parts(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str],
               threads: int | None, optimization: str = "all") -> dict[str, list[np.ndarray]]:
    """Each of ``names`` (once, if named twice) over ``feeds``: one value per feed."""
    unique = list(dict.fromkeys(names))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in unique}
    for values in _each_feed(model, feeds, unique, threads, optimization):
        for name, value in zip(unique, values):
            parts[name].append(value)
    return parts


def _each_feed(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str],
               threads: int | None, optimization: str = "all") -> Iterator[list[np.ndarray]]:
    """``names``' values (distinct names, graph outputs or not) for one feed after another, from one session."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in present)
    if optimization == "all":
        session = make_full_session(probe, threads=threads, what="the sensitivity probe")
    else:
        session = make_session(probe, threads=threads, optimization=optimization, what="the sensitivity probe")
    for feed in feeds:
        yield [np.asarray(value) for value in session.run(list(names), feed)]


def _joined(values: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(values, axis=0) if values and values[0].ndim else np.stack(values)


__all__ = ["LayerSensitivity", "added_noise_ranking", "cut_points", "layer_sensitivity", "sqnr_db"]
