"""OnnxModule: a small interpreter that runs an ONNX graph with torch ops, weights as named nn.Parameters.

Construction does all bookkeeping once: it classifies every build-time value (initializer or Constant node output)
as a trainable parameter, a BatchNormalization running statistic, or a constant buffer; folds the shape arithmetic
whose inputs are all constants; and compiles the remaining nodes into a flat list of steps ``(callable, input slots,
output slots, slots to free)``. ``forward`` is then a single loop over that list.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from onnxopt.bridge import ops
from onnxopt.bridge.ops import NodeSpec, UnsupportedOpError
from onnxopt.errors import BadInputError

_NONE, _DISCARD = 0, 1  # slot 0 always holds None (omitted inputs); slot 1 receives unnamed outputs


@dataclass
class Source:
    """Where a build-time value lives in the ONNX model, so that write-back can put it back."""

    kind: str  # "initializer", "constant" (a Constant node's 'value') or "identity" (Identity of one of those)
    role: str  # "parameter", "stat" (BN running mean/var), "qweight" (integer weight behind DequantizeLinear)
    array: np.ndarray  # the original value
    quant: tuple[np.ndarray, np.ndarray | None, int] | None = None  # (scale, zero point, axis) of a qweight


def as_proto(model: Any) -> onnx.ModelProto:
    """An onnx.ModelProto from a ModelProto, an onnx_ir.Model or a path."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        try:
            return onnx.load(os.fspath(model))  # external data loaded from beside the file
        except Exception as exc:  # noqa: BLE001 - protobuf and file errors alike
            raise BadInputError(f"torch bridge: cannot load ONNX model '{model}': {exc}") from None
    try:
        import onnx_ir as ir
    except ImportError:  # pragma: no cover - onnx_ir is a core dependency
        ir = None
    if ir is not None and isinstance(model, ir.Model):
        from onnxopt.modelio import to_proto

        return to_proto(model)
    raise BadInputError(f"torch bridge: expected an onnx.ModelProto, onnx_ir.Model or path, got {type(model).__name__}")


@dataclass
class _Build:
    """State used while a module is constructed (dropped afterwards)."""

    known: dict[str, np.ndarray] = field(default_factory=dict)  # build-time values by ONNX name
    kinds: dict[str, str] = field(default_factory=dict)  # Source.kind, or "literal" (Constant value_float...)
    roles: dict[str, str] = field(default_factory=dict)  # parameter / stat / qweight / constant
    uses: dict[str, list[tuple[str, int, onnx.NodeProto]]] = field(default_factory=lambda: defaultdict(list))
    qweights: dict[str, tuple[np.ndarray, np.ndarray | None, int]] = field(default_factory=dict)
    absorbed: set[int] = field(default_factory=set)  # Identity nodes turned into values of their own
    base_fill: list[tuple[int, str, str]] = field(default_factory=list)  # (slot, store, key)
    taken: set[str] = field(default_factory=set)  # storage keys in use


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _topo_sort(nodes: Sequence[onnx.NodeProto], available: set[str]) -> list[int]:
    """Node indices in an order where every input is produced before use (ONNX graphs usually are sorted)."""
    produced_by: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                produced_by[out] = i
    order: list[int] = []
    state = [0] * len(nodes)  # 0 new, 1 visiting, 2 done
    for root in range(len(nodes)):
        if state[root]:
            continue
        stack = [(root, iter(nodes[root].input))]
        state[root] = 1
        while stack:
            index, inputs = stack[-1]
            pushed = False
            for name in inputs:
                dep = produced_by.get(name)
                if name and name not in available and dep is not None and state[dep] == 0:
                    state[dep] = 1
                    stack.append((dep, iter(nodes[dep].input)))
                    pushed = True
                    break
                if dep is not None and state[dep] == 1 and name not in available:
                    raise BadInputError(f"torch bridge: the graph has a cycle through value '{name}'")
            if not pushed:
                stack.pop()
                state[index] = 2
                order.append(index)
    return order


