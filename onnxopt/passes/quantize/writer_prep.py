"""Rewrites of the float graph, exact in float, that ONNX Runtime's int8 writers need to write a correct model.

ORT's ``quantize_static`` writes a wrong model, or stops with an error from deep inside it, on graph patterns that
exporters do produce (measured in ``benchmarks/writer_prep.py``; both writers unless said):

* **Gemm with alpha or beta != 1**: C is quantized as if beta were 1 (output SQNR 6 dB in QDQ, 3 dB in QOperator on
  a one-Gemm net) and QOperator's QGemm drops alpha (13 dB). The scalars are folded into the constant B (or A) and C.
* **Gemm whose bias C is not a vector [N]** (``[1, N]``, a scalar, a bias already broadcast to ``[M, N]``): with
  per-channel weights ORT's bias quantization fails (``The truth value of an array...``, ``index 1 is out of
  bounds``). C becomes ``[N]`` where it is constant along M, else it moves to an Add after the Gemm.
* **An initializer read by several nodes** is quantized once, for its first reader, and reused for the others
  (``quantized_value_map``): a bias shared by two Convs gets the first one's scale (input scale x weight scale),
  3 dB in QOperator; a weight tied between a Gemm (transB: channel axis 0) and a MatMul (axis 1) is wrong per channel
  (ORT: 8 dB) or fails (``index 8 is out of bounds``); a weight also read by an Add gives a QOperator model ORT
  cannot load (QLinearAdd with int8 and uint8 inputs). Each reader whose use differs gets its own copy.

:func:`prepare_for_writers` makes those rewrites on a copy (never the user's model) and says what it did. The
per-channel cases that no rewrite fixes (a grouped ConvTranspose in QDQ, a MatMul weight of rank 3+ in QOperator)
are handled where the writer is called (``QuantizePass._rewrite``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.modelio import all_nodes

#: Ops whose input 2 is a bias that ORT quantizes to int32 with the scale of the node's input times its weight's.
BIAS_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


@dataclass
class WriterPrep:
    """The graph to hand ORT's writers (``model``: the one given when nothing needed changing, else a copy), what
    was changed (one note per kind), and the nodes that must stay float with the reason for each."""

    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)


def prepare_for_writers(model: onnx.ModelProto, op_types: Collection[str],
                        exclude: Collection[str] = ()) -> WriterPrep:
    """Fold Gemm's alpha/beta, give Gemm a vector bias and each differing reader of a shared initializer its own
    copy, for the nodes of ``op_types`` not in ``exclude`` (the only ones ORT will rewrite)."""
    wanted = {node.name for node in model.graph.node if node.op_type in op_types and node.name not in exclude}
    if not _needs_work(model, wanted):
        return WriterPrep(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    editor = _Editor(work)
    prep = WriterPrep(work)
    folded, split, reshaped = [], [], []
    for node in list(work.graph.node):
        if node.op_type != "Gemm" or node.name not in wanted:
            continue
        reason = editor.fold_gemm_scalars(node)
        if reason:
            prep.excluded[node.name] = reason
            continue
        if reason is not None:
            folded.append(node.name)
        shape_fix = editor.vector_bias(node)
        if shape_fix == "split":
            split.append(node.name)
        elif shape_fix == "reshaped":
            reshaped.append(node.name)
    if split:  # the new Adds are quantized too where Add is
        wanted |= {node.name for node in work.graph.node if node.op_type in op_types and node.name not in exclude}
    copies = editor.unshare(wanted - set(prep.excluded))
    if folded:
        prep.notes.append(f"Gemm alpha/beta folded into its constant operands ({_names(folded)}): ORT's int8 "
                          "writers quantize C as if beta were 1 and QGemm drops alpha")
    if reshaped or split:
        parts = ([f"reshaped to [N] ({_names(reshaped)})"] if reshaped else []) + (
            [f"moved to an Add after the Gemm ({_names(split)})"] if split else [])
        prep.notes.append(f"Gemm bias that was not a vector {' and '.join(parts)}: ORT's per-channel bias "
                          "quantization takes a vector")
    if copies:
        prep.notes.append(f"{len(copies)} shared initializer(s) copied for readers that use them differently "
                          f"({_names(copies)}): ORT quantizes a shared initializer once, for its first reader")
    return prep


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _role(node: onnx.NodeProto, slot: int) -> tuple[object, ...]:
    """How ORT's writers use an initializer read by ``node`` at input ``slot``: readers with the same role can share
    one quantized tensor, readers with different ones cannot (a bias is scaled for its own node alone)."""
    if node.op_type in BIAS_OPS and slot == 2:
        return ("bias", node.name)
    if node.op_type in ("Conv", "ConvTranspose") and slot == 1:
        return (node.op_type, "weight", int(_attr(node, "group", 1)))
    if node.op_type == "Gemm" and slot in (0, 1):
        return ("Gemm", slot, int(_attr(node, "transA" if slot == 0 else "transB", 0)))
    if node.op_type == "MatMul":
        return ("MatMul", slot)
    return ("activation",)


def _needs_work(model: onnx.ModelProto, wanted: set[str]) -> bool:
    """A cheap scan: is there anything :func:`prepare_for_writers` would change (before it copies the model)?"""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    roles: dict[str, set[tuple[object, ...]]] = defaultdict(set)
    readers: dict[str, int] = defaultdict(int)
    for node in all_nodes(graph):
        for slot, name in enumerate(node.input):
            if name in inits:
                readers[name] += 1
                if node.name in wanted:
                    roles[name].add(_role(node, slot))
        if node.op_type == "Gemm" and node.name in wanted:
            if _attr(node, "alpha", 1.0) != 1.0 or (_attr(node, "beta", 1.0) != 1.0 and len(node.input) > 2):
                return True
            dims = list(inits[node.input[2]].dims) if len(node.input) > 2 and node.input[2] in inits else [2]
            if len(dims) != 1 or dims[0] == 1:
                return True  # not [N]: a scalar, [1], [1, N] or [M, N] (an [N] of N = 1 is left as it is)
    outputs = {out.name for out in graph.output}
    for name, kinds in roles.items():
        biases = [kind for kind in kinds if kind[0] == "bias"]
        if len(kinds) > 1 or (biases and (readers[name] > 1 or name in outputs)):
            return True
    return False


class _Editor:
    """In-place edits of one model's top-level graph, with fresh names for what it adds."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {init.name: init for init in self.graph.initializer}
        self.taken = set(self.inits) | {name for node in all_nodes(self.graph)
                                        for name in [*node.input, *node.output]}
        self.taken |= {vi.name for vi in [*self.graph.input, *self.graph.output, *self.graph.value_info]}

    def fresh(self, stem: str) -> str:
        name, k = stem, 1
        while name in self.taken:
            k += 1
            name = f"{stem}_{k}"
        self.taken.add(name)
        return name

    def readers(self, name: str) -> int:
        return sum(1 for node in all_nodes(self.graph) for inp in node.input if inp == name) + sum(
            1 for out in self.graph.output if out.name == name)

    def private(self, node: onnx.NodeProto, slot: int, values: np.ndarray) -> None:
        """``node`` reads ``values`` at ``slot``: rewritten in place when it is the initializer's one reader, else
        as a new initializer of its own."""
        name = node.input[slot]
        if self.readers(name) == 1:
            self.inits[name].CopyFrom(numpy_helper.from_array(values, name))
            return
        new = self.fresh(f"{name}_{node.name}")
        tensor = numpy_helper.from_array(values, new)
        self.graph.initializer.append(tensor)
        self.inits[new] = self.graph.initializer[-1]
        node.input[slot] = new

    def array(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        if init is None or init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            return None
        return numpy_helper.to_array(init)

    def fold_gemm_scalars(self, node: onnx.NodeProto) -> str | None:
        """alpha into the constant B (or A) and beta into the constant C; the reason the Gemm must stay float when
        they have no constant to go into, '' when folded, None when both were 1 already."""
        alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        has_c = len(node.input) > 2 and bool(node.input[2])
        if alpha == 1.0 and (beta == 1.0 or not has_c):
            return None
        if alpha != 1.0:
            slots = [slot for slot in (1, 0) if self.array(node.input[slot]) is not None]
            if not slots:
                return f"Gemm alpha={alpha:g} with no constant operand to fold it into (ORT's QGemm drops alpha)"
        if beta != 1.0 and has_c and self.array(node.input[2]) is None:
            return f"Gemm beta={beta:g} with a computed C (ORT's writers quantize C as if beta were 1)"
        if alpha != 1.0:
            slot = slots[0]
            values = self.array(node.input[slot])
            self.private(node, slot, (values * alpha).astype(values.dtype))
        if beta != 1.0 and has_c:
            values = self.array(node.input[2])
            self.private(node, 2, (values * beta).astype(values.dtype))
        kept = [attr for attr in node.attribute if attr.name not in ("alpha", "beta")]
        del node.attribute[:]
        node.attribute.extend(kept)
        return ""

    def vector_bias(self, node: onnx.NodeProto) -> str | None:
        """Gemm's constant C as a vector [N] ('reshaped'), or moved to an Add behind the Gemm when it varies along
        M ('split'); None when it already is one, or is computed, or N is unknown."""
        if len(node.input) < 3 or not node.input[2]:
            return None
        bias = self.array(node.input[2])
        columns = self._columns(node) if bias is not None else None
        if columns is None or bias.shape == (columns,):
            return None
        if bias.ndim > 2 or (bias.ndim and bias.shape[-1] not in (1, columns)):
            return None  # not a shape Gemm's broadcasting allows: left to ORT as it is
        if bias.ndim < 2 or bias.shape[0] == 1:  # constant along M: the same bias for every row
            row = np.broadcast_to(bias.reshape(-1) if bias.ndim else bias, (columns,))
            self.private(node, 2, np.ascontiguousarray(row, dtype=bias.dtype))
            return "reshaped"
        product = self.fresh(f"{node.output[0]}_without_bias")
        add = helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=self.fresh(f"{node.name}_bias"))
        self._type_like(node.output[0], product)
        node.output[0] = product
        del node.input[2]
        position = next(i for i, other in enumerate(self.graph.node) if other is node)
        self.graph.node.insert(position + 1, add)
        return "split"

    def _columns(self, node: onnx.NodeProto) -> int | None:
        """N, the Gemm's output columns: from the constant B, else the inferred output shape."""
        weight = self.inits.get(node.input[1])
        if weight is not None and len(weight.dims) == 2:
            return int(weight.dims[0] if _attr(node, "transB", 0) else weight.dims[1])
        for vi in [*self.graph.value_info, *self.graph.output]:
            if vi.name == node.output[0]:
                dims = vi.type.tensor_type.shape.dim
                if len(dims) == 2 and dims[1].HasField("dim_value"):
                    return int(dims[1].dim_value)
        return None

    def _type_like(self, source: str, name: str) -> None:
        """value_info for ``name`` with the type of ``source`` (calibration finds float tensors by their type)."""
        for vi in [*self.graph.value_info, *self.graph.output]:
            if vi.name == source:
                copy = onnx.ValueInfoProto()
                copy.CopyFrom(vi)
                copy.name = name
                self.graph.value_info.append(copy)
                return

    def unshare(self, wanted: Iterable[str]) -> list[str]:
        """Copies of the initializers whose readers among ``wanted`` use them in different ways (a bias always has
        its own); the initializers copied."""
        wanted = set(wanted)
        outputs = {out.name for out in self.graph.output}
        uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in all_nodes(self.graph):  # a subgraph's reader is one ORT leaves alone: it keeps the original
            for slot, name in enumerate(node.input):
                if name in self.inits:
                    uses[name].append((node, slot))
        copied: list[str] = []
        for name, readers in uses.items():
            groups: dict[tuple[object, ...], list[tuple[onnx.NodeProto, int]]] = {}
            for node, slot in readers:
                if node.name in wanted:
                    groups.setdefault(_role(node, slot), []).append((node, slot))
            # The most-read weight use keeps the original; a bias keeps it only where nothing else reads it.
            uses_as_weight = [key for key in groups if key[0] != "bias"]
            if uses_as_weight:
                keep = max(uses_as_weight, key=lambda key: len(groups[key]))
            elif all(node.name in wanted for node, _ in readers) and name not in outputs:
                keep = next(iter(groups))
            else:
                keep = None
            if all(key == keep for key in groups):
                continue
            for key, group in groups.items():
                if key == keep:
                    continue
                new = self.fresh(f"{name}_{group[0][0].name}")
                copy = self.graph.initializer.add()
                copy.CopyFrom(self.inits[name])
                copy.name = new
                self.inits[new] = copy
                for node, slot in group:
                    node.input[slot] = new
            copied.append(name)
        return copied


