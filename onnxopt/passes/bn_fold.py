"""Folding inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

A BatchNormalization after a linear op is an affine map per output channel, so it can be baked into that op's weight
and bias: ``W' = W * s`` and ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``. The result computes
the same function with one node fewer, and later passes (pruning, quantization) see the weights they actually act on.

The folded weight keeps its initializer name (the torch bridge and other passes key weights by initializer name);
only when the weight is shared with another node does the folded copy get a new name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.irutil import constant_array, new_initializer

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class FoldResult:
    """What :func:`fold_batchnorms` did: folds per producer op, and why the others were left alone."""

    folded: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    renamed_shared_weights: int = 0

    @property
    def total(self) -> int:
        return sum(self.folded.values())


def fold_batchnorms(graph: ir.Graph) -> FoldResult:
    """Fold every foldable BatchNormalization of ``graph`` (the main graph; subgraphs are left alone)."""
    result = FoldResult()
    names = _used_names(graph)
    for node in list(graph):
        if node.op_type != "BatchNormalization" or node.domain not in _DEFAULT_DOMAINS:
            continue
        reason = _fold_one(graph, node, names, result)
        if reason is not None:
            result.skipped[reason] += 1
    return result


def structural_blocker(graph: ir.Graph, bn: ir.Node) -> str | None:
    """Why ``bn`` cannot be folded whatever its values (None: its place in ``graph`` allows it). The quantize pass
    asks this to decide whether normalize would fold anything."""
    if len(bn.inputs) < 5 or any(v is None for v in bn.inputs[:5]):
        return "malformed BatchNormalization"
    if bn.attributes.get_int("training_mode", 0) != 0 or bn.attributes.get_int("spatial", 1) != 1:
        return "training-mode or non-spatial BatchNormalization"
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return "BatchNormalization statistics outputs in use"
    x = bn.inputs[0]
    producer = x.producer() if x is not None else None
    if producer is None or producer.op_type not in FOLDABLE or producer.domain not in _DEFAULT_DOMAINS:
        return "not after Conv/ConvTranspose/Gemm"
    if producer.graph is not graph or x.is_graph_output() or len(x.uses()) != 1:
        return "producer output has other consumers"
    return None


def _fold_one(graph: ir.Graph, bn: ir.Node, names: set[str], result: FoldResult) -> str | None:
    """Fold ``bn`` into its producer; returns why not when it cannot be done (None on success)."""
    blocker = structural_blocker(graph, bn)
    if blocker is not None:
        return blocker
    x = bn.inputs[0]
    producer = x.producer() if x is not None else None
    assert x is not None and producer is not None
    params = [constant_array(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return "statistics are not constant"
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)  # type: ignore[arg-type]
    weight_value = producer.inputs[1] if len(producer.inputs) > 1 else None
    weight = constant_array(weight_value)
    if weight is None or weight.dtype.kind != "f":
        return "weight is not a constant float tensor"
    scale = gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
    folded = _fold_arrays(producer, weight, scale, beta, mean)
    if folded is None:
        return "shapes do not line up"
    new_weight, new_bias = folded

    assert weight_value is not None
    _set_weight(graph, producer, weight_value, new_weight.astype(weight.dtype), names, result)
    _set_bias(graph, producer, weight_value, new_bias.astype(weight.dtype), names)
    if producer.op_type == "Gemm":
        producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)

    # The producer's output takes over the BatchNormalization's output (and its name, which may be a graph output).
    bn_out = bn.outputs[0]
    out_name = bn_out.name
    if x.shape is None and bn_out.shape is not None:
        x.shape = bn_out.shape
    bn_out.replace_all_uses_with(x, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    x.name = out_name
    result.folded[producer.op_type] += 1
    return None


def _fold_arrays(
    producer: ir.Node, weight: np.ndarray, scale: np.ndarray, beta: np.ndarray, mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """New (weight, bias) for ``producer`` in float64, or None when the channel counts disagree."""
    w = weight.astype(np.float64)
    bias = constant_array(producer.inputs[2]) if len(producer.inputs) > 2 and producer.inputs[2] is not None else None
    if len(producer.inputs) > 2 and producer.inputs[2] is not None and bias is None:
        return None  # a bias computed at run time cannot absorb the shift
    if producer.op_type == "Conv":
        channels = w.shape[0]
        if not _sizes_match(channels, scale, beta, mean):
            return None
        new_w = w * scale.reshape((channels,) + (1,) * (w.ndim - 1))
    elif producer.op_type == "ConvTranspose":
        groups = producer.attributes.get_int("group", 1)
        if w.ndim < 3 or w.shape[0] % groups:
            return None
        per_group = w.shape[1]
        channels = groups * per_group
        if not _sizes_match(channels, scale, beta, mean):
            return None
        grouped = w.reshape((groups, w.shape[0] // groups, per_group) + w.shape[2:])
        new_w = (grouped * scale.reshape((groups, 1, per_group) + (1,) * (w.ndim - 2))).reshape(w.shape)
    else:  # Gemm: Y = alpha * A @ B + beta * C, channels are B's output columns
        if w.ndim != 2:
            return None
        trans_b = producer.attributes.get_int("transB", 0)
        channels = w.shape[0] if trans_b else w.shape[1]
        if not _sizes_match(channels, scale, beta, mean):
            return None
        new_w = w * (scale[:, None] if trans_b else scale[None, :])
        if bias is not None:
            c = np.asarray(bias, dtype=np.float64)
            if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or c.size not in (1, channels):
                return None  # a per-row C cannot be folded into a per-channel bias
            bias = np.broadcast_to(c.reshape(-1), (channels,)) * producer.attributes.get_float("beta", 1.0)
    b = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    if b.size != channels:
        return None
    return new_w, (b - mean) * scale + beta


def _sizes_match(channels: int, *arrays: np.ndarray) -> bool:
    return all(a.size == channels for a in arrays)


def _set_weight(
    graph: ir.Graph, node: ir.Node, value: ir.Value, array: np.ndarray, names: set[str], result: FoldResult
) -> None:
    if len(value.uses()) == 1:
        value.const_value = ir.tensor(array, name=value.name)
        return
    # Shared with another node: this node gets its own folded copy.
    assert value.name is not None
    copy = new_initializer(graph, _unique(f"{value.name}_bn_folded", names), array)
    node.replace_input_with(1, copy)
    result.renamed_shared_weights += 1


def _set_bias(graph: ir.Graph, node: ir.Node, weight: ir.Value, array: np.ndarray, names: set[str]) -> None:
    old = node.inputs[2] if len(node.inputs) > 2 else None
    if old is not None and len(old.uses()) == 1:
        assert old.const_value is not None  # checked by _fold_arrays
        if old.const_value.size == array.size:
            array = array.reshape(old.const_value.shape)  # e.g. a Gemm C of shape [1, N] stays [1, N]
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return
    weight_name = weight.name or node.name or node.op_type
    base = weight_name[: -len("weight")] + "bias" if weight_name.endswith("weight") else f"{weight_name}_bias"
    bias = new_initializer(graph, _unique(base, names), array)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, bias)


def _used_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        names.update(v.name for v in node.outputs if v.name)
    return names


def _unique(base: str, names: set[str]) -> str:
    name, index = base, 1
    while name in names:
        name = f"{base}_{index}"
        index += 1
    names.add(name)
    return name
