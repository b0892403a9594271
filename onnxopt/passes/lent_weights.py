"""Weights lent to onnxsim as graph inputs, so that it works on the graph and not on the weights' bytes.

onnxsim serializes the model about ten times and, for its numeric check, creates two ORT sessions of it: on the
268 MB MLP of ``benchmarks/large_model.py`` that was 4.4 s of the normalize pass's 5.0 s (an ad-hoc profile;
``benchmarks/lent_weights.py`` measures the whole command both ways). A weight whose every consumer also reads a
value computed from the graph inputs can never be constant-folded, so its bytes give onnxsim nothing to work with:
it gets such a weight as a graph input of the same type and shape (and, for its check, the weight's real values as
that input's data), and the weight goes back into the graph as an initializer afterwards.
Weights of a node onnxsim could fold (every input constant), weights read inside subgraphs, and small ones (biases,
shapes, scales, which some of onnxsim's fusions need as constants) stay initializers.

The result is not always the same: some of onnxsim's fusions rewrite a weight (a Mul by a constant folded into the
Conv before it, MatMul + Add into Gemm), and a lent weight is not a constant to them. Over the reliability corpus
(``benchmarks/lent_weights.py``) lending changed the op types of the two PaddleOCR v4 models (9-10 Mul and 7 Gemm
fusions fewer; ONNX Runtime makes these fusions itself when it loads a model) and no other model's result. So the
normalize pass lends only on models with at least ``LEND_FROM_BYTES`` of weights, where onnxsim's copies cost
more than the fusions are worth (ONNX Runtime makes those at load): on the 67 MB MLP lending took 3.4 s instead of
4.0 s and 476 MB instead of 715 MB (``reports/lent_weights.md``); the threshold was 256 MB until that was measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxopt.passes import shapes

#: Weights below this size stay initializers: small enough not to matter, and a fusion may need their values (a
#: Conv bias folded by ``fuse_add_bias_into_conv`` has at most a few thousand channels, well under 64 KiB).
MIN_LENT_BYTES = 64 * 1024
#: The normalize pass lends weights only on models with at least this much weight data.
LEND_FROM_BYTES = 32 * 2**20


def lendable(graph: ir.Graph, min_bytes: int = MIN_LENT_BYTES) -> list[ir.Value]:
    """The initializers of ``graph`` of at least ``min_bytes`` that no constant folding can touch: every consumer
    is a node of ``graph`` itself that also reads a value computed from the graph inputs."""
    dynamic = {id(value) for value in graph.inputs if not value.is_initializer()}
    changed = True
    while changed:  # a fixpoint, so that nodes stored out of topological order are handled too
        changed = False
        for node in graph:
            if any(v is not None and id(v) in dynamic for v in node.inputs):
                for out in node.outputs:
                    if id(out) not in dynamic:
                        dynamic.add(id(out))
                        changed = True
    in_subgraphs = {v.name for sub in graph.subgraphs() for node in sub for v in node.inputs if v is not None}
    lent = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if (tensor is None or value.is_graph_input() or value.is_graph_output() or value.name in in_subgraphs
                or tensor.nbytes < min_bytes):
            continue
        users = [node for node, _ in value.uses()]
        if users and all(node.graph is graph and any(v is not None and id(v) in dynamic for v in node.inputs)
                         for node in users):
            lent.append(value)
    return lent


@contextlib.contextmanager
def lent_as_inputs(graph: ir.Graph, values: list[ir.Value]) -> Iterator[dict[str, ir.TensorProtocol]]:
    """Within the block, ``values`` are graph inputs of ``graph`` instead of initializers (serializing the model then
    writes none of their bytes); yields their tensors by name. They are initializers again afterwards, whatever
    happened in the block. A long 1-D weight is an input of symbolic length (:func:`shapes.hidden_length`), as
    :func:`shapes.long_vectors_hidden` shows it to shape inference: ONNX's data propagation through Gather expands a
    1-D input of known length into one dim per element (onnxsim on a 2 GiB one passed 16 GB of memory)."""
    tensors: dict[str, ir.TensorProtocol] = {}
    for value in values:
        assert value.name is not None and value.const_value is not None
        tensors[value.name] = value.const_value
        graph.initializers.pop(value.name)
        value.const_value = None
        value.shape = shapes.hidden_length(value.name, tensors[value.name]) or ir.Shape(tensors[value.name].shape)
        graph.inputs.append(value)
    try:
        yield tensors
    finally:
        for value in values:
            if value in graph.inputs:
                graph.inputs.remove(value)
            if value.name not in graph.initializers:
                value.const_value = tensors[value.name]  # type: ignore[index]
                value.shape = ir.Shape(tensors[value.name].shape)  # type: ignore[index]
                graph.register_initializer(value)


def take_back(graph: ir.Graph, tensors: dict[str, ir.TensorProtocol], order: list[str]) -> None:
    """Make the graph inputs of a simplified ``graph`` that carry a lent weight's name initializers again, holding the
    weight's own tensor (not copied), in the initializer order ``order`` (the names before lending; others after
    them), so that the model is written as it would have been without lending; a lent weight that onnxsim left
    unused is dropped. Nothing lent: nothing to do."""
    if not tensors:
        return
    by_name = {value.name: value for value in graph.inputs}
    for name, tensor in tensors.items():
        value = by_name.get(name)
        if value is None:
            continue
        graph.inputs.remove(value)
        if value.uses() or value.is_graph_output():
            value.const_value = tensor
            value.shape = ir.Shape(tensor.shape)
            graph.register_initializer(value)
    rank = {name: index for index, name in enumerate(order)}
    values = sorted(graph.initializers.values(), key=lambda v: rank.get(v.name or "", len(rank)))  # a stable sort
    for value in values:
        graph.initializers.pop(value.name)
    for value in values:
        graph.register_initializer(value)


def check_feeds(tensors: dict[str, ir.TensorProtocol], data_shapes: dict[str, tuple[np.dtype, list[int]]],
                seed: int = 0) -> dict[str, np.ndarray]:
    """Data for onnxsim's numeric check of a model with lent weights (it then needs every input's data): the data
    inputs uniform in [0, 1) as onnxsim draws them itself, seeded, and each lent weight's own values."""
    rng = np.random.default_rng(seed)
    feeds = {name: rng.random(shape).astype(dtype) for name, (dtype, shape) in data_shapes.items()}
    feeds.update({name: tensor.numpy() for name, tensor in tensors.items()})
    return feeds


__all__ = ["LEND_FROM_BYTES", "MIN_LENT_BYTES", "check_feeds", "lendable", "lent_as_inputs", "take_back"]
