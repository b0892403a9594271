"""The ``quantize`` pass: int8 static quantization with our calibration and ONNX Runtime's graph rewriting.

Calibration is ours: every activation ORT's quantizer will need is exposed as an output, the model runs once over
``calib_samples`` calibration samples, and a streaming :class:`Calibrator` (bounded memory) turns the values into
ranges by ``method``. The rewriting is ORT's: its ``QDQQuantizer`` (or ``ONNXQuantizer`` for QOperator) receives our
ranges as ``tensors_range`` and never calibrates itself, so what ORT runs is exactly what we measured.

``reduce_range="auto"`` follows the host CPU: x86 without VNNI multiplies u8 x s8 with ``vpmaddubsw``, whose 16-bit
pair sums saturate silently (the Paddle cls model lost 5 points that way), so weights get 7 bits there.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import BadInputError, DataError, RecipeError
from onnxopt.irutil import adopt, is_quantized_op
from onnxopt.modelio import input_specs, to_proto
from onnxopt.passes import opset
from onnxopt.passes.quantize.collect import collect_statistics, tensors_to_calibrate
from onnxopt.passes.quantize.range_methods import METHODS
from onnxopt.pipeline.base import OnnxoptPass
from onnxopt.pipeline.registry import register

#: Per-channel DequantizeLinear (the ``axis`` attribute) needs opset 13.
_PER_CHANNEL_OPSET = 13
_REDUCE_RANGE_CHOICES = ("auto", "on", "off")
_PLACEMENT_CHOICES = ("auto", "all")


@register
@dataclass
class QuantizePass(OnnxoptPass):
    """Int8 static quantization (QDQ or QOperator) with our calibration ranges; needs calibration data.

    Parameters:
        method: activation range method: minmax, percentile, entropy, mse (alias sqnr).
        per_channel: one weight scale per output channel (else one per tensor).
        symmetric_activations: symmetric activation ranges (zero point in the middle of the type).
        format: qdq (QuantizeLinear/DequantizeLinear pairs) or qoperator (QLinearConv, ...).
        reduce_range: 7-bit weights: auto (from the CPU's instruction set), on, off.
        calib_samples: calibration samples used at most.
        op_types: op types to quantize; empty means ONNX Runtime's default set for the format.
        exclude_nodes: node names kept in float.
        percentile: the percentile kept by method=percentile.
        inputs_minmax: graph inputs keep their full min/max range whatever ``method`` says: they are preprocessed
            data whose rare extremes carry the signal (on the digits example, entropy clipped the bright stroke
            pixels of the input and lost 11.5 points; with this it loses 0.5).
        placement: auto (time candidates - everything quantized, only Conv/Gemm/MatMul, the latter per tensor -
            against the FP32 input in one round-robin run and keep the fastest only if it agrees with FP32 on top-1
            and is at least 2% faster; else the model stays FP32) or all (quantize every op of ``op_types``
            without measuring).
    """

    name: ClassVar[str] = "quantize"
    exact: ClassVar[bool] = False

    method: str = "minmax"
    per_channel: bool = True
    symmetric_activations: bool = False
    format: Literal["qdq", "qoperator"] = "qdq"
    reduce_range: Literal["auto", "on", "off"] = "auto"
    calib_samples: int = 256
    op_types: list[str] = field(default_factory=list)
    exclude_nodes: list[str] = field(default_factory=list)
    percentile: float = 99.99
    inputs_minmax: bool = True
    placement: Literal["auto", "all"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.format not in ("qdq", "qoperator"):
            raise ValueError(f"format must be qdq or qoperator, got {self.format!r}")
        if self.reduce_range not in _REDUCE_RANGE_CHOICES:
            raise ValueError(f"reduce_range must be one of {', '.join(_REDUCE_RANGE_CHOICES)}, got {self.reduce_range!r}")
        if self.calib_samples < 1:
            raise ValueError(f"calib_samples must be >= 1, got {self.calib_samples}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.placement not in _PLACEMENT_CHOICES:
            raise ValueError(f"placement must be one of {', '.join(_PLACEMENT_CHOICES)}, got {self.placement!r}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.context.calib is None:
            raise DataError("quantize needs calibration data (--calib)")
        _refuse_quantized(model)
        opset_before = opset.default_opset(model)
        self._ensure_opset(model)
        reduce_range, why = self._reduce_range()

        from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer

        proto = save_and_reload_model_with_shape_infer(to_proto(model))
        op_types = self._op_types()
        exclude = list(self.exclude_nodes)
        unknown = sorted(set(exclude) - {node.name for node in proto.graph.node})
        if unknown:
            raise RecipeError(f"quantize.exclude_nodes names node(s) not in the model: {', '.join(unknown)}")
        tensors = tensors_to_calibrate(proto, op_types, exclude)
        if not tensors:
            self.note(f"nothing to quantize: no node of {', '.join(sorted(op_types))} has float activations")
            return ir.passes.PassResult(model, modified=False)

        calibrator, seen = collect_statistics(
            proto, tensors, self.context.calib, input_specs(model), samples=self.calib_samples,
            histograms=self.method != "minmax", threads=self.context.threads, provider=self.context.provider,
        )
        opts: dict[str, Any] = {"percentile": self.percentile} if self.method == "percentile" else {}
        ranges = calibrator.compute(self.method, symmetric=self.symmetric_activations, **opts)
        graph_inputs = [name for name in (spec.name for spec in input_specs(model)) if name in ranges]
        if self.inputs_minmax and self.method != "minmax" and graph_inputs:
            ranges.update(calibrator.compute("minmax", symmetric=self.symmetric_activations, names=graph_inputs))
            self.note(f"graph input(s) {', '.join(graph_inputs)} keep their min/max range (inputs_minmax)")
        quantized = self._rewrite(proto, ranges, reduce_range, op_types, exclude)
        if self.placement == "auto":
            chosen = self._place(model, proto, quantized, ranges, reduce_range, op_types, exclude)
            if chosen is None:
                self.details.update(method=self.method, calib_samples=seen, ranges=len(ranges), quantized_nodes={})
                # Still FP32, but a raised opset (per-channel needs 13) is a change of the model.
                return ir.passes.PassResult(model, modified=opset.default_opset(model) != opset_before)
            quantized, per_channel = chosen
        else:
            per_channel = self.per_channel
        adopt(model, ir.serde.deserialize_model(quantized))

        by_op = _quantized_nodes(quantized, self.format)
        self.details.update(
            method=self.method, calib_samples=seen, ranges=len(ranges), per_channel=per_channel,
            format=self.format, reduce_range=reduce_range, quantized_nodes=dict(by_op),
            histogram_bytes=calibrator.nbytes,
        )
        self.note(f"calibrated {len(ranges)} activation tensors on {seen} samples by {self.method}"
                  f"{' (symmetric)' if self.symmetric_activations else ''}")
        self.note(f"weights int8 {'per channel' if per_channel else 'per tensor'}, activations uint8, "
                  f"format {self.format}")
        self.note(f"reduce_range {'on' if reduce_range else 'off'}: {why}")
        if by_op:
            self.note("quantized " + ", ".join(f"{op} x{n}" for op, n in sorted(by_op.items())))
        else:
            self.note("ONNX Runtime quantized no node (ops or shapes it does not support)")
        return ir.passes.PassResult(model, modified=True)

    # ------------------------------------------------------------------------------------------------------------
    def _op_types(self) -> list[str]:
        if self.op_types:
            return list(self.op_types)
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        return sorted(QDQRegistry if self.format == "qdq" else QLinearOpsRegistry)

    def _ensure_opset(self, model: ir.Model) -> None:
        current = opset.default_opset(model)
        if self.per_channel and current is not None and current < _PER_CHANNEL_OPSET:
            converted = opset.raise_opset(model, _PER_CHANNEL_OPSET, self.name)
            adopt(model, converted)
            self.note(f"raised opset {current} -> {_PER_CHANNEL_OPSET} (per-channel DequantizeLinear needs 'axis')")

    def _reduce_range(self) -> tuple[bool, str]:
        if self.reduce_range == "on":
            return True, "requested (7-bit weights)"
        if self.reduce_range == "off":
            return False, "requested (full 8-bit weights)"
        from onnxopt import hostinfo

        info = hostinfo.host_info()
        choice = hostinfo.suggest_reduce_range(info)
        if info.is_x86 and not info.flags_known:
            why = "x86 CPU with unknown flags: 7-bit weights to be safe against u8s8 saturation"
        elif info.is_x86 and info.has_vnni:
            why = "VNNI present: full 8-bit weights"
        elif info.is_x86:
            why = "x86 without VNNI (u8s8 products saturate 16-bit sums): 7-bit weights"
        else:
            why = f"{info.machine or 'this'} CPU accumulates int8 products in 32 bits: full 8-bit weights"
        return choice, f"auto, {why}"

    def _place(self, model: ir.Model, proto: onnx.ModelProto, full: onnx.ModelProto, ranges: dict[str, Any],
               reduce_range: bool, op_types: list[str], exclude: list[str]) -> tuple[onnx.ModelProto, bool] | None:
        """placement=auto: time candidates against FP32; the chosen (model, per_channel), or None to stay FP32.

        Every candidate reuses ``ranges`` (one calibration); ORT ignores the ranges a candidate does not need.
        """
        from onnxopt.passes.quantize import placement as pl

        candidates = [pl.Candidate("all", full)]
        per_channel_of = {"all": self.per_channel}
        heavy = [op for op in op_types if op in pl.HEAVY_OPS]
        if heavy and set(heavy) != set(op_types):
            candidates.append(pl.Candidate("conv_gemm_matmul", self._rewrite(proto, ranges, reduce_range, heavy,
                                                                             exclude)))
            per_channel_of["conv_gemm_matmul"] = self.per_channel
        if heavy and self.per_channel and self.format == "qdq":
            label = "conv_gemm_matmul_per_tensor"
            candidates.append(pl.Candidate(label, self._rewrite(proto, ranges, reduce_range, heavy, exclude,
                                                                per_channel=False)))
            per_channel_of[label] = False

        specs = input_specs(model)
        feeds = []
        for batch in self.context.calib.iter_batches(specs, batch_size=1):
            feeds.append(batch.inputs)
            if len(feeds) >= pl.AGREEMENT_SAMPLES:
                break
        threads, provider = self.context.threads, self.context.provider
        reference = pl.first_outputs(proto, feeds, threads, provider)
        for cand in candidates:
            try:
                cand.agreement = pl.top1_agreement(reference, pl.first_outputs(cand.model, feeds, threads, provider))
            except Exception as exc:  # noqa: BLE001 - a candidate ORT cannot run is dropped, not fatal
                cand.rejected = f"does not run: {exc}"[:200]
                continue
            if cand.agreement < pl.MIN_AGREEMENT:
                cand.rejected = f"top-1 agreement {cand.agreement:.3f} < {pl.MIN_AGREEMENT}"

        shapes = dict(self.context.input_shapes) or (
            {name: tuple(shape) for name, shape in zip([s.name for s in specs], [feeds[0][s.name].shape for s in specs])}
            if feeds else {})
        timed = [c for c in candidates if c.rejected is None]
        models = {pl.FP32: proto, **{c.label: c.model for c in timed}}
        medians = pl.time_models(models, threads, shapes) if timed else {}
        fp32_ms = medians.get(pl.FP32)
        for cand in timed:
            cand.median_ms = medians.get(cand.label)
            if cand.median_ms is None:
                cand.rejected = "could not be timed"
            elif fp32_ms:
                cand.speedup = fp32_ms / cand.median_ms
        chosen = pl.choose(candidates, fp32_ms) if fp32_ms else None

        self.details["placement"] = {
            "fp32_ms": fp32_ms, "chosen": chosen.label if chosen else pl.FP32,
            "candidates": [c.to_dict() for c in candidates], "agreement_samples": len(feeds),
        }
        parts = [f"fp32 {fp32_ms:.3f} ms" if fp32_ms else "fp32 not timed"]
        for cand in candidates:
            if cand.median_ms is not None and cand.speedup is not None:
                text = f"{cand.label} {cand.median_ms:.3f} ms ({cand.speedup:.2f}x"
            else:
                text = f"{cand.label} ("
            text += f", top-1 {cand.agreement:.3f}" if cand.agreement is not None else ""
            text += f", dropped: {cand.rejected}" if cand.rejected else ""
            parts.append(text.replace("(, ", "(") + ")")
        self.note("placement candidates (batch 1, median): " + "; ".join(parts))
        if chosen is None:
            ratios = [c.speedup for c in candidates if c.rejected is None and c.speedup is not None]
            if ratios:
                why = f"int8 is slower than FP32 on this CPU (best candidate {max(ratios):.2f}x)"
            else:
                why = "no int8 candidate both agrees with FP32 and could be timed"
            self.note(f"verdict: {why}; kept the model in FP32")
            self.details["placement"]["verdict"] = f"{why}; kept the model in FP32"
            return None
        self.note(f"verdict: kept {chosen.label} ({chosen.speedup:.2f}x FP32)")
        self.details["placement"]["verdict"] = f"kept {chosen.label}"
        assert chosen.model is not None
        return chosen.model, per_channel_of[chosen.label]

    def _rewrite(self, proto: onnx.ModelProto, ranges: dict[str, Any], reduce_range: bool, op_types: list[str],
                 exclude: list[str], per_channel: bool | None = None) -> onnx.ModelProto:
        """ORT's quantizer on ``proto`` with our ranges (it never calibrates); returns the quantized model."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
        from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
        from onnxruntime.quantization.quant_utils import QuantizationMode, QuantType

        data = {
            name: TensorData(lowest=np.array(rng.low, dtype=np.float32), highest=np.array(rng.high, dtype=np.float32))
            for name, rng in ranges.items()
        }
        tensors_range = TensorsData(CalibrationMethod.MinMax, data)
        extra = {"ActivationSymmetric": self.symmetric_activations, "WeightSymmetric": True}
        per_channel = self.per_channel if per_channel is None else per_channel
        common = dict(per_channel=per_channel, reduce_range=reduce_range, weight_qType=QuantType.QInt8,
                      activation_qType=QuantType.QUInt8, tensors_range=tensors_range, nodes_to_quantize=[],
                      nodes_to_exclude=exclude, op_types_to_quantize=op_types, extra_options=extra)
        original = proto
        proto = onnx.ModelProto()
        proto.CopyFrom(original)  # ORT rewrites the graph it is given in place; placement reuses the original
        with _quiet_ort():
            if self.format == "qdq":
                quantizer: Any = QDQQuantizer(proto, **common)
            else:
                quantizer = ONNXQuantizer(proto, mode=QuantizationMode.QLinearOps, static=True, **common)
            quantizer.quantize_model()
            quantizer.model.topological_sort()  # ORT sorts only when it saves the file itself
        return quantizer.model.model


def _refuse_quantized(model: ir.Model) -> None:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if is_quantized_op(node.op_type):
            raise BadInputError(
                f"the model is already quantized (node '{node.name}' is a {node.op_type}); quantize its float "
                "original instead"
            )


def _quantized_nodes(model: onnx.ModelProto, fmt: str) -> Counter[str]:
    """Nodes that run on int8 data, by op type: consumers of DequantizeLinear (QDQ) or QLinear*/Integer ops."""
    if fmt == "qoperator":
        return Counter(n.op_type for n in model.graph.node
                       if n.op_type.startswith("QLinear") or n.op_type.endswith("Integer"))
    dequantized = {out for n in model.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    return Counter(
        n.op_type for n in model.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dequantized for i in n.input)
    )



@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """ORT's quantizer logs advice (pre-processing, ...) to the root logger and stdout; our notes say what matters."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


__all__ = ["QuantizePass"]