def per_channel_breaks(model: onnx.ModelProto, op_types: Collection[str], exclude: Collection[str],
                       fmt: str) -> list[tuple[str, str]]:
    """Where ORT's per-channel weights fail and no rewrite helps, as (node, weight initializer) pairs: in QDQ a
    grouped ConvTranspose, whose bias ORT scales with C_out/group weight scales ("operands could not be broadcast"):
    its weight must be per tensor; in QOperator a MatMul weight of rank 3+, whose per-channel zero points ORT's
    QLinearMatMul kernel refuses at run time: the node must stay float."""
    inits = {init.name: init for init in model.graph.initializer}
    found: list[tuple[str, str]] = []
    for node in model.graph.node:
        if node.op_type not in op_types or node.name in exclude or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None:
            continue
        grouped_transpose = (node.op_type == "ConvTranspose" and int(_attr(node, "group", 1)) > 1
                             and len(weight.dims) > 1 and weight.dims[1] > 1)
        if (fmt == "qdq" and grouped_transpose) or (fmt == "qoperator" and node.op_type == "MatMul"
                                                    and len(weight.dims) > 2):
            found.append((node.name, weight.name))
    return found


__all__ = ["BIAS_OPS", "WriterPrep", "per_channel_breaks", "prepare_for_writers"]
