"""The Python API of the main job: ``onnxopt.optimize(model, recipe=..., calib=..., eval=...)``."""

from __future__ import annotations

import functools
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.budgets import parse_budgets
from onnxopt.errors import BadInputError
from onnxopt.modelio import (as_ir_model, check_model, check_output_path, file_sha256, input_specs, internalize,
                             load_model, save_model, to_proto)
from onnxopt.pipeline.base import OnnxoptPass
from onnxopt.pipeline.context import PassContext
from onnxopt.pipeline.manager import ManagerOptions, PipelineManager
from onnxopt.pipeline.recipe import PassSpec, Recipe
from onnxopt.report.schema import RunReport
from onnxopt.report.writers import write_reports

@dataclass
class OptimizeResult:
    report: RunReport
    ir_model: ir.Model
    output_path: Path | None = None
    report_paths: tuple[Path, ...] = ()
    #: With ``target`` or ``search``: every candidate stage measured (:class:`onnxopt.pipeline.search.SearchOutcome`).
    search: Any = None

    @functools.cached_property
    def model(self) -> onnx.ModelProto:
        """The optimized model as an ONNX proto, made on first use (it copies the weights: 0.3 s on a 269 MB model,
        which the command line never reads)."""
        return to_proto(self.ir_model)

    @property
    def passed(self) -> bool:
        """True when every budget was met (the CLI exits 1 otherwise)."""
        return self.report.passed


def optimize(
    model: str | os.PathLike[str] | onnx.ModelProto | ir.Model,
    recipe: Recipe | str | os.PathLike[str] | Sequence[OnnxoptPass | PassSpec | str | dict[str, Any]] | None = None,
    calib: Any = None,
    eval: Any = None,  # noqa: A002 - the public name the product documents
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    budgets: Sequence[str] | Mapping[str, float] | None = None,
    seed: int | None = None,
    output: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    preprocess: Any = None,
    threads: int | None = None,
    provider: str = "cpu",
    measure_latency: bool = True,
    max_eval_samples: int | None = 2000,
    quiet: bool = True,
    target: str | None = None,
    search: bool = False,
    max_candidates: int = 8,
    cache_dir: str | os.PathLike[str] | None = None,
    plot: bool = True,
) -> OptimizeResult:
    """Run a recipe over ``model``, validating and measuring after every pass.

    ``model`` is never modified: a path is read, a ModelProto/ir.Model is copied. With ``output`` the optimized model
    is written atomically, and the report beside it (``report`` names the JSON; ``.md`` and, unless ``plot`` is
    false, ``.png`` go next to it: matplotlib's import and drawing take about a second).

    With ``target`` ("latency" or "size") or ``search``, every stage is a candidate and the fastest/smallest one
    meeting every budget is kept (:mod:`onnxopt.pipeline.search`); with no ``recipe`` and calibration data the
    recipe is then the end-to-end default (normalize -> prune -> distill -> quantize). ``search`` also varies pass
    parameters over up to ``max_candidates`` recipes and writes ``REPORT.pareto.{json,md,png}``. ``cache_dir``
    reuses pass results across runs (:mod:`onnxopt.pipeline.cache`).
    """
    started = time.perf_counter()
    source_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if output is not None:
        check_output_path(output, *([source_path] if source_path else []))
        if report is not None:
            check_output_path(report, *([source_path] if source_path else []))
    # checked by the pipeline, on the serialization its input snapshot makes (ManagerOptions.check_input_as)
    working = load_model(source_path, check=False) if source_path else _copy(model)
    converted = _runnable(working, source_path)
    plan = _resolve_recipe(recipe)
    shapes = {**plan.input_shapes, **{k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}}
    _check_shape_names(working, shapes)
    run_seed = seed if seed is not None else (plan.seed if plan.seed is not None else 0)
    _seed_everything(run_seed)
    budget_list = parse_budgets(budgets or plan.budgets)

    from onnxopt.calib_data import open_data

    calib_source = open_data(calib, preprocess=preprocess, seed=run_seed, input_shapes=shapes) if calib is not None else None
    eval_source = open_data(eval, preprocess=preprocess, seed=run_seed, input_shapes=shapes) if eval is not None else None
    context = PassContext(calib=calib_source, eval=eval_source, input_shapes=shapes, seed=run_seed,
                          provider=provider, threads=threads, quiet=quiet,
                          budgets={b.name: b.limit for b in budget_list})
    options = ManagerOptions(measure_latency=measure_latency, max_eval_samples=max_eval_samples,
                             cache_dir=str(cache_dir) if cache_dir is not None else None)
    input_info: dict[str, Any] = {"path": str(source_path) if source_path else None}
    if converted:
        input_info["converted"] = converted
    if source_path:
        input_info.update(sha256=file_sha256(source_path), size_bytes=source_path.stat().st_size)
    outcome = None
    if target is not None or search:
        from onnxopt.pipeline.search import run_selection

        if source_path:
            check_model(working, source=str(source_path))
        named = None if recipe is None and calib_source is not None else plan
        outcome = run_selection(working, named, context, options, budget_list, input_info=input_info,
                                target=target or "latency", search=search, max_candidates=max_candidates)
        result = outcome.result
    else:
        options.check_input_as = str(source_path) if source_path else None
        manager = PipelineManager(plan.build(), context, options, budget_list, plan.to_dict())
        result = manager.run(working, input_info=input_info)
    written: list[Path] = []
    out_path = None
    result.report.resources = {"wall_s": round(time.perf_counter() - started, 3), "peak_rss_mb": _peak_rss_mb()}
    if output is not None:
        out_path = save_model(result.model, output, serialized=result.serialized)
        result.report.output = {"path": str(out_path), "sha256": file_sha256(out_path),
                                "size_bytes": out_path.stat().st_size}
        report = report or Path(f"{out_path}.report.json")
    if report is not None:
        json_path = Path(report)
        stem = json_path.with_suffix("") if json_path.suffix == ".json" else json_path
        written = write_reports(result.report, json_path, f"{stem}.md", f"{stem}.png" if plot else None)
        if outcome is not None and search:
            from onnxopt.report.pareto import write_pareto_reports

            written += write_pareto_reports(outcome.to_dict(), stem)
    return OptimizeResult(result.report, result.model, out_path, tuple(written), outcome)


