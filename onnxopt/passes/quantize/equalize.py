"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction"): rescale output channel ``i`` of a conv by ``1/s_i`` and the matching input channel of the next conv by
``s_i`` so that both have the same per-channel weight range, ``s_i = sqrt(r1_i / r2_i)``.

Depthwise convs have a few channels with huge ranges, which wreck per-tensor int8 scales; equalized, every channel
uses the grid. The float function is unchanged only when what lies between the two convs commutes with a positive
per-channel scale: nothing, or ReLU (``relu(x/s) = relu(x)/s``). ReLU6 (``Clip(0, 6)``) does not (its 6 would have
to become ``6/s_i`` per channel); the paper replaces it by ReLU, which changes the model, so such pairs are skipped
and counted. Works on an ONNX proto whose weights are initializers (after ``normalize``: BN folded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

#: Ops between the two convs that commute with a positive per-channel scale.
_EQUIVARIANT = ("Relu",)
_MAX_ITERATIONS = 20
_TOLERANCE = 1e-3


@dataclass
class EqualizeResult:
    pairs: int
    skipped_clip: int
    iterations: int
    spread_before: float  # mean over convs of max/min per-channel weight range (|w| max per channel)
    spread_after: float


def equalize(model: onnx.ModelProto) -> EqualizeResult:
    """Equalize every Conv -> [Relu] -> Conv pair of ``model`` in place (float outputs unchanged up to rounding)."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    pairs, skipped = _pairs(graph, inits)
    names_used = {name for pair in pairs for name in pair[1:] if name}
    arrays = {name: numpy_helper.to_array(inits[name]).astype(np.float32) for name in names_used}
    names = sorted({p[1] for p in pairs} | {p[3] for p in pairs})
    before = _spread([arrays[n] for n in names])
    iterations = 0
    for iterations in range(1, _MAX_ITERATIONS + 1):
        change = 0.0
        for depthwise2, w1, b1, w2 in pairs:
            r1 = np.abs(arrays[w1]).reshape(arrays[w1].shape[0], -1).max(axis=1)
            w2a = arrays[w2]
            r2 = (np.abs(w2a).reshape(w2a.shape[0], -1).max(axis=1) if depthwise2
                  else np.abs(np.moveaxis(w2a, 1, 0)).reshape(w2a.shape[1], -1).max(axis=1))
            scale = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-30)), 1.0).astype(np.float32)
            change = max(change, float(np.max(np.abs(np.log(scale)))))
            shape1 = (-1,) + (1,) * (arrays[w1].ndim - 1)
            arrays[w1] = arrays[w1] / scale.reshape(shape1)
            if b1:
                arrays[b1] = arrays[b1] / scale
            if depthwise2:
                arrays[w2] = w2a * scale.reshape((-1,) + (1,) * (w2a.ndim - 1))
            else:
                arrays[w2] = w2a * scale.reshape((1, -1) + (1,) * (w2a.ndim - 2))
        if change < _TOLERANCE:
            break
    for name, array in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    return EqualizeResult(len(pairs), skipped, iterations if pairs else 0, before,
                          _spread([arrays[n] for n in names]))


def _pairs(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> tuple[list[tuple[bool, str, str, str]], int]:
    """(second conv is depthwise, W1, B1 or '', W2) for each equalizable pair; and the pairs skipped for a Clip."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    convs = [n for n in graph.node if n.op_type == "Conv" and _plain_conv(n, inits)]
    conv_set = {id(n) for n in convs}
    found: list[tuple[bool, str, str, str]] = []
    skipped = 0
    for conv1 in convs:
        tensor = conv1.output[0]
        chain = _single(consumers, tensor, outputs)
        clip = False
        if chain is not None and chain.op_type in _EQUIVARIANT:
            tensor = chain.output[0]
            chain = _single(consumers, tensor, outputs)
        elif chain is not None and chain.op_type == "Clip":
            clip = True
            nxt = _single(consumers, chain.output[0], outputs)
            chain = nxt
        if chain is None or id(chain) not in conv_set:
            continue
        w1, w2 = inits[conv1.input[1]], inits[chain.input[1]]
        groups1, groups2 = _groups(conv1), _groups(chain)
        if groups1 not in (1, w1.dims[0]) or (groups2 != 1 and not (groups2 == w2.dims[0] and w2.dims[1] == 1)):
            continue
        if clip:
            skipped += 1
            continue
        # A weight read by two nodes cannot be rescaled for one of them (a conv in two pairs is fine: the scales
        # act on different axes and compose).
        bias = conv1.input[2] if len(conv1.input) > 2 and conv1.input[2] else ""
        if _shared(consumers, {conv1.input[1], chain.input[1]} | ({bias} if bias else set())):
            continue
        found.append((groups2 != 1, conv1.input[1], bias, chain.input[1]))
    return found, skipped


def _plain_conv(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    return (len(node.input) >= 2 and node.input[1] in inits and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT
            and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits))


def _groups(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _single(consumers: dict[str, list[onnx.NodeProto]], tensor: str, outputs: set[str]) -> onnx.NodeProto | None:
    users = consumers.get(tensor, [])
    return users[0] if len(users) == 1 and tensor not in outputs else None


def _shared(consumers: dict[str, list[onnx.NodeProto]], names: set[str]) -> bool:
    return any(len(consumers.get(name, [])) != 1 for name in names)


def _spread(weights: list[np.ndarray]) -> float:
    """Mean over output channels' max|w| ratio max/min per conv: how unequal the channels' ranges are."""
    ratios = []
    for w in weights:
        r = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        r = r[r > 0]
        if r.size:
            ratios.append(float(r.max() / r.min()))
    return float(np.mean(ratios)) if ratios else 1.0


__all__ = ["EqualizeResult", "equalize"]
