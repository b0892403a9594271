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
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import BadInputError, DataError, RecipeError
from onnxopt.irutil import adopt, is_quantized_op
from onnxopt.modelio import all_nodes, input_specs, proto_tensor_bytes, to_proto
from onnxopt.passes import opset
from onnxopt.passes.quantize.collect import (
    SOFTMAX_FILL_SPAN,
    collect_statistics,
    mask_filled_softmax_inputs,
    nodes_reading_or_writing,
    tensors_to_calibrate,
)
from onnxopt.passes.quantize.placement import HEAVY_OPS
from onnxopt.passes.quantize.range_methods import METHODS
from onnxopt.pipeline.base import OnnxoptPass
from onnxopt.pipeline.registry import register
from onnxopt.shared_weights import SharedWeights, external_sources

#: Activation types int8 calibration does not take (the note says to convert the model to float32).
_HALF_TYPES = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})
#: Per-channel DequantizeLinear (the ``axis`` attribute) needs opset 13.
_PER_CHANNEL_OPSET = 13
_REDUCE_RANGE_CHOICES = ("auto", "on", "off")
_PLACEMENT_CHOICES = ("auto", "all")
#: The label suffix of the placement search's profile-guided split (node_profile.py).
_PROFILED = "_fp32_profiled"
#: Calibration samples a method needs at least: histogram methods estimate tails, which a handful cannot show.
MIN_SAMPLES = {"minmax": 1, "percentile": 8, "entropy": 8, "mse": 8, "sqnr": 8}