def _runnable(model: ir.Model, source_path: Path | None) -> str | None:
    """A model below ONNX Runtime's opset range, checked as it came and then converted to a runnable opset
    (:func:`onnxopt.passes.opset.make_ort_runnable`): every later step, the reference run included, sees the
    conversion. The note to report, or None."""
    from onnxopt.passes import opset

    if not opset.below_ort_range(model):
        return None
    source = str(source_path) if source_path else "the input model"
    check_model(model, source=source)
    return opset.make_ort_runnable(model, source)


def _resolve_recipe(recipe: Any) -> Recipe:
    if recipe is None:
        return Recipe.default()
    if isinstance(recipe, Recipe):
        recipe.build()
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.from_file(recipe)
    if isinstance(recipe, Mapping):
        return Recipe.from_mapping(dict(recipe), source="python")
    if isinstance(recipe, Iterable):
        plan = Recipe.from_list(recipe)
        plan.build()
        return plan
    raise BadInputError(f"recipe must be a file path, a Recipe or a list of passes, got {type(recipe).__name__}")


def _copy(model: onnx.ModelProto | ir.Model) -> ir.Model:
    if isinstance(model, onnx.ModelProto):
        return as_ir_model(model)
    if isinstance(model, ir.Model):
        copy = model.clone()
        internalize(copy)  # the copy's tensors only: the caller's model keeps its external references
        return copy
    raise BadInputError(f"model must be a path, an onnx.ModelProto or an onnx_ir.Model, got {type(model).__name__}")


def _check_shape_names(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> None:
    names = [spec.name for spec in input_specs(model)]
    for name in shapes:
        if name not in names:
            raise BadInputError(f"--input-shape names input '{name}', but the model's inputs are: {', '.join(names)}")


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory in MB (getrusage: KiB on Linux, bytes on macOS); None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
