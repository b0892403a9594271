"""``onnxopt inspect``: what a model is made of and what the passes would do to it, without changing it."""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx_ir as ir

from onnxopt.irutil import CONTROL_FLOW_OPS, is_quantized_op
from onnxopt.modelio import input_specs
from onnxopt.passes.normalize import NormalizePass
from onnxopt.passes.opset import default_opset



def inspect_model(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    from onnxopt.stats import model_stats

    graph = model.graph
    nodes = list(ir.traversal.RecursiveGraphIterator(graph))
    ops = Counter(node.op_type for node in nodes)
    initializer_names = set(graph.initializers)
    weight_constants = [n for n in graph if n.op_type == "Constant" and "value" in n.attributes
                        and _numel(n) >= 16]
    foldable_bn = [n for n in graph if n.op_type == "BatchNormalization" and _after_conv(n)]
    specs = input_specs(model)
    stats = model_stats(model, input_shapes=input_shapes or {})
    plan = []
    listed = [v.name for v in graph.inputs if v.name in initializer_names]
    if listed:
        plan.append(f"normalize: remove {len(listed)} initializers listed as graph inputs (old exporter style)")
    if weight_constants:
        plan.append(f"normalize: lift {len(weight_constants)} Constant-node weights to initializers")
    opset = default_opset(model) or 0
    if opset < NormalizePass.min_opset:
        plan.append(f"normalize: raise opset {opset} -> {NormalizePass.min_opset} "
                    "(per-channel QDQ needs 13)")
    if foldable_bn:
        plan.append(f"normalize: fold {len(foldable_bn)} BatchNormalization into the preceding Conv")
    dynamic = [s.describe() for s in specs if not s.is_static]
    if dynamic:
        plan.append("normalize: fix dynamic dims from --input-shape or the calibration data: " + ", ".join(dynamic))
    unnamed = sum(1 for n in nodes if not n.name)
    if unnamed:
        plan.append(f"normalize: name {unnamed} unnamed nodes")
    plan.append("normalize: onnxsim simplification (constant folding, dead-code removal)")
    warnings = []
    quantized = sorted(op for op in ops if is_quantized_op(op))
    if quantized:
        warnings.append("the model is already quantized (" + ", ".join(quantized) + ")")
    if ops.keys() & CONTROL_FLOW_OPS:
        warnings.append("the model has control flow (" + ", ".join(sorted(ops.keys() & CONTROL_FLOW_OPS)) + ")")
    return {
        "producer": f"{model.producer_name or '?'} {model.producer_version or ''}".strip(),
        "ir_version": model.ir_version,
        "opsets": dict(model.opset_imports),
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)} for s in specs],
        "outputs": [{"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])],
                     "dtype": str(v.dtype.numpy()) if v.dtype is not None else None} for v in graph.outputs],
        "nodes": len(nodes),
        "op_counts": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "initializers": len(initializer_names),
        "params": stats.params,
        "size_bytes": stats.size_bytes,
        "macs": stats.macs,
        "macs_by_op": dict(stats.macs_by_op),
        "plan": plan,
        "warnings": warnings,
    }


def format_inspection(info: dict[str, Any]) -> str:
    lines = [f"producer: {info['producer']}   ir_version: {info['ir_version']}   opsets: {info['opsets']}"]
    for item in info["inputs"]:
        lines.append(f"input  {item['name']}: {item['dtype']} {item['shape']}")
    for item in info["outputs"]:
        lines.append(f"output {item['name']}: {item['dtype']} {item['shape']}")
    lines.append(f"nodes: {info['nodes']}   initializers: {info['initializers']}   params: {info['params']:,}   "
                 f"size: {info['size_bytes'] / 1e6:.3f} MB   MACs: {info['macs']:,}")
    lines.append("ops: " + ", ".join(f"{op} x{count}" for op, count in info["op_counts"].items()))
    if info["macs_by_op"]:
        lines.append("MACs by op: " + ", ".join(f"{op} {macs:,}" for op, macs in info["macs_by_op"].items()))
    lines.append("what the passes would do:")
    lines += [f"  - {step}" for step in info["plan"]]
    lines += [f"warning: {w}" for w in info["warnings"]]
    return "\n".join(lines)


def _numel(node: ir.Node) -> int:
    tensor = node.attributes["value"].value
    size = 1
    for dim in tensor.shape:
        size *= int(dim)
    return size


def _after_conv(node: ir.Node) -> bool:
    producer = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    return producer is not None and producer.op_type in ("Conv", "ConvTranspose") and len(node.inputs[0].uses()) == 1