@register
@dataclass
class QuantizePass(OnnxoptPass):
    """Int8 static quantization (QDQ or QOperator) with our calibration ranges; needs calibration data.

    Parameters:
        method: activation range method: minmax, percentile, entropy, mse (alias sqnr).
        per_channel: one weight scale per output channel (else one per tensor).
        per_channel_min_gain_db: with per_channel, a weight keeps one scale per channel only where that raises its
            int8 SQNR by at least this many dB over one scale per tensor; the others get one scale (4 bytes a
            channel less in the file). 0 keeps every weight per channel. QDQ only (ORT's QOperator writer takes no
            per-weight axis).
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
            without measuring). Besides the whole-model candidates (QDQ, QOperator), auto tries the
            profile-guided split (the convs ORT's profiler finds slower in int8 kept FP32, node_profile.py) and,
            in the region stage, regions left in FP32 (the first conv, the depthwise convs, the classifier head,
            convs next to hard-swish) and per-tensor weights: at most ``max_candidates`` models, timed in one
            round-robin run.
        placement_search: staged (default: the region candidates are built only when the whole-model ones are less
            than 1.10x faster than FP32; on CPUs where int8 pays, this skips most of the search) or full (always).
        weight_method: weight ranges: minmax (ORT's) or mse (per-channel MSE-optimal clipping, Lin et al. 2015; the
            weights handed to ORT are clipped to our range, so its min/max equals it).
        equalize: cross-layer equalization of Conv -> [Relu] -> Conv pairs before calibration (float-exact).
        bias_correction: subtract the mean output shift caused by weight rounding from each bias (calibration data).
        sensitivity: per-layer sensitivity table in details["sensitivity"] (also computed when an accuracy budget
            is missed by the all-int8 model: its order is what the budget search keeps FP32).
        accuracy_drop: accuracy budget (fraction); default: the run's ``--budget accuracy_drop``. The most sensitive
            layers stay FP32 until the budget holds (accuracy on eval labels, else top-1 agreement with FP32).
        max_fp32_layers: at most this many layers kept FP32 by the budget search (it then stops at the cap, and says
            the budget was missed); without a budget, exactly the N most sensitive layers stay FP32 (a fixed
            mixed-precision setting that the recipe search can sweep).
        eval_samples: samples used by sensitivity and the budget checks.
        max_candidates: int8 models timed by placement=auto at most.
        mixed_fallback: placement=auto's last resort, when every int8 candidate faster than FP32 fails its checks
            (agreement, SQNR, accuracy budget): keep the fewest most sensitive Conv/Gemm/MatMul layers FP32 (ranked
            by simulated per-layer sensitivity, and below that count by the noise each adds in the all-int8 model;
            bisected on real int8 models, at most half of them) that let a Conv/Gemm/MatMul-only candidate pass,
            and time what both orders find against FP32 like the others.
        profile_split: with placement=auto, also time the profile-guided split: the Conv/Gemm/MatMul nodes that
            ORT's profiler finds slower in int8 than in FP32 (at batch 1, batch 8 and one thread) kept FP32
            (node_profile.py); it is kept over the whole int8 model only when >= 2% faster on its slowest setting.
            Off: no profile (0.1-0.4 s less search on small nets, ~1.5 s on the PaddleOCR v4 models).
        derive_candidates: build a model that keeps some nodes FP32 (placement regions, the budget search's
            steps) from the QDQ model ORT's quantizer built for fewer FP32 nodes, by putting those nodes' float
            weights and activations back (same outputs as ORT's own rewrite, in milliseconds instead of a run of
            ORT's quantizer); off: ORT's quantizer builds every one.
        normalize_first: run the ``normalize`` pass first when the model needs it (weights in Constant nodes,
            initializers listed as graph inputs, BatchNormalization after a Conv/Gemm): ORT's quantizer treats
            Constant-node weights as activations (the file grows instead of shrinking) and quantizes an unfolded
            BatchNormalization on its own. ``onnxopt quantize`` always normalizes; this covers a recipe that runs
            ``quantize`` alone.
        compact: shrink the QDQ file (no value_info, no zero default zero points, shared constants, short names).
        half_constants: with compact, per-channel weight scales and float biases stored as float16 behind a
            Cast -> Split that ONNX Runtime folds at load (each value moves by <= 2^-11 of itself; 13 KB of the
            Paddle cls model's 177 KB int8 file).
    """

    name: ClassVar[str] = "quantize"
    exact: ClassVar[bool] = False

    method: str = "minmax"
    per_channel: bool = True
    per_channel_min_gain_db: float = 0.0
    symmetric_activations: bool = False
    format: Literal["qdq", "qoperator"] = "qdq"
    reduce_range: Literal["auto", "on", "off"] = "auto"
    calib_samples: int = 256
    op_types: list[str] = field(default_factory=list)
    exclude_nodes: list[str] = field(default_factory=list)
    percentile: float = 99.99
    inputs_minmax: bool = True
    placement: Literal["auto", "all"] = "auto"
    placement_search: Literal["staged", "full"] = "staged"
    weight_method: Literal["minmax", "mse"] = "minmax"
    equalize: bool = False
    bias_correction: bool = False
    sensitivity: bool = False
    accuracy_drop: float | None = None
    max_fp32_layers: int | None = None
    eval_samples: int = 256
    max_candidates: int = 10
    normalize_first: bool = True
    derive_candidates: bool = True
    mixed_fallback: bool = True
    profile_split: bool = True
    compact: bool = True
    half_constants: bool = True

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
        if self.placement_search not in ("staged", "full"):
            raise ValueError(f"placement_search must be staged or full, got {self.placement_search!r}")
        if self.weight_method not in ("minmax", "mse"):
            raise ValueError(f"weight_method must be minmax or mse, got {self.weight_method!r}")
        if self.accuracy_drop is not None and not 0.0 <= self.accuracy_drop < 1.0:
            raise ValueError(f"accuracy_drop is a fraction in [0, 1), got {self.accuracy_drop}")
        if self.max_fp32_layers is not None and self.max_fp32_layers < 0:
            raise ValueError(f"max_fp32_layers must be >= 0, got {self.max_fp32_layers}")
        if self.per_channel_min_gain_db < 0:
            raise ValueError(f"per_channel_min_gain_db must be >= 0, got {self.per_channel_min_gain_db}")
        if self.eval_samples < 1 or self.max_candidates < 1:
            raise ValueError("eval_samples and max_candidates must be >= 1")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with contextlib.ExitStack() as files:
            self._files = files  # what lives as long as the call: the FP32 model's shared weights
            self._shared: SharedWeights | None = None
            return self._quantize(model)

    def _quantize(self, model: ir.Model) -> ir.passes.PassResult:
        # Per-run caches keyed by the id of a model proto that lives for the whole call.
        self._scales: dict[tuple[int, str, int, bool], list[dict[str, Any]]] = {}
        self._worth_it: dict[tuple[int, bool, tuple[str, ...]], dict[str, int]] = {}
        # ORT's builds in _build: (proto, ranges, reduce_range, op types, setting) -> [(excluded nodes, model)]
        self._built: dict[tuple[Any, ...], list[tuple[frozenset[str], onnx.ModelProto]]] = {}
        if self.context.calib is None:
            raise DataError("quantize needs calibration data (--calib)")
        _refuse_quantized(model)
        normalized = self._normalize_if_needed(model)
        from onnxopt.passes.compress import expand_weights, has_stored_weights

        # Weights stored by `compress` must be initializers for ORT's quantizer; a model that stays FP32 keeps them
        # stored (the small file at FP32 speed is what compress is for).
        self._stored = model.clone() if has_stored_weights(model.graph) else None
        expanded = expand_weights(model.graph) if self._stored is not None else 0
        if expanded:
            self.note(f"expanded {expanded} int8-stored weights (compress) to float before quantizing")
        else:
            self._stored = None
        opset_before = opset.default_opset(model)
        self._ensure_opset(model)
        reduce_range, why = self._reduce_range()

        proto = _with_inferred_shapes(model)
        sources = external_sources(model)  # the weights whose bytes are still those of the input's data files
        op_types = self._op_types()
        exclude = list(self.exclude_nodes)
        unknown = sorted(set(exclude) - {node.name for node in proto.graph.node})
        if unknown:
            raise RecipeError(f"quantize.exclude_nodes names node(s) not in the model: {', '.join(unknown)}")
        fp32 = proto  # what the user gave (after shape inference): the reference for every accuracy and timing
        proto = self._prepare_for_writers(fp32, op_types, exclude)
        tensors = tensors_to_calibrate(proto, op_types, exclude)
        if not tensors:
            half = tensors_to_calibrate(proto, op_types, exclude, elem_types=_HALF_TYPES)
            why = (f"its activations are float16/bfloat16 ({len(half)} of them, e.g. '{half[0]}'), and int8 "
                   "calibration takes float32 ones: convert the model to float32 first" if half else
                   f"no node of {', '.join(sorted(op_types))} has float32 activations")
            self.note(f"nothing to quantize: {why}")
            return self._unquantized(model, modified=normalized)
        self._check_sample_count()
        specs = input_specs(model)
        from onnxopt.passes.quantize import placement as pl

        if proto_tensor_bytes(fp32) >= pl.FILE_FROM_BYTES:  # its sessions read files: weights written once
            self._shared = self._files.enter_context(SharedWeights(fp32, sources))
        if proto is fp32 and (self.equalize or self.bias_correction or self.weight_method != "minmax"):
            proto = onnx.ModelProto()
            proto.CopyFrom(fp32)
        self._prepare_weights(proto, op_types, exclude, reduce_range, specs)

        calibrator, seen = collect_statistics(
            proto, tensors, self.context.calib, specs, samples=self.calib_samples,
            histograms=self.method != "minmax", threads=self.context.threads, provider=self.context.provider,
            files=self._shared,
        )
        needed = MIN_SAMPLES[self.method]
        if seen < needed:
            raise DataError(f"quantize method '{self.method}' needs at least {needed} calibration samples, the data "
                            f"({self.context.calib.description}) has {seen}; add samples or use method=minmax")
        exclude = self._float_around_unrangeable(proto, calibrator, op_types, exclude)
        opts: dict[str, Any] = {"percentile": self.percentile} if self.method == "percentile" else {}
        ranges = calibrator.compute(self.method, symmetric=self.symmetric_activations, **opts)
        graph_inputs = [name for name in (spec.name for spec in specs) if name in ranges]
        if self.inputs_minmax and self.method != "minmax" and graph_inputs:
            ranges.update(calibrator.compute("minmax", symmetric=self.symmetric_activations, names=graph_inputs))
            self.note(f"graph input(s) {', '.join(graph_inputs)} keep their min/max range (inputs_minmax)")

        budget = self.accuracy_drop if self.accuracy_drop is not None else self.context.budgets.get("accuracy_drop")
        evaluator = None
        if budget is not None or self.sensitivity or (self.max_fp32_layers or 0) > 0:
            from onnxopt.passes.quantize.budget import Evaluator

            evaluator = Evaluator.build(fp32, self.context, specs, self.eval_samples)
            if budget is not None:
                evaluator.ensure_scorable()  # before the sensitivity table's work, not after it
            exclude = self._mixed_precision(proto, ranges, reduce_range, op_types, exclude, evaluator, budget)

        # placement=all uses ``proto`` no more: ORT may rewrite it in place instead of a copy (2.4 GB on a 2.4 GB MLP)
        quantized, _ = self._build(proto, ranges, reduce_range, op_types, exclude, consume=self.placement == "all")
        if self.placement == "auto":
            from onnxopt.passes.quantize.placement import sharing_sessions

            # one ORT session per candidate for agreement, timing and confirmation
            with sharing_sessions(one_setting=proto_tensor_bytes(fp32) >= _ONE_SETTING_BYTES) as pool:
                if self._shared is not None:
                    pool.share(fp32, self._shared)
                chosen = self._place(model, proto, quantized, ranges, reduce_range, op_types, exclude, evaluator,
                                     budget, fp32)
            if chosen is None:
                self.details.update(method=self.method, calib_samples=seen, ranges=len(ranges), quantized_nodes={})
                # Still FP32, but a raised opset (per-channel needs 13) is a change of the model.
                return self._unquantized(model, modified=normalized or opset.default_opset(model) != opset_before)
            quantized, per_channel, fmt = chosen
        else:
            per_channel, fmt = self.per_channel, self.format
            self.note("verdict: placement=all quantized without timing against FP32; it may be slower on this CPU")
        if self.compact:
            from onnxopt.passes.quantize.compact import compact

            compact(quantized, half_constants=self.half_constants)
        adopt(model, ir.serde.deserialize_model(quantized))

        by_op = _quantized_nodes(quantized, fmt)
        self.details.update(
            method=self.method, calib_samples=seen, ranges=len(ranges), per_channel=per_channel,
            format=fmt, reduce_range=reduce_range, quantized_nodes=dict(by_op),
            histogram_bytes=calibrator.nbytes, weight_method=self.weight_method,
        )
        self.note(f"calibrated {len(ranges)} activation tensors on {seen} samples by {self.method}"
                  f"{' (symmetric)' if self.symmetric_activations else ''}")
        self.note(f"weights int8 {'per channel' if per_channel else 'per tensor'} ({self.weight_method} ranges), "
                  f"activations uint8, format {fmt}")
        self.note(f"reduce_range {'on' if reduce_range else 'off'}: {why}")
        if by_op:
            self.note("quantized " + ", ".join(f"{op} x{n}" for op, n in sorted(by_op.items())))
        else:
            self.note("ONNX Runtime quantized no node (ops or shapes it does not support)")
        return ir.passes.PassResult(model, modified=True)

    # ------------------------------------------------------------------------------------------------------------
    def _normalize_if_needed(self, model: ir.Model) -> bool:
        """Run ``normalize`` on ``model`` (in place) when :func:`_why_normalize` finds a reason; True if it ran."""
        reasons = _why_normalize(model) if self.normalize_first else []
        if not reasons:
            return False
        from onnxopt.passes.normalize import NormalizePass

        step = NormalizePass().bind(self.context)
        step(model)
        self.details["normalized_first"] = reasons
        self.note(f"normalized the model first ({'; '.join(reasons)}): " + "; ".join(step.notes))
        return True

    def _unquantized(self, model: ir.Model, modified: bool) -> ir.passes.PassResult:
        """The result when the model stays FP32: with the weights stored as `compress` left them, if it had."""
        if self._stored is not None:  # the input as it came: nothing changed
            adopt(model, self._stored)
            self.note("the model stays FP32 with its int8-stored weights (compress) as they were")
            modified = False
        return ir.passes.PassResult(model, modified=modified)

    def _prepare_for_writers(self, fp32: onnx.ModelProto, op_types: list[str], exclude: list[str]
                             ) -> onnx.ModelProto:
        """:func:`~onnxopt.passes.quantize.writer_prep.prepare_for_writers` on ``fp32`` (a copy when it changes
        anything); the nodes it must leave float join ``exclude``."""
        from onnxopt.passes.quantize.writer_prep import prepare_for_writers

        prep = prepare_for_writers(fp32, op_types, exclude)
        for line in prep.notes:
            self.note(line)
        if prep.excluded:
            exclude.extend(prep.excluded)
            self.details["kept_float_for_writers"] = dict(prep.excluded)
            self.note(f"{len(prep.excluded)} node(s) kept float: " + "; ".join(
                f"{name}: {why}" for name, why in list(prep.excluded.items())[:3]))
        return prep.model

    def _check_sample_count(self) -> None:
        """Fail before any work when the data is known to be too small for the method."""
        assert self.context.calib is not None
        count = self.context.calib.num_samples()
        needed = MIN_SAMPLES[self.method]
        if count is not None and count < needed:
            raise DataError(f"quantize method '{self.method}' needs at least {needed} calibration samples, the data "
                            f"({self.context.calib.description}) has {count}; add samples or use method=minmax")

    def _prepare_weights(self, proto: onnx.ModelProto, op_types: list[str], exclude: list[str], reduce_range: bool,
                         specs: list[Any]) -> None:
        """CLE, bias correction and MSE weight clipping, on ``proto`` (a copy: the input model is never touched)."""
        from onnxopt.passes.quantize import weights_prep

        if self.equalize:
            from onnxopt.passes.quantize.equalize import equalize

            result = equalize(proto)
            self.details["equalize"] = vars(result)
            self.note(f"cross-layer equalization: {result.pairs} conv pair(s) in {result.iterations} iteration(s), "
                      f"channel range spread {result.spread_before:.1f} -> {result.spread_after:.1f}"
                      + (f"; {result.skipped_clip} pair(s) behind a Clip (ReLU6) skipped: not scale-equivariant"
                         if result.skipped_clip else ""))
        quantize_weight = weights_prep.weight_quantizer(self.per_channel, reduce_range, self.weight_method)
        targets = [n.name for n in proto.graph.node
                   if n.op_type in HEAVY_OPS and n.op_type in op_types and n.name not in exclude and n.name]
        if self.bias_correction:
            from onnxopt.passes.quantize.bias_correction import correct_biases

            assert self.context.calib is not None
            shifts = correct_biases(proto, targets, quantize_weight, self.context.calib, specs,
                                    min(self.calib_samples, 256), self.context.threads)
            self.details["bias_correction"] = {k: round(v, 6) for k, v in shifts.items()}
            top = max(shifts.values(), default=0.0)
            self.note(f"bias correction on {len(shifts)} layer(s) (empirical, calibration data), "
                      f"largest mean shift removed {top:.3g}")
        if self.weight_method == "mse":
            clipped = weights_prep.clip_weights(proto, targets, self.per_channel, reduce_range)
            self.note(f"weights clipped to their per-{'channel' if self.per_channel else 'tensor'} MSE-optimal "
                      f"range on {clipped} layer(s) (Lin et al. 2015)")
        self._quantize_weight = quantize_weight

    def _mixed_precision(self, proto: onnx.ModelProto, ranges: dict[str, Any], reduce_range: bool,
                         op_types: list[str], exclude: list[str], evaluator: Any, budget: float | None) -> list[str]:
        """Sensitivity table; with a budget, the shortest prefix of it kept FP32 so that the budget holds. The
        all-int8 model is checked first: when it meets the budget the table ranks nothing, and is made only when
        asked for (``sensitivity``; on the Paddle cls model it was 11 of the 15.5 s such a run took)."""

        def fits(k: int) -> tuple[bool, float]:
            model, _ = self._build(proto, ranges, reduce_range, op_types, exclude + names[:k])
            drop = evaluator.drop(model)
            return drop <= budget + 1e-12, drop

        names: list[str] = []
        first = fits(0) if budget is not None else None
        if first is not None and first[0] and not self.sensitivity:
            self.details["mixed_precision"] = {"budget": budget, "metric": evaluator.what, "fp32_layers": [],
                                               "trials": [{"fp32_layers": 0, "drop": first[1]}]}
            self.note(f"mixed precision: all layers int8 meet accuracy_drop <= {budget} (drop {first[1]:.4f}, "
                      f"{evaluator.what}); no sensitivity table needed (sensitivity=true makes one)")
            return exclude
        table = self._sensitivity(proto, ranges, reduce_range, op_types, exclude, evaluator.feeds, evaluator.labels)
        self.details["sensitivity"] = [row.to_dict() for row in table]
        if table:
            worst = table[0]
            self.note(f"sensitivity of {len(table)} layer(s) (one at a time, simulated int8, {evaluator.what}): "
                      f"most sensitive {worst.node} (output SQNR {worst.output_sqnr_db:.1f} dB"
                      + (f", accuracy {worst.accuracy:.4f}" if worst.accuracy is not None else "") + ")")
        names = [row.node for row in table]
        cap = len(names) if self.max_fp32_layers is None else min(self.max_fp32_layers, len(names))
        if budget is None:
            cap = min(self.max_fp32_layers or 0, len(names))
            if cap:
                self.details["mixed_precision"] = {"budget": None, "fp32_layers": names[:cap], "trials": []}
                self.note(f"mixed precision: kept the {cap} most sensitive layer(s) in FP32 (max_fp32_layers): "
                          f"{', '.join(names[:cap])}")
            return exclude + names[:cap]

        trials: list[dict[str, Any]] = []
        assert first is not None
        ok, drop = first
        trials.append({"fp32_layers": 0, "drop": drop})
        best = 0
        if not ok and cap:
            low, high = 0, cap  # fits(low) fails; fits(high) is assumed (all heavy layers FP32 if uncapped)
            while high - low > 1:
                mid = (low + high) // 2
                ok_mid, drop_mid = fits(mid)
                trials.append({"fp32_layers": mid, "drop": drop_mid})
                if ok_mid:
                    high = mid
                else:
                    low = mid
            best = high
            if best == cap and self.max_fp32_layers is not None:
                met, drop_cap = fits(cap)
                trials.append({"fp32_layers": cap, "drop": drop_cap})
                if not met:
                    self.note(f"mixed precision: the budget accuracy_drop <= {budget} is missed even with "
                              f"max_fp32_layers={cap} layer(s) in FP32 (drop {drop_cap:.4f})")
        kept = names[:best]
        self.details["mixed_precision"] = {"budget": budget, "metric": evaluator.what, "fp32_layers": kept,
                                           "trials": trials}
        if kept:
            self.note(f"mixed precision: kept {len(kept)} most sensitive layer(s) in FP32 for accuracy_drop <= "
                      f"{budget} ({evaluator.what}; all-int8 drop {trials[0]['drop']:.4f}): {', '.join(kept)}")
        elif ok:
            self.note(f"mixed precision: all layers int8 meet accuracy_drop <= {budget} "
                      f"(drop {drop:.4f}, {evaluator.what})")
        else:
            self.note(f"mixed precision: all-int8 drop {drop:.4f} misses accuracy_drop <= {budget} and "
                      "max_fp32_layers=0 allows no FP32 layer")
        return exclude + kept

    def _sensitivity(self, proto: onnx.ModelProto, ranges: dict[str, Any], reduce_range: bool, op_types: list[str],
                     exclude: list[str], feeds: list[dict[str, np.ndarray]], labels: np.ndarray | None) -> list[Any]:
        """The simulated per-layer sensitivity table of the Conv/Gemm/MatMul layers of ``op_types`` not in
        ``exclude``, most sensitive first (:func:`sensitivity.layer_sensitivity`)."""
        from onnxopt.passes.quantize.sensitivity import layer_sensitivity

        layers = [n for n in proto.graph.node if n.op_type in HEAVY_OPS and n.op_type in op_types and n.name
                  and n.name not in exclude and len(n.input) > 1]
        return layer_sensitivity(proto, layers, ranges, self._quantize_weight, feeds, labels, reduce_range,
                                 self.symmetric_activations, self.context.threads)

    def _float_around_unrangeable(self, proto: onnx.ModelProto, calibrator: Any, op_types: list[str],
                                  exclude: list[str]) -> list[str]:
        """``exclude`` plus the nodes reading or writing an activation no int8 range serves: one that holds +-inf on
        the calibration data (an attention mask's -inf, log(0)), or a Softmax input that holds a mask's finite fill
        (-1e4, -1e9, float32's lowest: :func:`collect.mask_filled_softmax_inputs`); noted, and in the details."""
        found = {"infinite": list(calibrator.infinite),
                 "mask_filled": list(mask_filled_softmax_inputs(proto, calibrator))}
        for kind, names in found.items():
            if not names:
                continue
            around = nodes_reading_or_writing(proto, names, op_types, exclude)
            exclude = [*exclude, *around]
            self.details[f"{kind}_activations"] = {"tensors": names, "float_nodes": around}
            what = ("hold +-inf on the calibration data (an attention mask's -inf, log(0))" if kind == "infinite" else
                    f"feed a Softmax with values spanning over {SOFTMAX_FILL_SPAN:.0f} (an attention mask's fill)")
            self.note(f"{len(names)} activation(s) {what}, which no int8 range serves: {', '.join(names[:3])}"
                      f"{' ...' if len(names) > 3 else ''}; the {len(around)} node(s) reading or writing them stay "
                      "float")
        return exclude

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
               reduce_range: bool, op_types: list[str], exclude: list[str], evaluator: Any = None,
               budget: float | None = None, fp32: onnx.ModelProto | None = None
               ) -> tuple[onnx.ModelProto, bool, str] | None:
        """placement=auto: time candidates against FP32; the chosen (model, per_channel, format), or None for FP32.

        Every candidate reuses ``ranges`` (one calibration); ORT ignores the ranges a candidate does not need. With an
        accuracy budget a candidate must meet it first; among those left, the fastest wins. ``fp32`` is the user's
        model when ``proto`` had its weights prepared (CLE, bias correction, clipping).
        """
        fp32 = proto if fp32 is None else fp32
        started = time.perf_counter()
        build_seconds = 0.0
        derived_labels: list[str] = []  # built by float_nodes.keep_float, not by a run of ORT's quantizer
        from onnxopt.passes.quantize import placement as pl
        from onnxopt.passes.quantize.agreement import CHECK_NAMES
        from onnxopt.passes.quantize.node_profile import fp32_nodes_by_profile

        candidates = [pl.Candidate("all", full)]
        settings: dict[str, tuple[bool, str]] = {"all": (self.per_channel, self.format)}
        heavy = [op for op in op_types if op in pl.HEAVY_OPS]
        # What each candidate was asked for, so that a region equal to another (e.g. the head is also the first conv)
        # is not built, checked and timed twice. A region is derived from a model with the same op types and fewer
        # FP32 nodes (_build: milliseconds, where ORT's quantizer took 0.1-0.2 s).
        requested = {(frozenset(op_types), frozenset(exclude), self.per_channel, self.format)}

        partial: set[str] = set()  # the candidates that keep a region FP32
        profiled: dict[str, Any] = {}  # the profile-guided candidate's record

        def add(label: str, ops: list[str], skip: list[str], per_channel: bool | None = None,
                fmt: str | None = None, region: bool = False) -> None:
            nonlocal build_seconds
            if region:
                partial.add(label)
            setting = (self.per_channel if per_channel is None else per_channel, fmt or self.format)
            key = (frozenset(ops), frozenset(skip), *setting)
            if len(candidates) >= self.max_candidates or label in settings or key in requested:
                return
            requested.add(key)
            settings[label] = setting
            start = time.perf_counter()
            try:
                model, derived = self._build(proto, ranges, reduce_range, ops, skip, per_channel, fmt)
            except Exception as exc:  # noqa: BLE001 - a candidate ORT cannot build is reported, not fatal
                candidates.append(pl.Candidate(label, None, rejected=f"could not be built: {exc}"[:200]))
                return
            finally:
                build_seconds += time.perf_counter() - start
            if not _quantized_nodes(model, setting[1]):  # ORT's writer left every node float (see _rewrite's retry)
                candidates.append(pl.Candidate(label, None, rejected="no node int8: nothing to gain over FP32"))
                return
            candidates.append(pl.Candidate(label, model))
            if derived:
                derived_labels.append(label)

        def add_profiled() -> None:
            """The candidate keeping FP32 the heavy nodes that ORT's profiler finds slower in the whole int8 model
            ("all") than in FP32 at the search's settings (:mod:`~onnxopt.passes.quantize.node_profile`); the
            record (``profiled``) says what was found, or why nothing was built."""
            source = candidates[0]
            if not self.profile_split or source.model is None or not heavy:
                return
            profiled["source"] = source.label
            if len(candidates) >= self.max_candidates:
                profiled["skipped"] = f"max_candidates ({self.max_candidates}) reached"
                return
            if proto_tensor_bytes(fp32) >= pl.FILE_FROM_BYTES:  # its sessions read files: no serialized copy here
                profiled["skipped"] = "large model"
                return
            start = time.perf_counter()
            order = [n.name for n in proto.graph.node if n.op_type in heavy and n.name and n.name not in exclude]
            profile_at = pl.search_settings(fp32, shapes, threads)
            try:
                keep, gains = fp32_nodes_by_profile(fp32, source.model, order, profile_at)
            except Exception as exc:  # noqa: BLE001 - a profile that fails leaves the other candidates
                profiled["error"] = f"{type(exc).__name__}: {exc}"[:200]
                return
            finally:
                profiled["seconds"] = round(time.perf_counter() - start, 3)
            profiled["fp32_nodes"] = keep
            profiled["slower_in_int8"] = sum(1 for gain in gains.values() if gain < 0)
            if keep and len(keep) < len(order):
                per_channel, fmt = settings[source.label]
                add(f"{source.label}{_PROFILED}", op_types, sorted(set(exclude) | set(keep)), per_channel, fmt,
                    region=True)

        def add_regions() -> None:
            if heavy and set(heavy) != set(op_types):
                add("conv_gemm_matmul", heavy, exclude)
            if heavy and self.per_channel and self.format == "qdq":
                add("conv_gemm_matmul_per_tensor", heavy, exclude, per_channel=False)
            base, base_ops = ("conv_gemm_matmul", heavy) if set(heavy) != set(op_types) else ("all", op_types)
            regions = {label: nodes for label, nodes in pl.regions(proto, heavy).items()
                       if nodes and not set(nodes) <= set(exclude)}
            for label, nodes in regions.items():
                add(f"{base}_fp32_{label}", base_ops, sorted(set(exclude) | set(nodes)), region=True)
            union = sorted(set(exclude).union(*regions.values())) if len(regions) > 1 else []
            if union and len(union) < len([n for n in proto.graph.node if n.op_type in heavy]):
                add(f"{base}_fp32_{'+'.join(regions)}", base_ops, union, region=True)
            if self.format == "qdq" and heavy and "depthwise" in regions:  # int8 depthwise: the usual x86 loss
                add("qoperator_fp32_depthwise", op_types, sorted(set(exclude) | set(regions["depthwise"])),
                    fmt="qoperator", region=True)

        specs = input_specs(model)
        feeds = []
        for batch in self.context.calib.iter_batches(specs, batch_size=1):
            feeds.append(batch.inputs)
            if len(feeds) >= pl.AGREEMENT_SAMPLES:
                break
        threads, provider = self.context.threads, self.context.provider
        shapes = dict(self.context.input_shapes) or (
            {name: tuple(shape) for name, shape in zip([s.name for s in specs], [feeds[0][s.name].shape for s in specs])}
            if feeds else {})
        trial = pl.Trial(fp32, feeds, threads, provider, shapes, budget, evaluator, self.context.budgets)
        # Whole-model candidates first; regions kept FP32 only when those are not clearly faster than FP32 (or
        # always, with placement_search=full): on a CPU where int8 pays, the partial placements were slower than
        # the whole model on every benchmark net, and building each one costs ORT's quantizer a full run.
        if self.format == "qdq" and heavy:
            add("qoperator", op_types, exclude, fmt="qoperator")
        # The profile-guided split goes with the whole models: on the example and MobileNetV2 it kept the first
        # three convs FP32 and was 1.06x-1.11x the whole int8 models on their slowest settings, on MnasNet it was
        # the one candidate not slower than FP32 at any setting (reports/profiled_split.md).
        add_profiled()
        if self.placement_search == "full":
            add_regions()
        fp32_ms = trial.time(candidates)
        chosen = trial.pick(candidates, fp32_ms)
        best = chosen.gain if chosen is not None else 0.0
        staged = self.placement_search == "staged" and best >= pl.WHOLE_MODEL_ENOUGH
        checked_first = False
        if self.placement_search == "staged" and not staged:
            # Whole models fast enough but failing their checks (PaddleOCR's v4 models): the regions' checks go
            # before their timing, since a failing check stops within a few samples (pl.PrefixCheck) where a race
            # times every model up to 30 rounds; only those that pass are raced. Not with an accuracy budget,
            # whose check evaluates the whole labelled set.
            checked_first = budget is None and any(c.vetted and c.rejected for c in candidates)
            add_regions()
            if checked_first:
                for cand in candidates:
                    trial.vet(cand)
            # every candidate timed again, together: one round-robin run decides (FP32's first timing stands when
            # every region failed its check: there is nothing to time it against)
            fp32_ms = trial.time(candidates) or (fp32_ms if checked_first else None)
            chosen = trial.pick(candidates, fp32_ms)
        fallback: dict[str, Any] | None = None
        if chosen is None and self.mixed_fallback and heavy and fp32_ms and any(
                c.rejected and c.sqnr_db is not None for c in candidates):  # faster ones, dropped by their checks
            base = "conv_gemm_matmul" if set(heavy) != set(op_types) else "all"
            try:
                found, fallback = self._mixed_fallback(proto, ranges, reduce_range, heavy, exclude, trial, base)
            except Exception as exc:  # noqa: BLE001 - a last resort that fails leaves the FP32 verdict, not a crash
                found, fallback = [], {"error": f"{type(exc).__name__}: {exc}"[:300]}
                self.note(f"mixed-precision fallback failed ({fallback['error']}); the search's verdict stands")
            for cand in found:
                candidates.append(cand)
                partial.add(cand.label)
                settings[cand.label] = (self.per_channel, self.format)
            if found:
                fp32_ms = trial.time(candidates)
                chosen = trial.pick(candidates, fp32_ms)
        confirmations: list[dict[str, Any]] = []
        head_to_head: list[dict[str, Any]] = []
        worst_setting: dict[str, Any] = {}

        def confirm(cand: pl.Candidate, deployed: bool = True) -> bool:
            """A second, two-model run against FP32 (one burst of load on a shared machine cannot pick a winner),
            then the other settings (as deployed too unless ``deployed`` is False: :func:`confirm_deployed` does
            that one later); False, with ``cand`` rejected, when it fails either."""
            timed: dict[str, pl.Timing | None] = {}

            def next_race() -> pl.Ratios:
                again = pl.time_models({pl.FP32: fp32, cand.label: cand.model}, threads, shapes)
                timed.update(fp32=again.get(pl.FP32), cand=again.get(cand.label))
                return pl.ratios(timed["fp32"], timed["cand"])

            passed, (ratio, best_run), skipped = pl.confirmation(next_race)
            fp32_again, cand_again = timed["fp32"], timed["cand"]
            confirmations.append({"label": cand.label, "fp32_ms": fp32_again and fp32_again.median_ms,
                                  "median_ms": cand_again and cand_again.median_ms, "speedup": ratio,
                                  "best_run_speedup": best_run})
            if skipped:
                confirmations[-1]["inconclusive"] = skipped
            if not passed:
                trial.reject(cand, f"not confirmed: {_speeds(ratio, best_run)} when timed again"
                             + _run_again(skipped))
                return False
            slower = self._slower_elsewhere(fp32, cand, shapes, threads, confirmations[-1], deployed=deployed)
            if slower is not None:
                trial.reject(cand, f"slower than FP32 at {slower}")
            return slower is None

        def confirm_deployed(cand: pl.Candidate) -> bool:
            """The check as deployed of a candidate :func:`confirm` ran without it (added to its record)."""
            record = next(c for c in reversed(confirmations) if c["label"] == cand.label)
            slower = self._slower_elsewhere(fp32, cand, shapes, threads, record, pairs=False)
            if slower is not None:
                trial.reject(cand, f"slower than FP32 at {slower}")
            return slower is None

        # one more try where there is a profile-guided split: the whole models can fail at batch 8 (MnasNet) and
        # use up the tries before the split that keeps their losing nodes FP32 gets one
        tries = pl.CONFIRMATIONS + (1 if any(c.label.endswith(_PROFILED) for c in candidates) else 0)
        while chosen is not None:
            if len(confirmations) >= tries:
                chosen = None  # the tries are spent: stay FP32 rather than trust an unconfirmed timing
                break
            # A region kept FP32 must also beat the fastest whole int8 model that passes its checks, head to head:
            # a near-tie in the race goes to fewer FP32 nodes (on ResNet a first+head-FP32 candidate won a race by
            # noise, and the benchmark measured it slower than the whole int8 model at every setting).
            # (the profile-guided split meets its whole rival after the loop, on its slowest setting: it is chosen
            # for being faster everywhere, not at batch 1 alone). A whole model other than the every-op one ("all")
            # must beat that one so, too (Trial.reference_rival).
            rival = None if chosen.label.endswith(_PROFILED) else (trial.whole_rival(chosen, candidates, partial)
                                                                   or trial.reference_rival(chosen, candidates))
            if rival is not None:
                ratio, medians = pl.ratio_between(rival.label, rival.model, chosen.label, chosen.model, threads,
                                                  shapes)
                head_to_head.append({"label": chosen.label, "rival": rival.label, "speedup": ratio})
                if medians.get(rival.label) and (ratio is None or ratio < pl.MIN_SPEEDUP):  # untimed rival: no reason
                    trial.reject(chosen, f"not faster than {rival.label} head to head"
                                 + (f" ({ratio:.2f}x)" if ratio is not None else ""))
                    chosen = trial.pick(candidates, fp32_ms)
                    continue
            if confirm(chosen):
                break
            chosen = trial.pick(candidates, fp32_ms)

        def slowest_settings(cands: list[pl.Candidate]) -> tuple[dict[str, float], dict[str, str]]:
            """Each candidate's slowest speed-up over FP32 across the search's settings (by median or by fastest
            run), from one race per setting of FP32 and all of them together: load on a shared machine then slows
            them alike, where their confirmations, each a race of its own, can land in different spells of it.
            Also, per candidate, the first setting where that race finds it slower than FP32
            (``placement.race_verdict``), as "batch 8: 0.93x (fastest run 0.95x)"."""
            worst = {c.label: float("inf") for c in cands}
            slower: dict[str, str] = {}
            for label, setting_shapes, setting_threads in pl.labelled_settings(fp32, shapes, threads):
                models = {pl.FP32: fp32, **{c.label: c.model for c in cands if c.model is not None}}
                timings = pl.time_models(models, setting_threads, setting_shapes)
                for cand in cands:
                    pair = pl.ratios(timings.get(pl.FP32), timings.get(cand.label))
                    worst[cand.label] = min(worst[cand.label], *pair)
                    if pl.race_verdict(*pair) == "slower":
                        slower.setdefault(cand.label, f"{label}: {_speeds(*pair)}")
            return worst, slower

        if chosen is not None:
            chosen = self._faster_everywhere(chosen, candidates, partial, trial, confirm, confirm_deployed,
                                             confirmations, worst_setting, slowest_settings)

        profiled_text = ("; the profile-guided split was tried" if any(c.label.endswith(_PROFILED) for c in candidates)
                         else "")
        self.details["placement"] = {
            "fp32_ms": fp32_ms, "chosen": chosen.label if chosen else pl.FP32,
            "search": (f"staged: the whole-model candidates were {best:.2f}x FP32 (>= {pl.WHOLE_MODEL_ENOUGH}x), so "
                       f"no heuristic region was kept FP32{profiled_text}" if staged else self.placement_search),
            "candidates": [c.to_dict() for c in candidates], "agreement_samples": len(feeds),
            "agreement_checked": ("for the region candidates before their timing (the whole-model ones failed "
                                  "theirs), else " if checked_first else "") + "only for candidates fast enough to "
                                 "be chosen, fastest first",
            "agreement_measure": trial.check,
            # building the candidates vs the rest (sessions, timing, agreement checks, confirmations)
            "derived": derived_labels,
            "seconds": {"build": round(build_seconds, 3),
                        "measure": round(time.perf_counter() - started - build_seconds, 3)},
            "confirmations": confirmations, "head_to_head": head_to_head,
        }
        if profiled:
            self.details["placement"]["profiled"] = profiled
        if worst_setting:
            self.details["placement"]["worst_setting"] = worst_setting
        if fallback is not None:
            self.details["placement"]["mixed_fallback"] = fallback
        parts = [f"fp32 {fp32_ms:.3f} ms" if fp32_ms else "fp32 not timed"]
        for cand in candidates:
            if cand.median_ms is not None and cand.speedup is not None:
                text = f"{cand.label} {cand.median_ms:.3f} ms ({_speeds(cand.speedup, cand.best_run_speedup)}"
            else:
                text = f"{cand.label} ("
            text += f", {cand.check_text()}" if cand.check_text() else ""
            text += f", dropped: {cand.rejected}" if cand.rejected else ""
            parts.append(text.replace("(, ", "(") + ")")
        check = CHECK_NAMES[trial.check]
        self.note("placement candidates (batch 1, median ms; speed-up over FP32 by median and by fastest run, "
                  f"faster by either counts; {check} with FP32 checked "
                  + ("for the regions before their timing (the whole-model candidates failed theirs), else " if
                     checked_first else "") + "only for a candidate fast enough to be chosen): " + "; ".join(parts)
                  + (f" (staged search: regions not tried, whole model {best:.2f}x FP32{profiled_text})" if staged
                     else ""))
        if chosen is None:
            gains = [c.gain for c in candidates if c.rejected is None and c.speedup is not None]
            if worst_setting.get("kept") == pl.FP32:
                why = f"no int8 finalist stayed not slower than FP32 at every setting ({worst_setting['why']})"
            elif confirmations:
                why = (f"no int8 candidate stayed faster than FP32 when timed again ("
                       + ", ".join(f"{c['label']} {_speeds(c['speedup'], c.get('best_run_speedup'))}"
                                   + _run_again(c.get("inconclusive", [])) + _elsewhere(c) for c in confirmations)
                       + ")")
            elif gains:
                why = f"int8 is slower than FP32 on this CPU (best candidate {max(gains):.2f}x)"
            else:
                why = "no int8 candidate both meets the accuracy checks and could be timed"
                checked = [c for c in candidates if c.rejected and (c.agreement is not None or c.sqnr_db is not None)]
                if checked:  # the fastest one that failed its check, and why
                    first = min(checked, key=lambda c: c.median_ms or float("inf"))
                    speeds = _speeds(first.speedup, first.best_run_speedup)
                    why += f" (fastest: {first.label}, {speeds}, {first.rejected})"
            self.note(f"verdict: {why}; kept the model in FP32")
            self.details["placement"]["verdict"] = f"{why}; kept the model in FP32"
            return None
        mine = [c for c in confirmations if c["label"] == chosen.label]
        last = mine[-1] if mine else {"speedup": chosen.speedup, "best_run_speedup": chosen.best_run_speedup}
        self.note(f"verdict: kept {chosen.label} ({_speeds(chosen.speedup, chosen.best_run_speedup)} FP32, "
                  f"{_speeds(last['speedup'], last['best_run_speedup'])} when timed again"
                  + (_run_again(last.get("inconclusive", [])) + _elsewhere(last) if mine else "") + ")"
                  + (f"; {worst_setting['why']}" if worst_setting.get("why") else ""))
        self.details["placement"]["verdict"] = f"kept {chosen.label}"
        assert chosen.model is not None
        per_channel, fmt = settings[chosen.label]
        return chosen.model, per_channel, fmt

    def _mixed_fallback(self, proto: onnx.ModelProto, ranges: dict[str, Any], reduce_range: bool, heavy: list[str],
                        exclude: list[str], trial: pl.Trial, base: str
                        ) -> tuple[list[pl.Candidate], dict[str, Any]]:
        """The fewest most sensitive layers kept FP32 that let a ``heavy``-only candidate pass the trial's checks
        (:mod:`onnxopt.passes.quantize.mixed_fallback`), bisected in two orders: the simulated sensitivity table's
        (one layer fake-quantized at a time) and, below the number that order needed, the noise each layer adds
        in the all-int8 model (:func:`sensitivity.added_noise_ranking`; on PaddleOCR's v4 detector 16 layers FP32
        where the table's order needed 22, on the recognizer none below the table's 11). The candidates found,
        vetted, go to the timing together: fewer FP32 layers are not always faster. Returns them and the record
        of the search for the report."""
        from onnxopt.passes.quantize import mixed_fallback as mf
        from onnxopt.passes.quantize import placement as pl
        from onnxopt.passes.quantize.sensitivity import added_noise_ranking

        started = time.perf_counter()
        weight_bytes = proto_tensor_bytes(proto)
        if weight_bytes > mf.MAX_WEIGHT_BYTES:
            why = (f"skipped: {weight_bytes / 1e6:.0f} MB of weights (its ranking makes one session of the whole "
                   f"model per layer; above {mf.MAX_WEIGHT_BYTES >> 20} MiB that takes minutes); exclude_nodes or "
                   "max_fp32_layers keep chosen layers FP32")
            self.note(f"mixed-precision fallback {why}")
            return [], {"skipped": why}
        feeds = trial.feeds[:mf.RANKING_SAMPLES]
        ranking = [row["node"] for row in self.details.get("sensitivity", [])]  # the budget search's, when it ran
        ranked_on = "the sensitivity table"
        if not ranking:
            table = self._sensitivity(proto, ranges, reduce_range, heavy, exclude, feeds, None)
            ranking = [row.node for row in table]
            ranked_on = f"simulated per-layer sensitivity on {len(feeds)} calibration samples"
        ranking = [name for name in ranking if name not in exclude]

        def bisect(order: list[str], stem: str, which: str, cap: int) -> tuple[pl.Candidate | None, dict[str, Any]]:
            tried: dict[int, pl.Candidate] = {}

            def passes(k: int) -> bool:
                label = f"{base}_fp32_{stem}_{k}"
                try:
                    model, _ = self._build(proto, ranges, reduce_range, heavy, exclude + order[:k])
                except Exception as exc:  # noqa: BLE001 - like a region ORT cannot build: this k fails
                    tried[k] = pl.Candidate(label, None, rejected=f"could not be built: {exc}"[:200])
                    return False
                tried[k] = cand = pl.Candidate(label, model)
                return trial.vet(cand)

            search = mf.fewest_passing(cap, passes)
            for k, cand in tried.items():
                if k != search.found and cand.rejected is None:
                    trial.reject(cand, "more FP32 layers than needed")  # frees its sessions
            found = tried.get(search.found) if search.found is not None else None
            first = stem == "sensitive"
            lead = "mixed-precision fallback: " + ("every int8 candidate faster than FP32 failed its check" if first
                                                   else "second order")
            if found is not None:
                self.note(f"{lead}; with the {search.found} {which} of {len(order)} layers in FP32 a {base} candidate "
                          f"passes ({found.check_text()}): {', '.join(order[:search.found])}")
            elif cap:
                last = tried[cap]
                tail = f"a {base} candidate with the {cap} {which} of {len(order)} layers in FP32"
                verdict = f"{lead}, and so did {tail}" if first else f"{lead}: {tail} fails too"
                self.note(f"{verdict} ({last.rejected or last.check_text()})")
            return found, {
                "cap": cap, "fp32_layers": order[:search.found] if search.found is not None else None,
                "trials": [{"fp32_layers": k, "passed": ok, "sqnr_db": tried[k].sqnr_db,
                            "agreement": tried[k].agreement, "drop": tried[k].drop} for k, ok in search.trials]}

        found, record = bisect(ranking, "sensitive", f"most sensitive ({ranked_on})", mf.fp32_cap(len(ranking)))
        record["ranking"] = ranked_on
        # The second order, only below what the first needed: it can only add a candidate with fewer FP32 layers.
        cap = len(record["fp32_layers"]) - 1 if found is not None else record["cap"]
        noisiest = None
        if cap >= 1:
            try:
                nodes = {node.name: node for node in proto.graph.node}
                whole, _ = self._build(proto, ranges, reduce_range, heavy, exclude)
                order = added_noise_ranking(proto, whole, [nodes[name] for name in ranking], feeds,
                                            self.context.threads)
                noisiest, record["added_noise"] = bisect(order, "noisiest", "adding the most noise in the all-int8 "
                                                         f"model (on {len(feeds)} calibration samples)", cap)
            except Exception as exc:  # noqa: BLE001 - a second order that cannot be traced leaves the first's result
                record["added_noise"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        record["seconds"] = round(time.perf_counter() - started, 3)
        return [cand for cand in (found, noisiest) if cand is not None], record

    @staticmethod
    def _faster_everywhere(chosen: pl.Candidate, candidates: list[pl.Candidate], partial: set[str], trial: pl.Trial,
                           confirm: Callable[..., bool], confirm_deployed: Callable[[pl.Candidate], bool],
                           confirmations: list[dict[str, Any]], record: dict[str, Any],
                           slowest_settings: Callable[[list[pl.Candidate]], tuple[dict[str, float], dict[str, str]]]
                           ) -> pl.Candidate | None:
        """The winner, or the other of {the profile-guided split, the fastest whole int8 model that passes its
        checks} when that one is confirmed too and, being the split, at least ``MIN_SPEEDUP`` faster than the whole
        model on its slowest setting (batch 1, batch 8, one thread; by median or by fastest run), or, being the whole
        model, not beaten so by the split. The race runs at batch 1, where a whole model can win and then lose at
        batch 8 (MnasNet in reports/profiled_split.md: the whole QOperator model 1.07x FP32 by median and 0.91x by
        fastest run at its slowest setting, the split 1.10x and 0.99x); the latency target is every setting. The two
        slowest settings come from ``slowest_settings`` (both timed with FP32 in one race per setting): read from
        their confirmations, separate races, the example's split (1.30x FP32 at its slowest setting in the
        benchmark, the whole models 1.11x-1.17x) lost to a whole model in three searches of three. The other one
        is timed as deployed (``confirm_deployed``, the dearest check) only once it would be kept: the winner passed
        that check already, and a loser need not. The race of both is one more at every setting: a finalist it finds
        slower than FP32 there (``placement.race_verdict``) is not kept, and with neither left the model stays FP32.
        On MnasNet a whole int8 model that had passed its two races at batch 8 read 0.90x there and was kept
        anyway; the benchmark read it at 0.95x by fastest run at batch 8 / 2 threads (reports/quantization.md, in git
        history). Replayed on the recorded races of the five ``benchmarks/elsewhere_rules.py`` reports, one more
        race after the search's rule at batch 8 and on one thread passed 5 of 223 slower candidates instead of 13
        of 231, and rejected 23 of 848 not slower ones instead of 25 of 1484."""
        from onnxopt.passes.quantize import placement as pl

        if chosen.label.endswith(_PROFILED):
            other = trial.whole_rival(chosen, candidates, partial)
        else:
            other = next((c for c in candidates if c.label.endswith(_PROFILED) and c.rejected is None
                          and c.model is not None and c.median_ms is not None and c.faster and trial.vet(c)), None)
        if other is None:
            return chosen
        confirmed_worst = {chosen.label: _worst_setting(confirmations[-1])}
        record.update(winner=chosen.label, other=other.label)
        if not confirm(other, deployed=False):
            record.update(kept=chosen.label, confirmed_worst=confirmed_worst)
            return chosen
        confirmed_worst[other.label] = _worst_setting(confirmations[-1])
        worst, slower = slowest_settings([chosen, other])
        record["confirmed_worst"] = confirmed_worst
        split, whole = (chosen, other) if chosen.label.endswith(_PROFILED) else (other, chosen)
        preferred = split if worst[split.label] >= pl.MIN_SPEEDUP * worst[whole.label] else whole
        kept: pl.Candidate | None = None
        steps: list[str] = []
        for cand in (preferred, whole if preferred is split else split):
            if cand.label in slower:  # one more race at that setting, and it reads the candidate slower than FP32
                trial.reject(cand, f"slower than FP32 at {slower[cand.label]} in the race of both")
                steps.append(f"{cand.label} {cand.rejected}")
            elif cand is other and not confirm_deployed(other):
                steps.append(f"{other.label} {other.rejected}")
            else:
                kept = cand
                break
        outcome = "; ".join(["then " + step for step in steps] + [f"kept {kept.label if kept else 'FP32'}"])
        record.update(kept=kept.label if kept else pl.FP32, worst=worst, slower=slower,
                      why=f"slowest setting {worst[split.label]:.2f}x for {split.label}, {worst[whole.label]:.2f}x "
                          f"for {whole.label}, timed together: {outcome}")
        return kept

    @staticmethod
    def _slower_elsewhere(fp32: onnx.ModelProto, chosen: pl.Candidate, shapes: dict[str, tuple[int, ...]],
                          threads: int | None, record: dict[str, Any], pairs: bool = True,
                          deployed: bool = True) -> str | None:
        """Time the winner against FP32 at the other settings and, on several threads, as deployed
        (``placement.time_deployed``) (``placement.not_slower_elsewhere``: two races each, three as deployed, one
        inconclusive race run again); the first setting where it is slower by its median or by its fastest run,
        as the latency target is judged ("batch 8: 1.03x (fastest run 0.93x)"), or None. The lower ratios of the
        races that counted go to ``record['elsewhere']`` (medians) and ``record['elsewhere_fastest_run']``, the races
        run again to ``record['elsewhere_inconclusive']``. ``pairs`` / ``deployed`` False: skip the pair races at the
        other settings / the check as deployed."""
        from onnxopt.passes.quantize import placement as pl

        assert chosen.model is not None
        for key in ("elsewhere", "elsewhere_fastest_run", "elsewhere_inconclusive"):
            record.setdefault(key, {})
        settings = [(label, other_shapes, other_threads, pl.time_models, pl.ELSEWHERE_RACES)
                    for label, other_shapes, other_threads in pl.other_settings(fp32, shapes, threads) if pairs]
        if deployed and pl.deployed_check(threads):  # last: the dearest check, for the winners the others passed
            settings.append((pl.DEPLOYED, dict(shapes), threads, pl.time_deployed, pl.DEPLOYED_RACES))
        for label, other_shapes, other_threads, timer, races in settings:
            def next_race(other_shapes: dict[str, tuple[int, ...]] = other_shapes, other_threads: int | None =
                          other_threads, timer: Callable[..., dict[str, pl.Timing]] = timer) -> tuple[float, float]:
                timings = timer({pl.FP32: fp32, chosen.label: chosen.model}, other_threads, other_shapes)
                return pl.ratios(timings.get(pl.FP32), timings.get(chosen.label))

            passed, lowest, skipped = pl.not_slower_elsewhere(next_race, races=races)
            record["elsewhere"][label], record["elsewhere_fastest_run"][label] = lowest
            if skipped:
                record["elsewhere_inconclusive"][label] = skipped
            if not passed:
                return f"{label}: {_speeds(*lowest)}"
        return None

    def _per_channel_axes(self, proto: onnx.ModelProto, op_types: list[str], exclude: list[str],
                          reduce_range: bool) -> dict[str, int]:
        """Weight initializer -> channel axis, for the weights to be stored with one scale per channel."""
        from onnxopt.passes.quantize.weights_prep import per_channel_worth_it, weight_axis

        inits = {init.name: init for init in proto.graph.initializer}
        nodes = [n for n in proto.graph.node if n.op_type in (*HEAVY_OPS, "ConvTranspose") and n.op_type in op_types
                 and n.name not in exclude and len(n.input) > 1 and n.input[1] in inits]
        if self.per_channel_min_gain_db > 0:
            key = (id(proto), reduce_range, tuple(n.name for n in nodes))
            if key not in self._worth_it:
                self._worth_it[key] = per_channel_worth_it(proto, [n.name for n in nodes], reduce_range,
                                                           self.per_channel_min_gain_db)
            axes = self._worth_it[key]
            self.details["per_channel_weights"] = f"{len(axes)}/{len(nodes)}"
            return axes
        axes: dict[str, int] = {}
        for node in nodes:
            ndim = len(inits[node.input[1]].dims)
            if node.op_type == "MatMul" and ndim != 2:
                continue  # ORT's own axis for batched MatMul weights (1) stays its choice
            axis = weight_axis(node, True, ndim)
            if axis is not None:
                axes[node.input[1]] = axis
        return axes

    def _scale_overrides(self, proto: onnx.ModelProto, axes: dict[str, int],
                         reduce_range: bool) -> dict[str, list[dict[str, Any]]]:
        """Per-channel weight scales for ORT, computed once per weight for every candidate built from ``proto``."""
        from onnxopt.passes.quantize.weights_prep import per_channel_scale_overrides

        missing = {name: axis for name, axis in axes.items()
                   if (id(proto), name, axis, reduce_range) not in self._scales}
        for name, rows in per_channel_scale_overrides(proto, missing, reduce_range).items():
            self._scales[(id(proto), name, missing[name], reduce_range)] = rows
        return {name: self._scales[key] for name, axis in axes.items()
                if (key := (id(proto), name, axis, reduce_range)) in self._scales}

    def _where_per_channel_breaks(self, proto: onnx.ModelProto, op_types: list[str], exclude: list[str], qdq: bool,
                                  overrides: dict[str, list[dict[str, Any]]], reduce_range: bool) -> list[str]:
        """Per-tensor scales (QDQ) or float nodes (QOperator) where ORT's per-channel weights fail
        (:func:`~onnxopt.passes.quantize.writer_prep.per_channel_breaks`); ``exclude`` with those nodes."""
        from onnxopt.passes.quantize.weights_prep import per_tensor_scale_overrides
        from onnxopt.passes.quantize.writer_prep import per_channel_breaks

        found = per_channel_breaks(proto, op_types, exclude, "qdq" if qdq else "qoperator")
        if not found:
            return exclude
        nodes = ", ".join(sorted(node for node, _ in found))
        if qdq:
            overrides.update(per_tensor_scale_overrides(proto, [weight for _, weight in found], reduce_range))
            line = (f"{len(found)} grouped ConvTranspose weight(s) per tensor ({nodes}): ORT's QDQ writer cannot "
                    "scale their bias per channel")
        else:
            line = (f"{len(found)} MatMul(s) with a weight of rank 3+ kept float ({nodes}): ORT's QLinearMatMul "
                    "refuses per-channel zero points there (use per_channel=False for int8)")
        if line not in self.notes:
            self.note(line)
        return exclude if qdq else [*exclude, *(node for node, _ in found)]

    def _build(self, proto: onnx.ModelProto, ranges: dict[str, Any], reduce_range: bool, op_types: list[str],
               exclude: list[str], per_channel: bool | None = None, fmt: str | None = None, consume: bool = False
               ) -> tuple[onnx.ModelProto, bool]:
        """ORT's rewrite of ``proto`` for (``op_types``, ``exclude``), and whether it was derived (:meth:`_derive`)
        from one built earlier in this call with the same op types and settings and fewer excluded nodes instead:
        the placement regions and the budget search's bisection steps would each be a run of ORT's quantizer.
        ``consume``: the caller uses ``proto`` no more, and ORT may rewrite it in place (:meth:`_rewrite`)."""
        setting = (self.per_channel if per_channel is None else per_channel, fmt or self.format)
        key = (id(proto), id(ranges), reduce_range, frozenset(op_types), setting)
        skip = frozenset(exclude)
        bases = [(b_skip, model) for b_skip, model in self._built.get(key, []) if b_skip <= skip]
        base_skip, base = max(bases, key=lambda b: len(b[0])) if bases else (None, None)
        if base is not None and base_skip == skip:
            return base, False
        derived = (self._derive(base, base_skip, proto, op_types, exclude)
                   if base is not None and setting[1] == "qdq" else None)
        model = derived if derived is not None else self._rewrite(proto, ranges, reduce_range, op_types, exclude,
                                                                  per_channel=per_channel, fmt=fmt, consume=consume)
        if derived is None:  # bases are ORT's builds only: derived models would just be held in memory longer
            self._built.setdefault(key, []).append((skip, model))
        return model, derived is not None

    def _derive(self, full: onnx.ModelProto, full_exclude: frozenset[str], proto: onnx.ModelProto,
                op_types: list[str], exclude: list[str]) -> onnx.ModelProto | None:
        """What ORT's quantizer builds from ``proto`` for (``op_types``, ``exclude``), derived from ``full`` (its
        QDQ rewrite for the same op types and ``full_exclude``, a subset of ``exclude``) by
        :func:`float_nodes.keep_float`; None: ask ORT instead (tests/test_quantize_fast_paths.py and
        tests/test_fuzz.py check the two give the same model)."""
        if not self.derive_candidates:
            return None
        from onnxopt.passes.quantize.float_nodes import keep_float

        skip = set(exclude)
        int8 = {node.name for node in proto.graph.node if node.op_type in op_types and node.name not in skip}
        return keep_float(full, proto, int8, skip - full_exclude)

    def _rewrite(self, proto: onnx.ModelProto, ranges: dict[str, Any], reduce_range: bool, op_types: list[str],
                 exclude: list[str], per_channel: bool | None = None, fmt: str | None = None,
                 consume: bool = False) -> onnx.ModelProto:
        """ORT's quantizer on ``proto`` with our ranges (it never calibrates); returns the quantized model.

        ORT rewrites the graph it is given in place, so it gets a copy, unless ``consume`` (the caller is done with
        ``proto``, which is then left half rewritten)."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
        from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
        from onnxruntime.quantization.quant_utils import QuantizationMode, QuantType

        from onnxopt.passes.quantize.activation_guard import guard_activation_removal

        guard = guard_activation_removal(proto, ranges, op_types, exclude, fmt or self.format,
                                         self.symmetric_activations)
        ranges, exclude = guard.ranges, [*exclude, *guard.exclude]
        line = guard.describe()
        if line and line not in self.notes:
            self.note(line)
        data = {
            name: TensorData(lowest=np.array(rng.low, dtype=np.float32), highest=np.array(rng.high, dtype=np.float32))
            for name, rng in ranges.items()
        }
        tensors_range = TensorsData(CalibrationMethod.MinMax, data)
        extra: dict[str, Any] = {"ActivationSymmetric": self.symmetric_activations, "WeightSymmetric": True}
        per_channel = self.per_channel if per_channel is None else per_channel
        if per_channel:
            qdq = (fmt or self.format) == "qdq"
            # QOperator: QLinearConv, QGemm and QLinearMatMul weights are per channel (a 2-D MatMul weight along its
            # last axis, as in QDQ); other ops' weights are per tensor
            ops = op_types if qdq else [op for op in op_types if op in ("Conv", "Gemm", "MatMul")]
            axes = self._per_channel_axes(proto, ops, exclude, reduce_range)
            if qdq and self.per_channel_min_gain_db > 0:
                per_channel = False  # ORT takes a per-channel axis per weight as an override of a per-tensor run
            extra["TensorQuantOverrides"] = self._scale_overrides(proto, axes, reduce_range)
            exclude = self._where_per_channel_breaks(proto, ops, exclude, qdq, extra["TensorQuantOverrides"],
                                                     reduce_range)
        common = dict(per_channel=per_channel, reduce_range=reduce_range, weight_qType=QuantType.QInt8,
                      activation_qType=QuantType.QUInt8, tensors_range=tensors_range, nodes_to_quantize=[],
                      nodes_to_exclude=exclude, op_types_to_quantize=op_types, extra_options=extra)
        original_bytes = proto_tensor_bytes(proto)
        qoperator = (fmt or self.format) == "qoperator"
        from onnxopt.passes.quantize.ort_fast import vectorized_weight_quantization

        for attempt in range(_WRITER_RETRIES + 1):
            work = proto
            if not consume or qoperator:  # placement and the budget search reuse the original; so may a retry
                work = onnx.ModelProto()
                work.CopyFrom(proto)
            try:
                with _quiet_ort(), vectorized_weight_quantization():
                    if qoperator:
                        quantizer: Any = ONNXQuantizer(work, mode=QuantizationMode.QLinearOps, static=True, **common)
                    else:
                        quantizer = QDQQuantizer(work, **common)
                    quantizer.quantize_model()
                    quantizer.model.topological_sort()  # ORT sorts only when it saves the file itself
                break
            except RuntimeError as exc:
                # ORT's QOperator writer can leave a tensor that a node it does not convert reads (a Where whose
                # other value is a constant) without the DequantizeLinear of its quantized producer's output: those
                # producers stay float, and it runs again.
                unknown, writers = _left_unknown(exc, proto, op_types, common["nodes_to_exclude"])
                if not qoperator or not writers or attempt == _WRITER_RETRIES:
                    raise
                common["nodes_to_exclude"] = [*common["nodes_to_exclude"], *writers]
                self.note(f"ORT's QOperator writer left {', '.join(unknown)} without a value (no DequantizeLinear for "
                          f"a node it kept float): {', '.join(writers)} kept float")
        result = quantizer.model.model
        if original_bytes >= _REPACK_BYTES:
            # ORT removed the float weights from its copy, but a protobuf message frees its memory only as a whole:
            # a fresh copy holds the int8 model alone (0.6 GB instead of 3 GB for a 2.4 GB MLP).
            packed = onnx.ModelProto()
            packed.CopyFrom(result)
            result = packed
        return result


#: Runs of ORT's QOperator writer after the first, each with the nodes it left reading a missing tensor kept float.
_WRITER_RETRIES = 3


def _left_unknown(error: Exception, model: onnx.ModelProto, op_types: list[str],
                  exclude: list[str]) -> tuple[list[str], list[str]]:
    """From ORT's "Invalid model with unknown initializers/tensors.{...}": the tensors, and the nodes of ``model``
    (of ``op_types``, not in ``exclude``) that write them; nothing for any other error."""
    import ast
    import re

    found = re.search(r"unknown initializers/tensors\.\s*(\{.*\})", str(error))
    if found is None:
        return [], []
    try:
        unknown = sorted(str(name) for name in ast.literal_eval(found.group(1)))
    except (ValueError, SyntaxError):
        return [], []
    skip = set(exclude)
    writers = [node.name for node in model.graph.node if node.name and node.name not in skip
               and node.op_type in op_types and any(name in unknown for name in node.output)]
    return unknown, writers


def _worst_setting(record: dict[str, Any]) -> float:
    """The smallest speed-up over FP32 in a confirmation record: timed again, and at the other settings, by median
    and by fastest run."""
    values = [record.get("speedup"), record.get("best_run_speedup"), *record.get("elsewhere", {}).values(),
              *record.get("elsewhere_fastest_run", {}).values()]
    return min((v for v in values if v is not None), default=0.0)


def _speeds(by_median: float | None, by_best_run: float | None) -> str:
    """"1.35x (fastest run 1.40x)": a speed-up over FP32 by median and by fastest run."""
    text = f"{by_median or 0.0:.2f}x"
    return text + (f" (fastest run {by_best_run:.2f}x)" if by_best_run is not None else "")


def _run_again(races: Sequence[tuple[float, float]]) -> str:
    """" [inconclusive race run again: 1.10x (fastest run 0.93x)]" for each inconclusive race that was run again."""
    return "".join(f" [inconclusive race run again: {_speeds(*race)}]" for race in races)


def _elsewhere(confirmation: dict[str, Any]) -> str:
    """", 1.40x (fastest run 1.35x) at batch 8, ..." from a confirmation record ("" when none was timed), with the
    inconclusive races run again ("[inconclusive race run again: 1.10x (fastest run 0.93x)]")."""
    fastest = confirmation.get("elsewhere_fastest_run", {})
    again = confirmation.get("elsewhere_inconclusive", {})
    return "".join(f", {_speeds(ratio, fastest.get(label))} at {label}"
                   + _run_again(again.get(label, []))
                   for label, ratio in confirmation.get("elsewhere", {}).items())


def _why_normalize(model: ir.Model) -> list[str]:
    """What in ``model`` calls for the normalize pass before quantization (empty: nothing). Only BatchNormalizations
    that normalize can fold count: the others stay unfolded there too, and must not make every run normalize again."""
    from onnxopt.passes.bn_fold import structural_blocker

    reasons = []
    nodes = list(model.graph)
    constants = sum(node.op_type == "Constant" and node.domain in ("", "ai.onnx") for node in nodes)
    if constants:
        reasons.append(f"{constants} Constant node(s), which ORT's quantizer would treat as activations")
    as_inputs = sum(value.is_initializer() for value in model.graph.inputs)
    if as_inputs:
        reasons.append(f"{as_inputs} initializer(s) listed as graph inputs")
    unfolded = sum(node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
                   and structural_blocker(model.graph, node) is None for node in nodes)
    if unfolded:
        reasons.append(f"{unfolded} BatchNormalization(s) after a Conv/Gemm, not folded")
    return reasons


def _with_inferred_shapes(model: ir.Model) -> onnx.ModelProto:
    """The model as ORT's quantizer wants it: value_info inferred, ORT's "onnx.infer" metadata mark set.

    ORT's ``save_and_reload_model_with_shape_infer`` does this through two files on disk; here the inference runs in
    memory, on a copy of the graph without its float weights' bytes (:func:`_infer_shapes_without_weight_bytes`).
    Above the external-data threshold the ir model keeps its tensors mapped from their file and the proto holds a
    copy (over 2 GB: held in memory, never serialized as one message; ORT sessions get it through
    ``modelio.proto_file``).
    """
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    from onnxopt.modelio import internalize, with_tensor_data

    internalize(model)  # ORT's round trip through a temporary folder loses a relative external-data path
    proto = _infer_shapes_without_weight_bytes(with_tensor_data(model))
    add_infer_metadata(proto)
    return proto


#: Float weights above this many bytes: ORT's rewrite is copied into a fresh message (see ``_rewrite``).
_REPACK_BYTES = 256 << 20
#: Above this many bytes of weights the placement search holds sessions of one thread setting at a time.
_ONE_SETTING_BYTES = 1 << 30

#: Initializer types whose bytes shape inference never reads (only their type and dims); integer tensors stay,
#: since inference propagates the values of small shape tensors.
_WEIGHT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                           onnx.TensorProto.BFLOAT16})


def _infer_shapes_without_weight_bytes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes(proto)``, run on a copy without the float initializers' bytes: inference
    serializes the model and parses it back, most of its time on a large model, and never reads those bytes (over
    2 GB it could not serialize them at all). The inferred structure then replaces ``proto``'s own, its initializers
    kept; ``proto`` is changed in place and returned. (tests/test_quantize_fast_paths.py checks the result equals
    plain inference.)"""
    from onnxopt.modelio import copy_fields, without_initializers

    skeleton = without_initializers(proto)
    for init in proto.graph.initializer:
        entry = skeleton.graph.initializer.add()
        if init.data_type in _WEIGHT_TYPES and init.HasField("raw_data"):
            entry.name, entry.data_type = init.name, init.data_type
            entry.dims.extend(init.dims)
        else:
            entry.CopyFrom(init)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    copy_fields(proto, inferred, skip="graph")
    copy_fields(proto.graph, inferred.graph, skip="initializer")
    return proto


def _refuse_quantized(model: ir.Model) -> None:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if is_quantized_op(node.op_type):
            raise BadInputError(
                f"the model is already quantized (node '{node.name}' is a {node.op_type}); quantize its float "
                "original instead"
            )


def _quantized_nodes(model: onnx.ModelProto, fmt: str) -> Counter[str]:
    """Nodes that run on int8 data, by op type, subgraphs (If/Loop bodies) included: consumers of DequantizeLinear
    (QDQ) or QLinear*/Integer ops."""
    nodes = list(all_nodes(model.graph))
    if fmt == "qoperator":
        return Counter(n.op_type for n in nodes
                       if n.op_type.startswith("QLinear") or n.op_type.endswith("Integer") or n.op_type == "QGemm")
    dequantized = {out for n in nodes if n.op_type == "DequantizeLinear" for out in n.output}
    return Counter(
        n.op_type for n in nodes
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