def _sanitize(name: str, taken: set[str]) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name) or "v"
    if key[0].isdigit():
        key = "v" + key
    base, n = key, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    taken.add(key)
    return key


def _tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype == object or array.dtype.kind in "SU":
        raise BadInputError("torch bridge: string tensors are not supported")
    return torch.from_numpy(np.array(array, copy=True))


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module: forward(*graph inputs) -> output tensor (or a tuple of them)."""

    def __init__(self, model: onnx.ModelProto, *, train_quantized_weights: bool = False,
                 train_quant_scales: bool = False):
        super().__init__()
        graph = model.graph
        self.opset = _opset(model)
        self.stochastic_rounding = False  # QuantizeLinear/fake-quant weights round stochastically in train mode
        self.params = nn.ParameterDict()
        self.stats = nn.Module()  # BatchNormalization running statistics (persistent buffers)
        self.consts = nn.Module()  # everything else known at build time (non-persistent buffers)
        self._param_keys: dict[str, str] = {}
        self._stat_keys: dict[str, str] = {}
        self._const_keys: dict[str, str] = {}
        self._sources: dict[str, Source] = {}
        self._untied: dict[str, str] = {}
        self._base: list[Any] | None = None
        self._slots: dict[str, int] = {}
        self._slot_names: list[str] = ["<none>", "<discard>"]
        self.value_origin: list[tuple[str, str, str]] = []
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise UnsupportedOpError(f"{node.domain}::{node.op_type}", node.name or node.op_type,
                                         "only the default ONNX domain is supported")
        build = _Build()
        nodes = self._collect(graph, build)
        self._assign_roles(nodes, build, train_quantized_weights, train_quant_scales)
        self._store(build)
        self._compile(graph, nodes, build)

    # ------------------------------------------------------------------------------------------- construction

    def _collect(self, graph: onnx.GraphProto, build: _Build) -> list[tuple[int, onnx.NodeProto]]:
        """Build-time values (initializers, Constant nodes, Identity copies of them) and the nodes in run order."""
        for init in graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL and not init.raw_data:
                raise BadInputError(f"torch bridge: initializer '{init.name}' has unloaded external data")
            build.known[init.name] = numpy_helper.to_array(init)
            build.kinds[init.name] = "initializer"
        init_names = set(build.known)
        self.input_names = [i.name for i in graph.input if i.name not in init_names]
        self.output_names = [o.name for o in graph.output]
        order = _topo_sort(list(graph.node), set(self.input_names) | init_names)
        nodes = [(i, graph.node[i]) for i in order]
        for i, node in nodes:
            if node.op_type == "Constant":
                attrs = ops.parse_attrs(node)
                build.known[node.output[0]] = self._constant_value(node, attrs, i)
                build.kinds[node.output[0]] = "constant" if "value" in attrs else "literal"
        # Identity of a build-time value (the TorchScript exporter ties equal initializers that way): each output
        # becomes a value of its own, so that tied copies train apart; write_back unties only what diverged
        for i, node in nodes:
            if node.op_type == "Identity" and node.input and node.input[0] in build.known and node.output[0]:
                build.known[node.output[0]] = build.known[node.input[0]]
                build.kinds[node.output[0]] = "literal" if build.kinds[node.input[0]] == "literal" else "identity"
                self._untied[node.output[0]] = node.input[0]
                build.absorbed.add(i)
        for i, node in nodes:
            if i not in build.absorbed:
                for k, name in enumerate(node.input):
                    if name:
                        build.uses[name].append((node.op_type, k, node))
        return nodes

    def _assign_roles(self, nodes: list[tuple[int, onnx.NodeProto]], build: _Build, train_quantized_weights: bool,
                      train_quant_scales: bool) -> None:
        shape_like = self._shape_like(nodes)
        for name, array in build.known.items():
            if build.kinds[name] == "literal" or (name in shape_like and array.dtype.kind == "f"):
                build.roles[name] = "constant"
                continue
            build.roles[name] = self._classify(name, array, build.uses.get(name, []), build.known,
                                               train_quantized_weights, train_quant_scales, build.qweights)

    def _store(self, build: _Build) -> None:
        """Parameters, running statistics and constants in their containers, each bound to its slot."""
        for name in self.input_names:
            self._slot(name)
        for name, array in build.known.items():
            role = build.roles[name]
            slot = self._slot(name)
            if role in ("parameter", "qweight"):
                key = _sanitize(name, build.taken)
                if role == "qweight":
                    scale, zp, axis = build.qweights[name]
                    value = ops.quant.dequantize(_tensor(array), _tensor(scale), None if zp is None else
                                                 _tensor(zp), axis).to(torch.float32)
                    self._sources[name] = Source(build.kinds[name], role, array, build.qweights[name])
                else:
                    value = _tensor(array)
                    self._sources[name] = Source(build.kinds[name], role, array)
                self.params[key] = nn.Parameter(value)
                self._param_keys[name] = key
                build.base_fill.append((slot, "params", key))
            elif role == "stat":
                key = _sanitize(name, build.taken)
                self.stats.register_buffer(key, _tensor(array))
                self._stat_keys[name] = key
                self._sources[name] = Source(build.kinds[name], role, array)
                build.base_fill.append((slot, "stats", key))
            else:
                self._add_const(name, _tensor(array), build)

    def _compile(self, graph: onnx.GraphProto, nodes: list[tuple[int, onnx.NodeProto]], build: _Build) -> None:
        """Fold constant subgraphs, turn the other nodes into steps, plan freeing and the shape cache."""
        known, roles = build.known, build.roles
        qweight_dqs = {id(build.uses[name][0][2]): build.known[name].dtype for name in build.qweights}
        steps: list[tuple[Any, tuple[int, ...], tuple[int, ...], str, str]] = []
        for i, node in nodes:
            name = _node_name(node, i)
            for out in node.output:
                if out:
                    self.value_origin.append((out, name, node.op_type))
            if node.op_type == "Constant" or i in build.absorbed:
                continue
            if node.op_type in ops.CONTROL_FLOW:
                raise UnsupportedOpError(node.op_type, name, "control flow is not supported")
            builder = ops.BUILDERS.get(node.op_type)
            if builder is None:
                raise UnsupportedOpError(node.op_type, name)
            consts = [known.get(x) if x and roles.get(x) == "constant" else None for x in node.input]
            spec = NodeSpec(node, name, ops.parse_attrs(node), consts, self.opset, qweight=qweight_dqs.get(id(node)))
            fn = builder(spec)
            foldable = (node.op_type in ops.FOLDABLE and spec.qweight is None
                        and all(not x or (x in known and roles.get(x) == "constant") for x in node.input))
            if foldable:
                self._fold(fn, node, build)
                continue
            for x in node.input:
                if x and x not in self._slots:
                    raise BadInputError(f"torch bridge: node '{name}' reads value '{x}' that nothing produces")
            ins = tuple(self._slots[x] if x else _NONE for x in node.input)
            outs = tuple(self._slot(x) if x else _DISCARD for x in node.output)
            steps.append((fn, ins, outs, name, node.op_type))

        missing = [o for o in self.output_names if o not in self._slots]
        if missing:
            raise BadInputError(f"torch bridge: graph outputs {missing} are never produced")
        self._base_fill = build.base_fill
        self._input_slots = [self._slots[n] for n in self.input_names]
        self._output_slots = [self._slots[n] for n in self.output_names]
        out_types = {o.name: o.type.tensor_type.elem_type for o in graph.output}
        self._output_casts = [ops.DTYPES.get(out_types[n]) if out_types.get(n) in (2, 3, 4, 5) else None
                              for n in self.output_names]
        self._step_names = [step[3] for step in steps]
        stored = {slot for slot, _, _ in build.base_fill}
        const_slots = {slot for slot, store, _ in build.base_fill if store == "consts"}
        shape_steps, self._shape_slots = self._shape_only(steps, const_slots)
        never_free = set(self._output_slots) | {_NONE, _DISCARD} | stored | self._shape_slots
        self._steps = self._plan(steps, never_free)
        # shape arithmetic (Shape -> Gather -> Concat -> Reshape...) depends only on the input shapes: computed once
        # per input-shape signature, then its steps are skipped (None: some shape depends on data values)
        self._shape_cache: dict[tuple, list[tuple[int, Any]]] | None = {} if shape_steps is not None else None
        self._fast_steps = self._plan([st for k, st in enumerate(steps) if k not in (shape_steps or ())],
                                      never_free)


    def _slot(self, name: str) -> int:
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = len(self._slot_names)
            self._slot_names.append(name)
        return slot

    @staticmethod
    def _plan(steps: list[tuple[Any, tuple[int, ...], tuple[int, ...], str, str]],
              never_free: set[int]) -> list[tuple[Any, tuple[int, ...], tuple[int, ...], tuple[int, ...], bool]]:
        """Executable steps (callable, input slots, output slots, slots to free after it, several outputs?): every
        intermediate is released after its last reader."""
        last_use: dict[int, int] = {}
        for k, (_, ins, outs, _, _) in enumerate(steps):
            for slot in ins + outs:
                last_use[slot] = k
        frees: list[list[int]] = [[] for _ in steps]
        for slot, k in last_use.items():
            if slot not in never_free:
                frees[k].append(slot)
        return [(fn, ins, outs, tuple(frees[k]), len(outs) > 1) for k, (fn, ins, outs, _, _) in enumerate(steps)]

    @staticmethod
    def _shape_only(steps: list[tuple[Any, tuple[int, ...], tuple[int, ...], str, str]],
                    const_slots: set[int]) -> tuple[set[int] | None, set[int]]:
        """Steps computing only from tensor shapes and constants, and their output slots. The step set is None when
        a shape-defining input (Reshape's shape, Slice's bounds...) comes from data values: then the shapes are not
        a function of the input shapes alone and nothing may be cached."""
        shape_slots: set[int] = set()
        shape_steps: set[int] = set()
        for k, (_, ins, outs, _, op_type) in enumerate(steps):
            known = all(i == _NONE or i in const_slots or i in shape_slots for i in ins)
            if op_type in ("Shape", "Size") or (op_type in ops.SHAPE_ARITHMETIC and known):
                shape_steps.add(k)
                shape_slots.update(o for o in outs if o != _DISCARD)
        for k, (_, ins, _, _, op_type) in enumerate(steps):
            if k in shape_steps:
                continue
            for index in ops.SHAPE_INPUTS.get(op_type, ()):
                if index < len(ins) and ins[index] not in (_NONE, *const_slots) and ins[index] not in shape_slots:
                    return None, set()
            if op_type in ops.DATA_DEPENDENT_SHAPES:
                return None, set()
        return shape_steps, shape_slots

    def _add_const(self, name: str, tensor: torch.Tensor, build: _Build) -> None:
        key = _sanitize(name, build.taken)
        self.consts.register_buffer(key, tensor, persistent=False)
        self._const_keys[name] = key
        build.base_fill.append((self._slot(name), "consts", key))

    @staticmethod
    def _constant_value(node: onnx.NodeProto, attrs: dict[str, Any], index: int) -> np.ndarray:
        if "value" in attrs:
            return np.asarray(attrs["value"])
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                           ("value_ints", np.int64)):
            if key in attrs:
                return np.asarray(attrs[key], dtype=dtype)
        raise UnsupportedOpError("Constant", _node_name(node, index),
                                 f"attribute {sorted(attrs)} (sparse or string constants)")

    @staticmethod
    def _shape_like(nodes: list[tuple[int, onnx.NodeProto]]) -> set[str]:
        """Values that only serve shape arithmetic: read at a static input (Reshape shape, Resize scales...) directly
        or through foldable ops. Float constants among them are never trainable."""
        marked: set[str] = set()
        for _, node in reversed(nodes):
            if node.op_type == "Identity" and node.output[0] in marked:
                marked.update(x for x in node.input if x)
            static = ops.STATIC_INPUTS.get(node.op_type, frozenset())
            if node.op_type in ("BatchNormalization", "QuantizeLinear", "DequantizeLinear"):
                continue
            for k, name in enumerate(node.input):
                if name and k in static:
                    marked.add(name)
            if node.op_type in ops.FOLDABLE and any(o in marked for o in node.output):
                marked.update(x for x in node.input if x)
        return marked

    @staticmethod
    def _classify(name: str, array: np.ndarray, uses: list[tuple[str, int, onnx.NodeProto]],
                  known: dict[str, np.ndarray], train_quantized_weights: bool, train_quant_scales: bool,
                  qweights: dict[str, tuple[np.ndarray, np.ndarray | None, int]]) -> str:
        """'parameter', 'stat', 'qweight' or 'constant' for one build-time value, from how the graph uses it."""
        if array.dtype.kind == "f":
            if any(op == "BatchNormalization" and k in (3, 4) for op, k, _ in uses):
                return "stat"
            quant_scale = [(op, k) for op, k, _ in uses if op in ("QuantizeLinear", "DequantizeLinear") and k == 1]
            if train_quant_scales and quant_scale and len(quant_scale) == len(uses):
                return "parameter"
            if any(k in ops.STATIC_INPUTS.get(op, ()) for op, k, _ in uses):
                return "constant"
            if any(k in ops.WEIGHT_INPUTS.get(op, ()) for op, k, _ in uses):
                return "parameter"
            return "parameter" if array.size > 1 and uses else "constant"
        if (train_quantized_weights and array.dtype.kind in "iu" and len(uses) == 1
                and uses[0][0] == "DequantizeLinear" and uses[0][1] == 0):
            node = uses[0][2]
            scale = known.get(node.input[1]) if len(node.input) > 1 else None
            zp_name = node.input[2] if len(node.input) > 2 else ""
            zp = known.get(zp_name) if zp_name else None
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if scale is not None and (zp is not None or not zp_name) and not attrs.get("block_size"):
                axis = int(attrs.get("axis", 1))
                qweights[name] = (scale, zp, axis)
                return "qweight"
        return "constant"

    def _fold(self, fn: Any, node: onnx.NodeProto, build: _Build) -> None:
        """Run a node whose inputs are all constants once; its outputs become constants."""
        args = [torch.from_numpy(np.array(build.known[x], copy=True)) if x else None for x in node.input]
        with torch.no_grad():
            result = fn(*args)
        results = result if isinstance(result, (tuple, list)) else (result,)
        for name, value in zip(node.output, results):
            if not name:
                continue
            value = value.detach().contiguous()
            build.known[name] = value.numpy()
            build.roles[name] = "constant"
            self._add_const(name, value, build)

    # ------------------------------------------------------------------------------------------------ running

    def _apply(self, fn: Any, recurse: bool = True) -> OnnxModule:  # .to(), .cuda(), .double() move the storage
        self._base = None
        if self._shape_cache is not None:
            self._shape_cache.clear()
        return super()._apply(fn, recurse)

    def __setstate__(self, state: dict[str, Any]) -> None:  # copy.deepcopy
        super().__setstate__(state)
        self._base = None

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._base = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _base_values(self) -> list[Any]:
        if self._base is None:
            base: list[Any] = [None] * len(self._slot_names)
            stores = {"params": self.params, "stats": self.stats._buffers, "consts": self.consts._buffers}
            for slot, store, key in self._base_fill:
                base[slot] = stores[store][key]
            self._base = base
        return self._base

    def _run(self, inputs: Sequence[Any], keep: set[int] | frozenset[int] | None) -> list[Any]:
        if len(inputs) != len(self._input_slots):
            raise BadInputError(f"torch bridge: the graph takes {len(self._input_slots)} inputs "
                                f"({', '.join(self.input_names)}), got {len(inputs)}")
        ops.MODE.training = self.training
        ops.MODE.stochastic = self.stochastic_rounding
        values = list(self._base_values())
        for slot, x in zip(self._input_slots, inputs):
            values[slot] = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        steps, record = self._steps, None
        if self._shape_cache is not None:
            first = values[self._input_slots[0]] if self._input_slots else None
            key = (tuple(tuple(values[s].shape) for s in self._input_slots),
                   first.device if isinstance(first, torch.Tensor) else None)
            cached = self._shape_cache.get(key)
            if cached is not None:
                for slot, value in cached:
                    values[slot] = value
                steps = self._fast_steps
            elif len(self._shape_cache) < 32:
                record = key
        keep = keep or frozenset()
        for fn, ins, outs, free, multi in steps:
            result = fn(*[values[i] for i in ins])
            if multi:
                for slot, r in zip(outs, result):
                    values[slot] = r
            else:
                values[outs[0]] = result[0] if isinstance(result, tuple) else result
            for slot in free:
                if slot not in keep:
                    values[slot] = None
        if record is not None and self._shape_cache is not None:
            self._shape_cache[record] = [(slot, values[slot]) for slot in self._shape_slots]
        return values

    def _outputs(self, values: list[Any]) -> Any:
        outs = []
        for slot, cast in zip(self._output_slots, self._output_casts):
            value = values[slot]
            if cast is not None and value.is_floating_point():
                value = torch.round(value).to(cast)
            outs.append(value)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def forward(self, *inputs: Any, capture: Iterable[str] | None = None) -> Any:
        """Graph inputs positionally -> output (tuple when several). With ``capture`` (value names), returns
        ``(outputs, {name: tensor})`` like :meth:`run_with_features`, so wrappers such as DDP can pass it through."""
        if capture is not None:
            return self.run_with_features(*inputs, capture=capture)
        return self._outputs(self._run(inputs, None))

    def run_with_features(self, *inputs: Any, capture: Iterable[str] = ()) -> tuple[Any, dict[str, torch.Tensor]]:
        """Outputs plus the named intermediate values (autograd graph intact, so losses on them train weights)."""
        names = list(capture)
        unknown = [n for n in names if n not in self._slots]
        if unknown:
            raise BadInputError(f"torch bridge: cannot capture {unknown}: no such value in the graph "
                                f"(see value_names())")
        keep = {self._slots[n] for n in names}
        values = self._run(inputs, keep)
        return self._outputs(values), {n: values[self._slots[n]] for n in names}

    # ------------------------------------------------------------------------------------------- introspection

    def onnx_parameters(self) -> dict[str, nn.Parameter]:
        """ONNX initializer (or Constant output) name -> its trainable nn.Parameter."""
        return {name: self.params[key] for name, key in self._param_keys.items()}

    def onnx_buffers(self) -> dict[str, torch.Tensor]:
        """BatchNormalization running statistics by ONNX name (updated in train mode, written back)."""
        return {name: self.stats._buffers[key] for name, key in self._stat_keys.items()}

    def value_names(self) -> list[tuple[str, str, str]]:
        """(value name, producing node name, op type) for every node output, in execution order."""
        return list(self.value_origin)

    def extra_repr(self) -> str:
        return (f"opset={self.opset}, steps={len(self._steps)}, inputs={self.input_names}, "
                f"outputs={self.output_names}, parameters={len(self._param_keys)}")
