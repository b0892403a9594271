"""Mean activation per channel at the inputs of the layers that lose channels, for mean replacement.

Removing a channel removes its average contribution to the next layer too, which shifts that layer's outputs; on
the digits MobileNetV2 pruning 20% of every group that way (L1) fell to chance accuracy. Adding the removed
channels' mean contribution to the consumer's bias keeps the expected output (a first-order correction that needs
only forward passes over calibration data).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt.calib_data.base import DataSource
from onnxopt.modelio import InputSpec
from onnxopt.passes.prune.depgraph import DepGraph


def consumer_inputs(proto: onnx.ModelProto, graph: DepGraph) -> list[str]:
    """Inputs of the Conv/Gemm nodes (with a bias) that read channels of a prunable group."""
    nodes = {node.name: node for node in proto.graph.node if node.name}
    names: list[str] = []
    for group in graph.prunable:
        for cut in group.cuts:
            node = nodes.get(cut.node)
            if cut.kind == "consumer" and node is not None and node.op_type in ("Conv", "Gemm") \
                    and len(node.input) > 2 and node.input[2]:
                names.append(node.input[0])
    return list(dict.fromkeys(names))


def input_means(proto: onnx.ModelProto, names: list[str], data: DataSource, specs: list[InputSpec],
                samples: int, threads: int | None = None) -> dict[str, np.ndarray]:
    """Mean over samples and positions of each named value, per index of axis 1 (channels, or Gemm features)."""
    from onnxopt.runtime import make_session

    if not names:
        return {}
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = make_session(model, threads=threads, optimization="basic", what="prune mean replacement")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    seen = 0
    for batch in data.iter_batches(specs, batch_size=32):
        values = session.run(names, batch.inputs)
        for name, value in zip(names, values):
            value = np.asarray(value, dtype=np.float64)
            if value.ndim < 2:
                continue
            axes = tuple(a for a in range(value.ndim) if a != 1)
            sums[name] = sums.get(name, 0.0) + value.sum(axis=axes)
            counts[name] = counts.get(name, 0) + value.size // value.shape[1]
        seen += batch.size
        if seen >= samples:
            break
    return {name: sums[name] / counts[name] for name in sums}
