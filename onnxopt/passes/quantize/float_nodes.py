"""A QDQ model with some of its quantized nodes back in float, derived from the whole-model QDQ graph.

The placement search and the accuracy-budget search try models that leave a few nodes in float. Each used to be a
fresh run of ORT's quantizer, 0.1-0.2 s on the benchmark nets (its graph edits search the node and initializer lists
linearly) and most of the search's time. Such a model differs from the whole-model QDQ graph only locally:

* a node in float reads its float weight, bias and other initializers again (those of the model ORT quantized);
* a Quantize/Dequantize pair on an activation stays where an int8 node still uses it (the pair's producer or one of
  its consumers), as ORT's quantizer would place it for the smaller node set, and goes away elsewhere; ops that ORT
  quantizes only behind a quantized input (Reshape, MaxPool, ...) follow their input;
* a Relu/Clip that ORT folded into a Quantize (its saturation clips instead) comes back behind a node now float, as
  ORT keeps it there;
* what nothing reads any more (DequantizeLinear of a weight, its int8 initializer, scale and zero point) goes away.

The result has ORT's op-type counts and bit-identical outputs (tests/test_quantize_fast_paths.py on the example,
tests/test_fuzz.py on random conv nets, benchmarks/derived_candidates.py on the benchmark nets).

:func:`keep_float` makes that edit directly, in milliseconds. Where it cannot match nodes safely (a node without a
name, or a name used twice) it returns None and the caller runs ORT's quantizer as before.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx

_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Ops ORT's QDQ quantizer quantizes only when their (first) input is quantized by a neighbour already
#: (QDQDirect8BitOp and its kin in onnxruntime.quantization.registry): their output shares the input's scale.
FOLLOW_INPUT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "AveragePool",
                          "Slice", "TopK", "Resize", "Split", "Gather", "GatherElements"})


def keep_float(qdq: onnx.ModelProto, source: onnx.ModelProto, int8_nodes: Collection[str],
               float_nodes: Collection[str]) -> onnx.ModelProto | None:
    """``qdq`` (ORT's QDQ rewrite of ``source``) with the nodes ``float_nodes`` back in float.

    ``int8_nodes`` names the nodes ORT is to quantize (the op types asked for, less every excluded node); only
    what the float nodes change is edited: a pair or a Reshape-like op that ORT placed for reasons of its own
    elsewhere stays as it is. Returns a new model (``qdq`` is not touched), or None when the nodes cannot be
    matched by name.
    """
    floating = set(float_nodes)
    # Only nodes ORT did quantize count: a Flatten after a float GlobalAveragePool is in the op types but was not.
    int8 = (set(int8_nodes) - floating) & quantized_nodes(qdq)
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    source_nodes = _unique_by_name(source.graph.node)
    if source_nodes is None:
        return None
    source_inits = {init.name: init for init in source.graph.initializer}
    source_producer = {out: node for node in source.graph.node for out in node.output}
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def dequantized_initializer(name: str) -> bool:
        node = producer.get(name)
        return node is not None and node.op_type == "DequantizeLinear" and node.input[0] in inits

    # 1. Float nodes read their float initializers again.
    restored: dict[str, onnx.TensorProto] = {}
    for node in graph.node:
        if node.op_type in _QDQ or node.name not in floating:
            continue
        for k, name in enumerate(node.input):
            if not dequantized_initializer(name):
                continue
            original = source_nodes.get(node.name) if node.name else None
            if original is None or original.op_type != node.op_type or k >= len(original.input):
                return None
            float_name = original.input[k]
            if float_name not in source_inits:
                return None
            node.input[k] = float_name
            if float_name not in inits:
                restored[float_name] = source_inits[float_name]
    graph.initializer.extend(restored.values())
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed: set[int] = set()
    for name in restored:
        # ORT names a bias's DequantizeLinear output after the float bias: that node must go, unless an int8 node
        # shares the bias (then both cannot be had: let ORT build the candidate).
        dq = producer.get(name)
        if dq is not None:
            if any(user.name in int8 for user in consumers.get(name, [])):
                return None
            removed.add(id(dq))

    # 2. Activation pairs that no int8 node uses any more.
    graph_outputs = {out.name for out in graph.output}
    inits.update(restored)
    _drop_followers(graph.node, int8, floating, producer, consumers, inits)
    unfolded: dict[int, onnx.NodeProto] = {}  # id(node) -> the Relu/Clip put back after it
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or q.output[0] in graph_outputs:
            continue
        made_by = producer.get(q.input[0])
        users = [u for d in dqs for u in consumers.get(d.output[0], [])]
        if not (made_by is not None and made_by.name in floating) and not any(u.name in floating for u in users):
            continue  # no node next to this pair changed: it stays as ORT placed it
        folded = source_producer.get(q.input[0])
        if folded is not None and made_by is not None and made_by.name in floating and not _same_node(made_by, folded):
            # ORT folded a Relu/Clip into this pair (the Q saturates in its place) behind a node now float: put the
            # op back, as ORT keeps it there; where that cannot be done, the pair stays and does the clipping.
            activation = _unfold(folded, made_by, q.input[0], source_producer, source_inits, inits, producer)
            if activation is None:
                continue
            unfolded[id(made_by)] = activation
            for init_name in activation.input[1:]:
                if init_name and init_name not in inits:
                    inits[init_name] = source_inits[init_name]
                    graph.initializer.append(source_inits[init_name])
            made_by = activation
        if (made_by is not None and made_by.name in int8) or any(u.name in int8 for u in users):
            continue
        if any(d.output[0] in graph_outputs for d in dqs):
            # A model output behind the pair (ORT renames the float tensor): the producer writes it again itself.
            if len(dqs) != 1 or made_by is None or consumers.get(q.input[0]) != [q] or made_by.op_type in _QDQ:
                continue
            if not _same_node(made_by, source_producer.get(dqs[0].output[0])):
                continue
            made_by.output[list(made_by.output).index(q.input[0])] = dqs[0].output[0]
            removed.update({id(q), id(dqs[0])})
            continue
        for d in dqs:
            for user in consumers.get(d.output[0], []):
                for k, name in enumerate(user.input):
                    if name == d.output[0]:
                        user.input[k] = q.input[0]
            removed.add(id(d))
        removed.add(id(q))

    # 3. Whatever nothing reads any more.
    _rebuild(graph, [node for node in graph.node if id(node) not in removed], unfolded, graph_outputs)
    return model


def quantized_nodes(qdq: onnx.ModelProto) -> set[str]:
    """Names of the nodes ORT quantized in a QDQ model: those reading a DequantizeLinear output."""
    dequantized = {out for node in qdq.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return {node.name for node in qdq.graph.node
            if node.op_type not in _QDQ and node.name and any(name in dequantized for name in node.input)}


def _rebuild(graph: onnx.GraphProto, kept: list[onnx.NodeProto], unfolded: dict[int, onnx.NodeProto],
             graph_outputs: set[str]) -> None:
    """``graph`` with the nodes ``kept`` (each followed by its put-back activation, if any), less the Q/DQ nodes,
    initializers and value_info nothing reads any more."""
    while True:
        read = {name for node in [*kept, *unfolded.values()] for name in node.input} | graph_outputs
        dead = {id(node) for node in kept if node.op_type in _QDQ and not any(out in read for out in node.output)}
        if not dead:
            break
        kept = [node for node in kept if id(node) not in dead]
    nodes = []
    for node in kept:
        nodes.append(_copy(node))
        if id(node) in unfolded:
            nodes.append(unfolded[id(node)])
    del graph.node[:]
    graph.node.extend(nodes)
    live_inits = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(live_inits)
    produced = {out for node in graph.node for out in node.output}
    live_info = [info for info in graph.value_info if info.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(live_info)


def _unique_by_name(nodes: Collection[onnx.NodeProto]) -> dict[str, onnx.NodeProto] | None:
    by_name: dict[str, onnx.NodeProto] = {}
    for node in nodes:
        if node.name:
            if node.name in by_name:
                return None
            by_name[node.name] = node
    return by_name


def _drop_followers(nodes: Collection[onnx.NodeProto], int8: set[str], floating: set[str],
                    producer: dict[str, onnx.NodeProto], consumers: dict[str, list[onnx.NodeProto]],
                    inits: dict[str, onnx.TensorProto]) -> None:
    """Move from ``int8`` to ``floating`` the nodes ORT quantizes only when their input is quantized anyway
    (Reshape, MaxPool, ...: :data:`FOLLOW_INPUT`) whose input pair a node now float supported and no int8 node
    needs any more; repeated, since one such node going float can free the next."""
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if node.name not in int8 or node.op_type not in FOLLOW_INPUT or not node.input:
                continue
            dq = producer.get(node.input[0])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
                continue  # not a quantized activation (a quantized initializer keeps the node int8)
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            made_by = producer.get(q.input[0])
            others = [u for d in consumers.get(q.output[0], []) for u in consumers.get(d.output[0], [])
                      if u is not node]
            neighbours = ([made_by] if made_by is not None else []) + others
            if any(n.name in floating for n in neighbours) and not any(n.name in int8 for n in neighbours):
                int8.discard(node.name)
                floating.add(node.name)
                changed = True


def _unfold(folded: onnx.NodeProto | None, made_by: onnx.NodeProto | None, tensor: str,
            source_producer: dict[str, onnx.NodeProto], source_inits: dict[str, onnx.TensorProto],
            inits: dict[str, onnx.TensorProto], producer: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """Put back the Relu/Clip ``folded`` that ORT removed between ``made_by`` and ``tensor``: ``made_by`` writes the
    activation's input again and a copy of the activation writes ``tensor``. None when the graph is not that shape."""
    if folded is None or made_by is None or folded.op_type not in ("Relu", "Clip") or not folded.input:
        return None
    before = source_producer.get(folded.input[0])
    if not _same_node(before, made_by) or folded.input[0] in producer or folded.input[0] in inits:
        return None
    if any(name and name not in source_inits for name in folded.input[1:]):
        return None
    made_by.output[list(made_by.output).index(tensor)] = folded.input[0]
    producer[folded.input[0]] = made_by
    activation = _copy(folded)
    producer[tensor] = activation
    return activation


def _same_node(a: onnx.NodeProto | None, b: onnx.NodeProto | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.name == b.name and a.op_type == b.op_type


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


__all__ = ["keep_float", "quantized_nodes"]
