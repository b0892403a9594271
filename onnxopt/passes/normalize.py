"""The ``normalize`` pass: turn any framework's export into one clean, modern form before optimizing it.

Exports differ in ways that trip up later passes: Caffe2-era models list weights as graph inputs and use opset 9;
PaddlePaddle stores every weight in a Constant node and writes ``-1`` input sizes; torch keeps BatchNormalization
after every Conv when exported for training; many exporters leave nodes unnamed. This pass removes those differences
without changing what the model computes (it is ``exact``):

1. initializers listed as graph inputs stop being inputs;
2. Constant nodes become initializers (so weights look like weights);
3. the default-domain opset is raised to ``min_opset``;
4. unnamed nodes get deterministic names;
5. dynamic input dims are fixed from the user's shapes or the calibration data;
6. onnxsim folds constants and removes redundant ops (its own check must pass, else the model is kept as it was);
7. inference BatchNormalization is folded into the preceding Conv / ConvTranspose / Gemm;
8. hard-swish / hard-sigmoid chains (``x * Clip(x + 3, 0, 6) / 6``) become HardSwish / HardSigmoid ops, and
   Reshape -> Transpose -> Reshape channel shuffles (and channel Slices of them) become Gathers, and chains of
   constant Gathers (Gather of Gather, Concat of Gathers of one tensor) become one;
9. unused nodes and initializers are dropped, nodes sorted, shapes inferred.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from onnxopt.irutil import adopt
from onnxopt.modelio import PROTOBUF_LIMIT, input_specs, model_file, tensor_bytes, to_proto
from onnxopt.passes import act_fusion, bn_fold, lent_weights, opset, shapes, shuffle_fusion
from onnxopt.pipeline.base import OnnxoptPass
from onnxopt.pipeline.registry import register

# onnxsim optimizers that would undo what this pass promises: we fold BatchNorm ourselves (keeping weight names and
# counting folds), and merging identical initializers or fusing Q/K/V projections would make distinct layers share or
# lose their weights, which pruning and the torch bridge key by initializer name.
_SKIPPED_ONNXSIM_OPTIMIZERS = ("fuse_bn_into_conv", "eliminate_duplicate_initializer", "fuse_qkv")
# Floating-point input types onnxsim's random check can feed safely (integer inputs are often indices).
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})


@register
@dataclass
class NormalizePass(OnnxoptPass):
    """Bring a foreign export into the canonical form every other pass expects (outputs unchanged).

    Parameters:
        min_opset: raise the default-domain opset to at least this (0 keeps the model's opset).
        lift_constants: turn Constant nodes into initializers.
        fold_batchnorm: fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm.
        simplify: run onnxsim (constant folding, redundant-op elimination).
        lend_weights: on models with at least ``lend_weights_from_mb`` MB of weights, give onnxsim the weights no
            constant folding can touch as graph inputs, not their bytes (:mod:`onnxopt.passes.lent_weights`: much
            faster on large models; onnxsim then skips the fusions that rewrite such a weight).
        lend_weights_from_mb: the weight size from which ``lend_weights`` applies (default 32).
        fix_shapes: fix dynamic input dims from ``context.input_shapes`` or, failing that, the calibration data.
        name_nodes: give unnamed nodes deterministic names.
        fuse_activations: replace hard-swish / hard-sigmoid chains of elementwise ops by the single ONNX op.
        fuse_shuffles: replace Reshape/Transpose/Reshape channel shuffles by a channel Gather (faster, and
            prunable: see :mod:`onnxopt.passes.shuffle_fusion`), and compose chains of constant Gathers into one.
    """

    name: ClassVar[str] = "normalize"
    exact: ClassVar[bool] = True

    min_opset: int = 13
    lift_constants: bool = True
    fold_batchnorm: bool = True
    simplify: bool = True
    lend_weights: bool = True
    lend_weights_from_mb: float = lent_weights.LEND_FROM_BYTES / 2**20
    fix_shapes: bool = True
    name_nodes: bool = True
    fuse_activations: bool = True
    fuse_shuffles: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        newest = onnx.defs.onnx_opset_version()
        if not 0 <= self.min_opset <= newest:
            raise ValueError(f"min_opset must be between 0 (keep) and {newest}, got {self.min_opset}")
        if not self.lend_weights_from_mb >= 0:
            raise ValueError(f"lend_weights_from_mb must be >= 0, got {self.lend_weights_from_mb}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed = False
        changed |= self._remove_initializer_inputs(model)
        if self.lift_constants:
            changed |= self._lift_constants(model)
        changed |= self._raise_opset(model)
        if self.name_nodes:
            changed |= self._name_nodes(model)
        if self.fix_shapes:
            changed |= self._fix_shapes(model)
        if self.simplify:
            changed |= self._simplify(model)
        if self.fold_batchnorm:
            changed |= self._fold_batchnorms(model)
        if self.fuse_activations:
            changed |= self._fuse_activations(model)
        if self.fuse_shuffles:
            changed |= self._fuse_shuffles(model)
        changed |= self._clean_up(model)
        self.details["nodes"] = _count_nodes(model)
        return ir.passes.PassResult(model, modified=changed)

    # -- 1. initializers as inputs ---------------------------------------------------------------------------------

    def _remove_initializer_inputs(self, model: ir.Model) -> bool:
        count = sum(1 for value in model.graph.inputs if value.is_initializer())
        self.details["initializer_inputs_removed"] = count
        if not count:
            return False
        ir_passes.RemoveInitializersFromInputsPass()(model)
        # IR versions before 4 require every initializer to be a graph input.
        model.ir_version = max(model.ir_version, 4)
        self.note(f"removed {count} initializers from the graph inputs (they are weights, not inputs)")
        return True

    # -- 2. Constant nodes -> initializers ---------------------------------------------------------------------------

    def _lift_constants(self, model: ir.Model, *, after: str = "") -> bool:
        before = _count_constants(model)
        if before:
            # Every size is lifted, scalars included: one uniform representation of constant data is simpler for
            # later passes than a size cut-off, and ONNX Runtime and onnxsim treat both forms alike.
            ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        lifted = before - _count_constants(model)
        self.details["constants_lifted"] = self.details.get("constants_lifted", 0) + lifted
        if lifted:
            self.note(f"lifted {lifted} Constant nodes to initializers{after}")
        return lifted > 0

    # -- 3. opset ------------------------------------------------------------------------------------------------------

    def _raise_opset(self, model: ir.Model) -> bool:
        current = opset.default_opset(model)
        self.details["opset_before"] = current
        changed = False
        if self.min_opset and current is not None and current < self.min_opset:
            scalers = opset.replace_image_scalers(model)
            if scalers:
                self.note(f"rewrote {scalers} ImageScaler (removed from ONNX after opset 9) as Mul + Add")
            adopt(model, opset.raise_opset(model, self.min_opset, self.name))
            self.note(f"raised opset {current} -> {self.min_opset}")
            changed = True
            if self.lift_constants:
                self._lift_constants(model, after=" (created by the opset conversion)")
        needed = opset.minimum_ir_version(model)
        if model.ir_version < needed:
            self.note(f"raised IR version {model.ir_version} -> {needed} to match the opset")
            model.ir_version = needed
            changed = True
        self.details["opset_after"] = opset.default_opset(model)
        return changed

    # -- 4. names ------------------------------------------------------------------------------------------------------

    def _name_nodes(self, model: ir.Model, *, quiet: bool = False) -> bool:
        unnamed = sum(1 for node in ir.traversal.RecursiveGraphIterator(model.graph) if not node.name)
        if not unnamed:
            return False
        ir_passes.NameFixPass(_OpTypeNames())(model)
        if not quiet:
            self.details["nodes_named"] = unnamed
            self.note(f"named {unnamed} unnamed nodes after their op type")
        return True

    # -- 5. shapes -----------------------------------------------------------------------------------------------------

    def _fix_shapes(self, model: ir.Model) -> bool:
        negatives = shapes.normalize_negative_dims(model)
        if negatives:
            self.note(f"replaced {negatives} negative sizes (-1) of graph inputs/outputs with symbolic dims")
        if self.context.input_shapes:
            fixed = shapes.fix_input_shapes(model, self.context.input_shapes, keep_batch=False, source="given")
            origin = "as given"
        elif self.context.calib is not None:
            specs = [spec for spec in input_specs(model) if not spec.is_static]
            if not specs:
                return negatives > 0
            sample = self.context.calib.sample_shapes(input_specs(model))
            wanted = {spec.name: sample[spec.name] for spec in specs if spec.name in sample}
            fixed = shapes.fix_input_shapes(model, wanted, keep_batch=True, source="data")
            origin = "from the calibration data, batch dim kept dynamic"
        else:
            return negatives > 0
        for name, dims in fixed.items():
            self.note(f"fixed input {name} to {shapes.format_dims(dims)} ({origin})")
        if fixed:
            shapes.clear_intermediate_shapes(model)
            self.details["fixed_inputs"] = {name: list(dims) for name, dims in fixed.items()}
        return bool(fixed) or negatives > 0

    # -- 6. onnxsim ----------------------------------------------------------------------------------------------------

    def _simplify(self, model: ir.Model) -> bool:
        self.details["simplified"] = False
        bytes_before = tensor_bytes(model)
        lend = self.lend_weights and bytes_before >= self.lend_weights_from_mb * 2**20
        lent = lent_weights.lendable(model.graph) if lend else []
        kept_bytes = bytes_before - sum(value.const_value.nbytes for value in lent)  # type: ignore[union-attr]
        if kept_bytes >= PROTOBUF_LIMIT:
            # onnxsim holds the model in one protobuf message; lent weights are not in it
            self.note("skipped onnxsim: the model's weights exceed protobuf's 2 GB limit" + (
                f" ({kept_bytes / 1e9:.1f} GB of them even with {len(lent)} lent as graph inputs)" if lent else ""))
            return False
        try:
            onnxsim = _import_onnxsim()
        except ImportError:
            self.note("skipped onnxsim: it is not installed")
            return False
        test_shapes = _test_input_shapes(model)
        kwargs: dict[str, Any] = {
            "check_n": 1 if test_shapes is not None else 0,
            "skipped_optimizers": list(_SKIPPED_ONNXSIM_OPTIMIZERS),
            "test_input_shapes": test_shapes or None,
            # Newer onnxsim releases: no proofs or extra analyses, just the simplification.
            "certify": False,
            "check_hazards": False,
            "check_gradients": False,
        }
        accepted = inspect.signature(onnxsim.simplify).parameters
        kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        before = _count_nodes(model)
        order = list(model.graph.initializers)
        if lent and kwargs.get("check_n") and "input_data" in accepted and test_shapes:
            # onnxsim's check then needs every input's data: the lent weights' own, random data inputs
            dtypes = {value.name: value.dtype.numpy() for value in shapes.data_inputs(model) if value.dtype}
            kwargs["input_data"] = lent_weights.check_feeds(
                {value.name or "": value.const_value for value in lent},  # type: ignore[misc]
                {name: (dtypes[name], dims) for name, dims in test_shapes.items()})
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                tensors = stack.enter_context(lent_weights.lent_as_inputs(model.graph, lent))
                if _has_external_tensors(model):
                    source: str | onnx.ModelProto = os.fspath(stack.enter_context(model_file(model)))
                else:
                    source = to_proto(model)
                simplified, ok = onnxsim.simplify(source, **kwargs)
        except Exception as exc:  # onnxsim raises anything from ValueError to C++ runtime errors
            self.note(f"onnxsim failed ({_first_line(exc)}); kept the model unsimplified")
            return False
        if not ok:
            self.note("onnxsim's check of its result failed; kept the model unsimplified")
            return False
        result = ir.serde.deserialize_model(simplified)
        lent_weights.take_back(result.graph, tensors, order)
        adopt(model, result)
        if lent:
            self.details["onnxsim_lent_weights"] = len(lent)
            self.note(f"lent {len(lent)} weights ({sum(t.nbytes for t in tensors.values()) / 1e6:.0f} MB) to onnxsim "
                      "as graph inputs: it skipped any fusion that rewrites them (ONNX Runtime makes those itself)")
        shapes.normalize_negative_dims(model)  # onnxsim writes -1 for dims it could not name
        after = _count_nodes(model)
        self.details.update(simplified=True, nodes_before_simplify=before, nodes_after_simplify=after)
        grown = tensor_bytes(model) - bytes_before
        if grown > max(bytes_before, 1_000_000):
            # Weights computed at run time (ConstantOfShape, Tile, ...) become stored initializers: later passes need
            # them as weights, but the file grows. Say so rather than surprise the user.
            self.note(f"constant folding stored {grown / 1e6:.1f} MB of weights that the input computed at run time "
                      f"(weights {bytes_before / 1e6:.2f} -> {tensor_bytes(model) / 1e6:.1f} MB); the file grows "
                      "accordingly (use simplify=false to keep it small)")
        checked = "" if kwargs.get("check_n") else " (onnxsim's numeric check skipped: some input dims are dynamic)"
        if after != before:
            self.note(f"simplified with onnxsim: {before} -> {after} nodes{checked}")
        else:
            self.note(f"onnxsim found nothing to remove ({after} nodes){checked}")
        # onnxsim rewrites the graph; report a change only when the node count moved (a re-run is then a no-op).
        return after != before

    # -- 7. BatchNormalization -----------------------------------------------------------------------------------------

    def _fold_batchnorms(self, model: ir.Model) -> bool:
        result = bn_fold.fold_batchnorms(model.graph)
        self.details["folded_batchnorms"] = result.total
        if result.total:
            self.details["folded_batchnorms_by_op"] = dict(result.folded)
            into = ", ".join(f"{op} ({n})" for op, n in sorted(result.folded.items()))
            if len(result.folded) == 1:
                into = next(iter(result.folded))
            self.note(f"folded {result.total} BatchNormalization into {into}")
        if result.renamed_shared_weights:
            self.note(
                f"{result.renamed_shared_weights} folded weights were shared with other nodes and got their own "
                "initializer (suffix _bn_folded)"
            )
        if result.skipped:
            left = sum(result.skipped.values())
            why = "; ".join(f"{reason}: {n}" for reason, n in sorted(result.skipped.items()))
            self.note(f"left {left} BatchNormalization as they are ({why})")
        return result.total > 0

    # -- 8. activation chains -----------------------------------------------------------------------------------------

    def _fuse_activations(self, model: ir.Model) -> bool:
        fused = act_fusion.fuse_activations(model.graph, opset.default_opset(model) or 0)
        total = sum(fused.values())
        self.details["fused_activations"] = dict(fused)
        if total:
            what = ", ".join(f"{n} {op}" for op, n in sorted(fused.items()))
            self.note(f"fused {total} elementwise activation chains into single ops ({what})")
        return total > 0

    def _fuse_shuffles(self, model: ir.Model) -> bool:
        if not any(node.op_type in ("Transpose", "Gather") for node in model.graph):
            return False
        shapes.infer_shapes(model)  # the match needs the channel count of each shuffle's input
        counts = shuffle_fusion.fuse_channel_shuffles(model.graph)
        counts["nodes_folded"] = shuffle_fusion.fold_channel_gathers(model.graph)
        self.details["fused_shuffles"] = counts
        if counts["shuffles"]:
            self.note(f"rewrote {counts['shuffles']} Reshape/Transpose/Reshape channel shuffles as channel Gathers "
                      f"({counts['slices']} channel Slices of them became Gathers too)")
        if counts["nodes_folded"]:
            self.note(f"composed chains of channel Gathers/Concats into single Gathers: {counts['nodes_folded']} "
                      "nodes fewer")
        return counts["shuffles"] > 0 or counts["nodes_folded"] > 0

    # -- 9. clean-up ---------------------------------------------------------------------------------------------------

    def _clean_up(self, model: ir.Model) -> bool:
        before = _count_nodes(model) + len(model.graph.initializers)
        ir_passes.RemoveUnusedNodesPass()(model)
        removed = before - _count_nodes(model) - len(model.graph.initializers)
        self.details["removed_unused"] = removed
        if removed:
            self.note(f"removed {removed} unused nodes and initializers")
        ir_passes.TopologicalSortPass()(model)
        if self.name_nodes:
            self._name_nodes(model, quiet=True)  # onnxsim or the opset converter may have added unnamed nodes
        # Shape inference serializes the model without its large weights, so it stays cheap; a failure leaves the
        # model as it was (shapes are an aid, not a requirement).
        shapes.infer_shapes(model)
        return removed > 0


class _OpTypeNames(ir_passes.naming.SimpleNameGenerator):
    """Unnamed nodes are called after their op type (``Conv``, ``Conv_1``, ...): readable in reports, deterministic."""

    def generate_node_name(self, node: ir.Node) -> str:
        return node.name or node.op_type



def _test_input_shapes(model: ir.Model) -> dict[str, list[int]] | None:
    """Shapes for onnxsim's random check (dynamic batch -> 1), or None when it cannot generate suitable data."""
    result: dict[str, list[int]] = {}
    for value in shapes.data_inputs(model):
        dims = shapes.input_dims(value)
        if dims is None or value.dtype not in _FLOAT_TYPES:
            return None
        sizes = [1 if index == 0 and not isinstance(d, int) else d for index, d in enumerate(dims)]
        if not all(isinstance(d, int) and d > 0 for d in sizes):
            return None
        result[value.name or ""] = sizes  # type: ignore[misc]
    return result


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def _count_constants(model: ir.Model) -> int:
    return sum(
        1
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type == "Constant" and node.domain in opset.DEFAULT_DOMAINS
    )


def _has_external_tensors(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _import_onnxsim() -> Any:
    """Import onnxsim without letting it pull in torch.

    onnxsim 0.8 imports torch at package import for an optional PPQ bridge (guarded by ``except Exception``) that the
    simplifier never uses: 1.3 s and hundreds of MB before any work, and it would break the promise that the light
    commands (`optimize` with the default recipe, `quantize`) never load torch. Hiding torch for the duration of that
    one import makes the guard take its fallback; a torch the user already imported is left alone.
    """
    if "onnxsim" in sys.modules or "torch" in sys.modules:
        import onnxsim

        return onnxsim
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import onnxsim
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return onnxsim
