"""The pass manager: runs a recipe, validates the model after every pass, measures it, judges the budgets.

It is an onnx-ir pass itself (``PipelineManager(...)(model)`` works like any ``PassManager``); what it adds is what
a product needs between passes: the ONNX checker, an ONNX Runtime load, a numerical comparison against the pass's
input and against the original model on evaluation data, and metrics for the report.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from onnxopt import __version__
from onnxopt.budgets import Budget, BudgetVerdict, judge
from onnxopt.calib_data.base import DataSource
from onnxopt.errors import BadInputError, OnnxoptError, PassFailedError
from onnxopt.modelio import check_model, input_specs, run_checker, serialized_in_memory
from onnxopt.pipeline.base import OnnxoptPass
from onnxopt.pipeline.context import PassContext
from onnxopt.pipeline.evaluation import ModelOutputs, collect_outputs
from onnxopt.report.schema import Latency, RunReport, StepMetrics, StepRecord


@dataclass
class ManagerOptions:
    measure_latency: bool = True
    latency_batch_size: int = 1
    latency_warmup: int = 5
    latency_repeats: int = 20
    #: Evaluation samples used for fidelity and accuracy (None: all of them).
    max_eval_samples: int | None = 2000
    eval_batch_size: int = 16
    #: An ``exact`` pass may not move outputs more than this (max |diff| / max |ref|).
    exact_rtol: float = 1e-3
    #: Reuse pass results from this folder (:mod:`onnxopt.pipeline.cache`); None: no cache.
    cache_dir: str | None = None
    #: Keep a copy of the model after every pass (``PipelineResult.stage_models``) for stage selection.
    keep_stage_models: bool = False
    #: Check the input model (op domains, onnx.checker) before its snapshot, naming it so in errors: for a caller
    #: that loaded it unchecked, the checker then reads the serialization the snapshot makes anyway (on a 269 MB
    #: model, checking at load serialized it once more: 0.4 s).
    check_input_as: str | None = None


@dataclass
class PipelineResult:
    model: ir.Model
    report: RunReport
    #: The model after each pass, in order, when ``ManagerOptions.keep_stage_models`` is set.
    stage_models: list[ir.Model] = field(default_factory=list)
    #: ``model`` serialized (``modelio.serialized_in_memory``) by its validation, for ``save_model``; None when it
    #: was not serialized in one piece.
    serialized: bytes | None = None


@dataclass
class _Snapshot:
    metrics: StepMetrics
    outputs: ModelOutputs


class PipelineManager(ir.passes.PassBase):
    """Run ``passes`` in order; after each one validate and measure; stop with a clear error on the first failure."""

    def __init__(self, passes: Sequence[OnnxoptPass], context: PassContext | None = None,
                 options: ManagerOptions | None = None, budgets: Sequence[Budget] = (),
                 recipe_info: dict[str, Any] | None = None):
        super().__init__()
        self.passes = list(passes)
        self.context = context or PassContext()
        self.options = options or ManagerOptions()
        self.budgets = list(budgets)
        self.recipe_info = recipe_info or {"source": "python", "passes": [
            {"pass": p.name, "params": p.params()} for p in self.passes]}
        self.report: RunReport | None = None
        self._data: DataSource | None = None

    @property
    def in_place(self) -> bool:
        return True

    @property
    def changes_input(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.run(model)
        return ir.passes.PassResult(result.model, modified=len(self.passes) > 0)

    def run(self, model: ir.Model, *, input_info: dict[str, Any] | None = None) -> PipelineResult:
        from onnxopt.hostinfo import host_info

        context = self.context
        serialized = serialized_in_memory(model)
        if self.options.check_input_as is not None:  # before anything else reads the graph (clone() fails on some)
            check_model(model, source=self.options.check_input_as, serialized=serialized)
        if context.original is None:
            context.original = model.clone()
        data = self._data = self._evaluation_data(model)
        report = RunReport(
            input=input_info or {},
            host=host_info().to_dict(),
            settings={
                "seed": context.seed,
                "threads": context.threads,
                "provider": context.provider,
                "input_shapes": {k: list(v) for k, v in context.input_shapes.items()},
                "latency_batch_size": self.options.latency_batch_size,
                "max_eval_samples": self.options.max_eval_samples,
            },
            recipe=self.recipe_info,
            data={},  # filled after the first pass over the data, when streamed sources know their size
            onnxopt_version=__version__,
        )
        self.report = report
        start = time.perf_counter()
        original = self._snapshot(model, data, "the input model", serialized=serialized)
        digest = _digest(serialized)
        del serialized
        converted = [report.input["converted"]] if report.input.get("converted") else []
        report.steps.append(StepRecord("input", {}, "ok", time.perf_counter() - start, original.metrics,
                                       notes=converted + self._input_notes(data) + _memory_notes(model)))
        report.data = {"eval": _describe(data), "calib": _describe(context.calib) if context.calib else None}
        previous = original
        stage_models: list[ir.Model] = []
        cache = self._cache()
        for pass_ in context.progress(self.passes, desc="passes", total=len(self.passes)):
            pass_.bind(context)
            pass_.notes, pass_.details = [], {}
            start = time.perf_counter()
            key = cache.key(pass_, model, context) if cache is not None else None
            if cache is not None and key is None:
                pass_.note("pass cache not used: the model's tensors live in external files")
            hit = cache.load(key) if cache is not None and key is not None else None
            try:
                if hit is not None:
                    model, pass_.notes, pass_.details = hit.model, hit.notes, hit.details
                    pass_.note(f"result reused from the pass cache ({key[:12]}...)")
                else:
                    model = pass_(model).model
            except OnnxoptError as exc:
                if isinstance(exc, (PassFailedError, BadInputError)):
                    raise
                raise PassFailedError(pass_.name, str(exc)) from exc
            except ir.passes.PassError as exc:
                raise PassFailedError(pass_.name, _cause(exc)) from exc
            except Exception as exc:  # a bug or an unsupported graph: say which pass, never a bare traceback
                raise PassFailedError(pass_.name, f"{type(exc).__name__}: {exc}") from exc
            pass_seconds = time.perf_counter() - start
            serialized = serialized_in_memory(model)  # one serialization for the checker, ORT and the size count
            self._validate_structure(pass_, model, serialized)
            new_digest = _digest(serialized)
            same = digest is not None and new_digest == digest  # evaluated as the previous step's model already
            digest = new_digest
            if same:
                pass_.note("the model is byte for byte the one before this pass: its evaluation and metrics reused")
            if cache is not None and hit is None and key is not None:
                problem = cache.store(key, pass_, model)
                if problem:
                    pass_.note(problem)
            if self.options.keep_stage_models:
                stage_models.append(model.clone())
            current = previous if same else self._snapshot(model, data, f"the model after pass '{pass_.name}'",
                                                           pass_.name, serialized)
            vs_previous = previous.outputs.compare(current.outputs)
            vs_original = original.outputs.compare(current.outputs)
            if vs_previous.max_abs_error != vs_previous.max_abs_error or vs_previous.max_abs_error == float("inf"):
                raise PassFailedError(pass_.name, f"output '{vs_previous.worst_output}' has NaN/Inf after this pass")
            if pass_.exact and vs_previous.max_rel_error > self.options.exact_rtol:
                raise PassFailedError(
                    pass_.name,
                    f"changed output '{vs_previous.worst_output}' by a relative error of {vs_previous.max_rel_error:.3g} "
                    f"(allowed {self.options.exact_rtol:g} for a pass that must keep outputs)",
                )
            report.steps.append(StepRecord(
                pass_.name, pass_.params(), "ok", pass_seconds, current.metrics,
                fidelity_vs_previous=vs_previous.to_dict(), fidelity_vs_original=vs_original.to_dict(),
                notes=list(pass_.notes), details=dict(pass_.details),
            ))
            previous = current
        report.latency_comparison = self._compare_latency(context.original, model) if self.passes else None
        verdicts = [self._judge(b, original, previous, report.latency_comparison) for b in self.budgets]
        report.budgets = [v.to_dict() for v in verdicts]
        missed = [v for v in verdicts if not v.passed]
        report.verdict = {
            "passed": not missed,
            "summary": ("all budgets met" if verdicts else "no budgets given") if not missed
            else "missed: " + "; ".join(v.describe() for v in missed),
        }
        return PipelineResult(model, report, stage_models, serialized if self.passes else None)

    # ------------------------------------------------------------------------------------------------------------
    def _cache(self) -> Any:
        if self.options.cache_dir is None:
            return None
        from onnxopt.pipeline.cache import PassCache

        return PassCache(self.options.cache_dir)

    def _evaluation_data(self, model: ir.Model) -> DataSource:
        from onnxopt.calib_data import open_data

        context = self.context
        if context.eval is not None:
            return context.eval
        if context.calib is not None:
            return context.calib
        return open_data("random:8", seed=context.seed, input_shapes=context.input_shapes)

    def _input_notes(self, data: DataSource) -> list[str]:
        if data.synthetic:
            return ["no evaluation data given: fidelity is measured on random inputs (structural check only; "
                    "accuracy cannot be measured)"]
        return []

    def _shape_hints(self, model: ir.Model) -> dict[str, tuple[int, ...]]:
        """Shapes for dynamic dims (MAC counting, latency inputs): as given, else those of the evaluation data."""
        if self.context.input_shapes or self._data is None:
            return dict(self.context.input_shapes)
        try:
            return self._data.sample_shapes(input_specs(model))
        except Exception:  # noqa: BLE001 - shapes are only hints; the data's own errors surface when it is run
            return {}

    def _snapshot(self, model: ir.Model, data: DataSource, what: str, pass_name: str | None = None,
                  serialized: bytes | None = None) -> _Snapshot:
        options = self.options
        try:
            outputs = collect_outputs(model, data, batch_size=options.eval_batch_size,
                                      max_samples=options.max_eval_samples, threads=self.context.threads,
                                      provider=self.context.provider, what=what, serialized=serialized)
        except BadInputError as exc:
            if pass_name is None:
                raise
            raise PassFailedError(pass_name, str(exc)) from None
        metrics = self._metrics(model, outputs, serialized)
        return _Snapshot(metrics, outputs)

    def _metrics(self, model: ir.Model, outputs: ModelOutputs, serialized: bytes | None = None) -> StepMetrics:
        from onnxopt.stats import model_stats

        shapes = self._shape_hints(model)
        stats = model_stats(model, input_shapes=shapes, serialized=serialized)
        metrics = StepMetrics(
            size_bytes=stats.size_bytes, params=stats.params, macs=stats.macs, num_nodes=stats.num_nodes,
            macs_by_op=dict(stats.macs_by_op), op_counts=dict(stats.op_counts), accuracy=outputs.accuracy,
        )
        if self.options.measure_latency:
            from onnxopt.bench import measure_latency

            try:
                result = measure_latency(
                    model, batch_size=self.options.latency_batch_size, threads=self.context.threads,
                    provider=self.context.provider, input_shapes=shapes,
                    warmup=self.options.latency_warmup, repeats=self.options.latency_repeats,
                )
                metrics.latency = Latency(result.median_ms, result.p90_ms, result.batch_size, result.threads,
                                          result.provider)
            except BadInputError as exc:
                metrics.latency_note = f"latency not measured: {exc}"
        else:
            metrics.latency_note = "latency measurement disabled"
        return metrics

    def _compare_latency(self, original: ir.Model, final: ir.Model) -> dict[str, Any] | None:
        """Input vs final model, interleaved round-robin in one run: the ratio the latency budget is judged on.

        Per-step latencies are measured one model at a time and drift with the machine's load; this does not.
        """
        if not self.options.measure_latency:
            return None
        from onnxopt.bench import BenchConfig, benchmark

        shapes = self._shape_hints(original)
        config = BenchConfig(batch_sizes=(self.options.latency_batch_size,), threads=(self.context.threads,),
                             warmup=self.options.latency_warmup, repeats=2 * self.options.latency_repeats,
                             provider=self.context.provider, input_shapes=shapes, seed=self.context.seed)
        try:
            result = benchmark([original, final], config, labels=["input", "output"])
        except BadInputError as exc:
            return {"note": f"not measured: {exc}"}
        if len(result.results) != 2:
            return {"note": "not measured: " + "; ".join(s.reason for s in result.skipped)}
        before, after = result.results
        return {"input_median_ms": before.median_ms, "output_median_ms": after.median_ms,
                "input_p90_ms": before.p90_ms, "output_p90_ms": after.p90_ms,
                "latency_ratio": after.median_ms / before.median_ms, "speedup": before.median_ms / after.median_ms,
                "batch_size": self.options.latency_batch_size, "threads": self.context.threads,
                "runs": before.runs, "method": "round-robin interleaved, one run"}

    def _validate_structure(self, pass_: OnnxoptPass, model: ir.Model,
                            serialized: bytes | None = None) -> None:
        try:
            run_checker(model, serialized)
        except Exception as exc:
            raise PassFailedError(pass_.name, f"the model it produced fails the ONNX checker: {_cause(exc)}") from None

    def _judge(self, budget: Budget, original: _Snapshot, final: _Snapshot,
               comparison: dict[str, Any] | None = None) -> BudgetVerdict:
        first, last = original.metrics, final.metrics
        name = budget.name
        if name == "accuracy_drop":
            if first.accuracy is not None and last.accuracy is not None:
                return judge(budget, first.accuracy - last.accuracy)
            agreement = original.outputs.compare(final.outputs).top1_agreement
            if agreement is None:
                return judge(budget, None, "needs labelled evaluation data or a score-vector output")
            return judge(budget, 1.0 - agreement, "no labels: measured as top-1 disagreement with the original")
        if name == "latency_ratio":
            if comparison and "latency_ratio" in comparison:
                return judge(budget, comparison["latency_ratio"], "input and output timed round-robin in one run")
            if first.latency is None or last.latency is None:
                return judge(budget, None, first.latency_note or last.latency_note)
            return judge(budget, last.latency.median_ms / first.latency.median_ms)
        if name == "size_ratio":
            return judge(budget, last.size_bytes / max(first.size_bytes, 1))
        if name == "size_mb":
            return judge(budget, last.size_bytes / 1e6)
        if name == "macs_ratio":
            return judge(budget, last.macs / first.macs if first.macs else None, "" if first.macs else "no MACs counted")
        if name == "params_ratio":
            return judge(budget, last.params / first.params if first.params else None)
        fidelity = original.outputs.compare(final.outputs)
        if name == "min_sqnr_db":
            return judge(budget, fidelity.sqnr_db)
        if name == "min_top1_agreement":
            return judge(budget, fidelity.top1_agreement, "" if fidelity.top1_agreement is not None
                         else "the output is not a score vector")
        raise BadInputError(f"unknown budget '{name}'")


def _digest(serialized: bytes | None) -> bytes | None:
    """A fingerprint of a serialized model (None for one not serialized in one piece: a large model)."""
    return None if serialized is None else hashlib.blake2b(serialized, digest_size=32).digest()


def _describe(data: DataSource | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {"description": data.description, "samples": data.num_samples(), "labelled": data.has_labels(),
            "synthetic": data.synthetic}


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__


def _memory_notes(model: ir.Model) -> list[str]:
    """The advice of :func:`onnxopt.hugepages.advice` for a large model, when it applies."""
    from onnxopt.hugepages import advice
    from onnxopt.modelio import tensor_bytes

    note = advice(tensor_bytes(model))
    return [note] if note else []


__all__ = ["ManagerOptions", "PipelineManager", "PipelineResult"]

