"""End-to-end ``optimize``: candidate recipes, every stage measured, Pareto fronts, the stage that meets the budgets.

The default end-to-end recipe (used when calibration data is given and no recipe is named) is normalize -> prune ->
distill (the original model as teacher) -> normalize -> compress (int8-stored weights that run at FP32 speed) ->
quantize (mixed precision under the accuracy budget). Every stage of every
candidate recipe is a point: after the runs, the input and all distinct stage models are timed round-robin in one
benchmark, each point is judged against every budget, and the fastest (``target="latency"``) or smallest
(``target="size"``) point that meets them all is kept - which may be an earlier stage than the last one, and the
report says so. ``search=True`` generates up to ``max_candidates`` recipes that vary pass parameters (pruning ratio
and criterion, calibration method, per-channel weights, layers kept in FP32); shared prefixes come from the pass
cache (:mod:`onnxopt.pipeline.cache`) instead of being recomputed.

Passes that are not registered in this installation are skipped with a note, and a pass that fails inside the
default recipe is dropped from it (with a note) rather than failing the whole run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import onnx_ir as ir

from onnxopt.budgets import Budget, BudgetVerdict, judge
from onnxopt.errors import BadInputError, PassFailedError, RecipeError
from onnxopt.pipeline import registry
from onnxopt.pipeline.context import PassContext
from onnxopt.pipeline.manager import ManagerOptions, PipelineManager, PipelineResult
from onnxopt.pipeline.recipe import PassSpec, Recipe
from onnxopt.report.pareto import describe_recipe
from onnxopt.report.schema import RunReport, StepMetrics, StepRecord

Target = Literal["latency", "size"]
TARGETS: tuple[str, ...] = ("latency", "size")
#: The default recipe when calibration data is given: (pass, parameters beyond the pass's own defaults, applied only
#: where the pass has them). BatchNormalization stays unfolded until distillation has trained the pruned model (on
#: the example, 30% pruning then 5 epochs of KD recovered 10% -> 96% with BN and stayed at 10% with BN folded); the
#: second normalize folds it before quantization. Distillation runs at least 1000 optimizer steps: in
#: reports/end_to_end.md the digits ResNet's depth=1.0 candidate recovered to 97.5% (test) after 300 steps and to
#: 99.0%, the original's accuracy, after 1000. Distillation keeps its last epoch (the cosine schedule has ended at
#: lr 0) and never looks at the eval data the budgets are judged on: selecting the epoch on it made the judged
#: accuracy of every distilled stage optimistic (a digits MnasNet stage kept at 100% validation tested 97.5%). A
#: held-out 10% of the training data picked early epochs instead (reports/epoch_selection.md: digits MobileNetV2 at
#: 90% of MACs cut tested 96.0% vs 99.25% with the last epoch; 110 held-out images, near 100% from early on).
END_TO_END_RECIPE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("normalize", {"fold_batchnorm": False}),
    ("prune", {"macs_ratio": 0.5, "depth": 0.5}),
    ("distill", {"min_steps": 1000, "select_on": "last"}),
    ("normalize", {}),
    ("compress", {}),
    ("quantize", {}),
)
END_TO_END_PASSES: tuple[str, ...] = tuple(dict.fromkeys(name for name, _ in END_TO_END_RECIPE))
END_TO_END_SOURCE = "end-to-end default"
DEFAULT_MAX_CANDIDATES = 8
#: Stages whose latency is within this fraction of the fastest count as equally fast (the round-robin timings of
#: one file timed twice differ by about that much here); among them ``--target latency`` keeps the smallest.
LATENCY_TIE = 0.03
#: ``optimize --example`` without a recipe: the torch-free part of the end-to-end recipe.
EXAMPLE_PASSES: tuple[str, ...] = ("normalize", "compress", "quantize")

#: (pass, parameter, values to try): a value the pass does not accept is left out; a parameter annotated
#: ``Literal[...]`` is searched over its own choices when ``values`` is empty.
SEARCH_AXES: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
    ("prune", "depth", (1.0, 0.0, 0.5)),
    ("prune", "macs_ratio", (0.7, 0.3, 0.5)),
    # before the calibration method: Taylor importance gave the digits MobileNetV2 1.90x at 2x fewer MACs where
    # L1 gave 1.55x, both recovered within a point (reports/pruning.md)
    ("prune", "criterion", ("l1", "taylor", "l2")),
    ("quantize", "method", ("minmax", "entropy", "mse", "percentile")),
    ("quantize", "per_channel", (True, False)),
    ("quantize", "max_fp32_layers", (0, 2, 4)),
    ("quantize", "keep_fp32", ()),
)


# ---------------------------------------------------------------------------------------------------- candidates
def end_to_end_recipe(overrides: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Recipe, list[str]]:
    """The default end-to-end recipe with the passes this installation has, and notes on those it lacks."""
    available = set(registry.available())
    specs, notes = [], []
    for name, defaults in END_TO_END_RECIPE:
        if name not in available:
            if not any(f"'{name}'" in note for note in notes):
                notes.append(f"pass '{name}' is not available in this installation: skipped")
            continue
        params = {**defaults, **dict((overrides or {}).get(name, {}))}
        specs.append(PassSpec(name, {k: v for k, v in params.items() if _accepts(name, k, v)}))
    specs, dropped = _without_orphans(specs)
    notes += dropped
    return Recipe(specs, source=END_TO_END_SOURCE), notes


#: In the default recipe a pass that only repairs what another did: distill recovers the accuracy pruning lost.
RECOVERS: dict[str, str] = {"distill": "prune"}


def _without_orphans(specs: list[PassSpec]) -> tuple[list[PassSpec], list[str]]:
    """Drop what only serves a pass that does not run: distill without prune, and then the first normalize of two
    (it keeps BatchNormalization for training; the second one folds it)."""
    names = {s.name for s in specs}
    orphans = {name for name, cause in RECOVERS.items() if name in names and cause not in names}
    notes = [f"pass '{name}' skipped: it recovers what '{RECOVERS[name]}' loses, and '{RECOVERS[name]}' does not run"
             for name in sorted(orphans)]
    specs = [s for s in specs if s.name not in orphans]
    if not any(cause in names for cause in RECOVERS.values()) and [s.name for s in specs].count("normalize") > 1:
        first = next(i for i, s in enumerate(specs) if s.name == "normalize")
        specs = specs[:first] + specs[first + 1:]
    return specs, notes


def target_overrides(target: str) -> dict[str, dict[str, Any]] | None:
    """Default-recipe parameters that depend on the target: for the smallest file, int8 wherever the accuracy
    budget allows (``placement=all``), even where it is not faster on this CPU."""
    return {"quantize": {"placement": "all"}} if target == "size" else None


def example_recipe() -> Recipe:
    """``optimize --example``: the end-to-end recipe without its training passes (prune, distill), so the README's
    first command runs in seconds and needs no torch; the budget-driven selection applies all the same."""
    return Recipe([PassSpec(name) for name in EXAMPLE_PASSES], source="example (normalize -> compress -> quantize)")


#: Axes along which a larger value cuts more (and risks more accuracy): their variations are ordered by the
#: search's direction (:func:`search_recipes`).
CUT_AXES = frozenset({("prune", "depth"), ("prune", "macs_ratio")})


def search_recipes(base: Recipe, max_candidates: int = DEFAULT_MAX_CANDIDATES,
                   prefer: str = "aggressive") -> list[Recipe]:
    """``base`` first, then one-parameter variations of it, axes interleaved so a small budget spans all of them.

    ``prefer``: on the axes of :data:`CUT_AXES`, "aggressive" tries values that cut more than ``base`` first,
    "conservative" those that cut less (what to try when ``base`` already missed a budget, as NetAdapt backs off)."""
    if max_candidates < 1:
        raise BadInputError(f"max_candidates must be >= 1, got {max_candidates}")
    if prefer not in ("aggressive", "conservative"):
        raise BadInputError(f"prefer must be aggressive or conservative, got {prefer!r}")
    names = [spec.name for spec in base.passes]
    per_axis: list[list[tuple[str, str, Any]]] = []
    for pass_name, param, values in SEARCH_AXES:
        if pass_name not in names:
            continue
        current = _effective_param(base, pass_name, param)
        choices = values or _literal_choices(pass_name, param)
        options = [(pass_name, param, v) for v in choices if v != current and _accepts(pass_name, param, v)]
        if (pass_name, param) in CUT_AXES and isinstance(current, (int, float)):
            more = [o for o in options if o[2] > current]
            less = [o for o in options if o[2] < current]
            options = less + more if prefer == "conservative" else more + less
        if options and _has_param(pass_name, param):
            per_axis.append(options)
    variations: list[tuple[str, str, Any]] = []
    for rank in range(max((len(a) for a in per_axis), default=0)):
        variations += [axis[rank] for axis in per_axis if rank < len(axis)]
    recipes = [Recipe([PassSpec(s.name, dict(s.params)) for s in base.passes], base.seed, dict(base.input_shapes),
                      dict(base.budgets), f"{base.source}, candidate 0")]
    for index, (pass_name, param, value) in enumerate(variations[:max_candidates - 1], start=1):
        specs = [PassSpec(s.name, {**s.params, param: value} if s.name == pass_name else dict(s.params))
                 for s in base.passes]
        recipes.append(Recipe(specs, base.seed, dict(base.input_shapes), dict(base.budgets),
                              f"search candidate {index}: {pass_name}.{param}={value}"))
    return recipes


def _has_param(pass_name: str, param: str) -> bool:
    try:
        cls = registry.get(pass_name)
    except RecipeError:
        return False
    return any(f.name == param and f.init for f in dataclasses.fields(cls))  # type: ignore[arg-type]


def _accepts(pass_name: str, param: str, value: Any) -> bool:
    if not _has_param(pass_name, param):
        return False
    try:
        registry.create(pass_name, {param: value})
    except (RecipeError, BadInputError):
        return False
    return True


def _literal_choices(pass_name: str, param: str) -> tuple[Any, ...]:
    if not _has_param(pass_name, param):
        return ()
    hint = typing.get_type_hints(registry.get(pass_name)).get(param)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _effective_param(recipe: Recipe, pass_name: str, param: str) -> Any:
    for spec in recipe.passes:
        if spec.name == pass_name and param in spec.params:
            return spec.params[param]
    if not _has_param(pass_name, param):
        return None
    return registry.create(pass_name).params().get(param)


# ---------------------------------------------------------------------------------------------------- points
@dataclass
class StagePoint:
    """One model a candidate recipe reached: the input, or the model after one of its passes."""

    label: str
    candidate: int
    stage: str
    step_index: int
    recipe: list[dict[str, Any]]
    step: StepRecord
    model: ir.Model | None = field(default=None, repr=False)
    digest: str = ""
    same_as: list[str] = field(default_factory=list)
    latency_ms: float | None = None
    latency_p90_ms: float | None = None
    #: The point whose timing this one shares: ONNX Runtime runs the same graph for both (see :func:`runtime_key`).
    timed_as: str | None = None
    verdicts: list[BudgetVerdict] = field(default_factory=list)

    @property
    def metrics(self) -> StepMetrics:
        assert self.step.metrics is not None
        return self.step.metrics

    @property
    def quality(self) -> float | None:
        """Top-1 accuracy where labels exist, else top-1 agreement with the input model."""
        if self.metrics.accuracy is not None:
            return self.metrics.accuracy
        if self.stage == "input":
            return 1.0
        return (self.step.fidelity_vs_original or {}).get("top1_agreement")

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "label": self.label, "candidate": self.candidate, "stage": self.stage, "recipe": self.recipe,
            "same_as": self.same_as, "size_bytes": m.size_bytes, "params": m.params, "macs": m.macs,
            "latency_ms": self.latency_ms, "latency_p90_ms": self.latency_p90_ms, "timed_as": self.timed_as,
            "accuracy": m.accuracy,
            "quality": self.quality,
            "top1_agreement": (self.step.fidelity_vs_original or {}).get("top1_agreement"),
            "budgets": [v.to_dict() for v in self.verdicts], "passed": self.passed,
        }


def pareto_front(points: Sequence[StagePoint], cost: str) -> list[StagePoint]:
    """Points no other point beats on both ``cost`` (lower: "latency" or "size") and quality (higher)."""
    usable = [(p, _cost(p, cost), p.quality) for p in points]
    usable = [(p, c, q) for p, c, q in usable if c is not None and q is not None]
    front = []
    for p, c, q in usable:
        dominated = any(c2 <= c and q2 >= q and (c2 < c or q2 > q) for _, c2, q2 in usable)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: _cost(p, cost))  # type: ignore[arg-type, return-value]


def _cost(point: StagePoint, cost: str) -> float | None:
    if cost == "latency":
        return point.latency_ms
    if cost == "size":
        return float(point.metrics.size_bytes)
    raise ValueError(f"unknown cost {cost!r}")


def judge_point(budgets: Sequence[Budget], original: StagePoint, point: StagePoint) -> list[BudgetVerdict]:
    """Every budget for ``point`` against the input, from the measured step (latency from the round-robin run)."""
    first, last = original.metrics, point.metrics
    fidelity = point.step.fidelity_vs_original or {}
    verdicts = []
    for budget in budgets:
        name = budget.name
        if name == "accuracy_drop":
            if first.accuracy is not None and last.accuracy is not None:
                verdicts.append(judge(budget, first.accuracy - last.accuracy))
            elif point.stage == "input":
                verdicts.append(judge(budget, 0.0))
            elif fidelity.get("top1_agreement") is not None:
                verdicts.append(judge(budget, 1.0 - fidelity["top1_agreement"],
                                      "no labels: measured as top-1 disagreement with the original"))
            else:
                verdicts.append(judge(budget, None, "needs labelled evaluation data or a score-vector output"))
        elif name == "latency_ratio":
            if point.latency_ms is not None and original.latency_ms:
                verdicts.append(judge(budget, point.latency_ms / original.latency_ms,
                                      "all candidates timed round-robin in one run"))
            else:
                verdicts.append(judge(budget, None, "latency not measured"))
        elif name == "size_ratio":
            verdicts.append(judge(budget, last.size_bytes / max(first.size_bytes, 1)))
        elif name == "size_mb":
            verdicts.append(judge(budget, last.size_bytes / 1e6))
        elif name == "macs_ratio":
            verdicts.append(judge(budget, last.macs / first.macs if first.macs else None))
        elif name == "params_ratio":
            verdicts.append(judge(budget, last.params / first.params if first.params else None))
        elif name == "min_sqnr_db":
            value = fidelity.get("sqnr_db") if point.stage != "input" else float("inf")
            verdicts.append(judge(budget, value if isinstance(value, (int, float)) else
                                  (float("inf") if value == "inf" else None)))
        elif name == "min_top1_agreement":
            value = 1.0 if point.stage == "input" else fidelity.get("top1_agreement")
            verdicts.append(judge(budget, value, "" if value is not None else "the output is not a score vector"))
        else:
            raise BadInputError(f"unknown budget '{name}'")
    return verdicts


def choose(points: Sequence[StagePoint], target: str) -> tuple[StagePoint, str]:
    """The fastest/smallest point meeting every budget (the input only if no pass stage exists), and why."""
    if target not in TARGETS:
        raise BadInputError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    stages = [p for p in points if p.stage != "input"] or list(points)
    cost_name = target if target == "size" or any(p.latency_ms is not None for p in stages) else "size"

    def order(p: StagePoint) -> tuple[float, float]:
        cost = _cost(p, cost_name)
        return (cost if cost is not None else float("inf"), -(p.quality if p.quality is not None else -1.0))

    passing = [p for p in stages if p.passed]
    what = "fastest" if cost_name == "latency" else "smallest"
    proxy = " (latency not measured: smallest instead)" if cost_name != target else ""
    if passing:
        chosen = min(passing, key=order)
        if cost_name == "latency" and chosen.latency_ms is not None:
            # within timing noise of the fastest, the smaller file wins (an int8 model as fast as its FP32 input)
            close = [p for p in passing if p.latency_ms is not None
                     and p.latency_ms <= chosen.latency_ms * (1.0 + LATENCY_TIE)]
            smallest = min(close, key=lambda p: (p.metrics.size_bytes, p.latency_ms))
            if smallest is not chosen:
                return smallest, (f"smallest of the stages within {LATENCY_TIE:.0%} of the fastest "
                                  f"({chosen.latency_ms:.3f} ms), {len(passing)} stage(s) meeting every budget")
        return chosen, f"{what} of {len(passing)} stage(s) meeting every budget{proxy}"
    chosen = min(stages, key=lambda p: (-sum(v.passed for v in p.verdicts), *order(p)))
    return chosen, f"no stage meets every budget; kept the {what} of those meeting the most{proxy}"


# ---------------------------------------------------------------------------------------------------- running
@dataclass
class CandidateRun:
    index: int
    recipe: Recipe
    result: PipelineResult | None = None
    skipped: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "source": self.recipe.source,
                "passes": [spec.to_dict() for spec in self.recipe.passes],
                "status": "ok" if self.result is not None else "failed", "skipped": self.skipped, "error": self.error}


@dataclass
class SearchOutcome:
    """Everything a selection run measured; ``result`` is the pipeline result to write (the chosen model)."""

    result: PipelineResult
    target: str
    search: bool
    candidates: list[CandidateRun]
    points: list[StagePoint]
    chosen: StagePoint
    reason: str
    notes: list[str]
    latency_config: dict[str, Any] | None
    budgets: list[Budget] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "onnxopt.search", "schema_version": 1, "target": self.target, "search": self.search,
            "chosen": self.chosen.label, "reason": self.reason, "notes": self.notes,
            "budgets": [{"name": b.name, "limit": b.limit} for b in self.budgets],
            "candidates": [c.to_dict() for c in self.candidates],
            "points": [p.to_dict() for p in self.points],
            "pareto": {"latency": [p.label for p in pareto_front(self.points, "latency")],
                       "size": [p.label for p in pareto_front(self.points, "size")]},
            "latency_measurement": self.latency_config,
        }


def run_selection(
    model: ir.Model,
    recipe: Recipe | None,
    context: PassContext,
    options: ManagerOptions,
    budgets: Sequence[Budget],
    *,
    input_info: dict[str, Any] | None = None,
    target: str = "latency",
    search: bool = False,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> SearchOutcome:
    """Run the candidate recipes over ``model`` (not modified), measure every stage, keep the best that fits.

    ``recipe`` None means the default end-to-end recipe (calibration data required); a named recipe is honoured and,
    with ``search``, its parameters are varied. Stage models are kept in memory, one per pass and candidate.
    """
    if target not in TARGETS:
        raise BadInputError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    start = time.perf_counter()
    notes: list[str] = []
    default = recipe is None or recipe.source == END_TO_END_SOURCE
    if recipe is None:
        if context.calib is None:
            raise BadInputError("the end-to-end recipe needs calibration data (--calib)")
        recipe, notes = end_to_end_recipe(target_overrides(target))
    if context.original is None:
        context.original = model.clone()
    run_options = replace(options, keep_stage_models=True)
    with contextlib.ExitStack() as stack:
        if (search or default) and run_options.cache_dir is None:
            # shared prefixes (and the prefix of a recipe re-run without a failed pass) are computed once
            run_options.cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxopt-search-"))
        base = search_recipes(recipe, 1)[0] if search else recipe
        runs = [_run_candidate(0, base, model, context, run_options, budgets, input_info,
                               drop_failing=default or search, default=default)]
        if search and max_candidates > 1:
            # The base recipe first: when it missed a budget, the variations that cut less go before those that
            # cut more (a 2-point drop of the pruned Paddle model is not mended by pruning deeper).
            prefer = "conservative" if _missed(runs[0]) else "aggressive"
            if prefer == "conservative":
                notes.append("the base recipe missed a budget: the search tries smaller cuts first")
            variations = search_recipes(recipe, max_candidates, prefer)[1:]
            # From 4 candidates on, one goes to the passing cuts combined (each alone met the budgets); from 6 on,
            # the last (from 7 on, the last two; from 8 on, the last three) cut deeper than the deepest cut that
            # met them, bisecting towards the shallowest that missed (NetAdapt's next step).
            combine = prefer == "aggressive" and max_candidates >= 4
            pushes = min(MAX_PUSHES, max(0, max_candidates - 5)) if prefer == "aggressive" else 0
            reserved = int(combine) + pushes
            for candidate in variations[:len(variations) - reserved]:
                runs.append(_run_candidate(len(runs), candidate, model, context, run_options, budgets, input_info,
                                           drop_failing=True, default=default))
            spare = variations[len(variations) - reserved:]
            steps = ([lambda: _combined_recipe(base, runs[1:])] if combine else []) + \
                [lambda: _pushed_recipe(runs)] * pushes
            for step in steps:
                candidate = step() or (spare.pop(0) if spare else None)
                if candidate is not None:
                    runs.append(_run_candidate(len(runs), candidate, model, context, run_options, budgets,
                                               input_info, drop_failing=True, default=default))
        fallback = _fallback_recipe(runs[0], budgets) if default and not search else None
        if fallback is not None:
            notes.append("the pruned chain missed a budget: also tried " + describe_recipe(
                [spec.to_dict() for spec in fallback.passes]))
            runs.append(_run_candidate(len(runs), fallback, model, context, run_options, budgets, input_info,
                                       drop_failing=True, default=True))
    finished = [run for run in runs if run.result is not None]
    if not finished:
        raise PassFailedError(runs[0].recipe.passes[0].name if runs[0].recipe.passes else "optimize",
                              "; ".join(r.error or "failed" for r in runs))
    points = _points(finished)
    points[0].model = context.original
    config = _time_points(points, context, options)
    original = points[0]
    for point in points:
        point.verdicts = judge_point(budgets, original, point)
    chosen, reason = choose(points, target)
    for run in runs:
        notes += [f"candidate {run.index}: {text}" if search else text for text in run.skipped]
        if run.error:
            notes.append(f"candidate {run.index} failed: {run.error}")
    result = _final_result(finished, points, chosen, reason, target, search, notes, options, start)
    return SearchOutcome(result, target, search, runs, points, chosen, reason, notes, config, list(budgets))


def _combined_recipe(base: Recipe, runs: Sequence[CandidateRun]) -> Recipe | None:
    """``base`` with the cut-axis changes (:data:`CUT_AXES`) of every variation that met all budgets, when there are
    two or more; None otherwise. Each cut alone kept the accuracy: together they may too, and cut more (the greedy
    step of a coordinate search)."""
    changes: dict[tuple[int, str], Any] = {}
    for run in runs:
        if _missed(run) or len(run.recipe.passes) != len(base.passes):
            continue
        for i, (mine, theirs) in enumerate(zip(base.passes, run.recipe.passes)):
            for param, value in theirs.params.items():
                if (mine.name, param) in CUT_AXES and mine.params.get(param) != value:
                    changes.setdefault((i, param), value)
    if len(changes) < 2:
        return None
    specs = [PassSpec(spec.name, {**spec.params, **{p: v for (i, p), v in changes.items() if i == index}})
             for index, spec in enumerate(base.passes)]
    what = ", ".join(f"{base.passes[i].name}.{p}={v}" for (i, p), v in sorted(changes.items()))
    return Recipe(specs, base.seed, dict(base.input_shapes), dict(base.budgets),
                  f"search candidate (combined): {what}")


#: The deepest MACs cut :func:`_pushed_recipe` proposes, and how many pushed candidates a search spends at most.
#: At 0.9 the digits VGG ran 2.85x and MobileNetV2 2.95x faster within a point: the tiny nets' fixed per-node cost
#: needs cuts that MAC counts would call excessive, and measured accuracy, not the cap, is what should stop them.
MAX_PUSHED_MACS_RATIO = 0.95
#: Three from 8 candidates on: the default search then spends base + depth, MACs and criterion variations +
#: combined + 3 pushes, and the calibration-method variation comes in at 9 (it gave the same model as the base on
#: four of the five digits nets in reports/end_to_end.md, where int8 did not pay and placement kept FP32).
MAX_PUSHES = 3
#: Distillation steps at least, for a pushed (deep) cut: a deeper cut needs longer recovery. At 92.5% of MACs cut,
#: KD with 1000 steps left the digits MobileNetV2 at 98.0% and MnasNet at 97.75% (test), 3000 steps 99.25% (the
#: original's accuracy) and 98.5% (reports/recovery_steps.md).
PUSHED_DISTILL_STEPS = 3000


def _pushed_recipe(runs: Sequence[CandidateRun]) -> Recipe | None:
    """The candidate with the deepest MACs cut that met every budget, cut halfway towards the shallowest deeper cut
    that missed one (towards all MACs when none did: 0.7 -> 0.85; capped at :data:`MAX_PUSHED_MACS_RATIO`), a
    bisection over the cut; None when no pruned candidate met the budgets or no step is left. Latency of the tiny
    digits nets falls slower than their MACs (fixed per-node cost), so the 3x target needs cuts that MAC counts
    alone would call excessive: measured accuracy decides."""
    best: tuple[float, CandidateRun, int] | None = None
    for run in runs:
        if _missed(run):
            continue
        for index, spec in enumerate(run.recipe.passes):
            value = _macs_ratio(spec)
            if value is not None and (best is None or value >= best[0]):
                best = (value, run, index)
    if best is None:
        return None
    value, run, index = best
    missed = [v for r in runs if _missed(r) for v in map(_macs_ratio, r.recipe.passes) if v is not None and v > value]
    pushed = round(min(MAX_PUSHED_MACS_RATIO, (value + min(missed, default=1.0)) / 2), 3)
    if pushed - value < 0.01:
        return None
    specs = [PassSpec(spec.name, {**spec.params, "macs_ratio": pushed} if i == index else dict(spec.params))
             for i, spec in enumerate(run.recipe.passes)]
    longer = ""
    for i, spec in enumerate(specs):
        steps = spec.params.get("min_steps")
        if spec.name == "distill" and (not isinstance(steps, int) or steps < PUSHED_DISTILL_STEPS):
            specs[i] = PassSpec(spec.name, {**spec.params, "min_steps": PUSHED_DISTILL_STEPS})
            longer = f", distill.min_steps={PUSHED_DISTILL_STEPS}"
    return Recipe(specs, run.recipe.seed, dict(run.recipe.input_shapes), dict(run.recipe.budgets),
                  f"search candidate (pushed): candidate {run.index} with prune.macs_ratio={pushed}{longer}")


def _macs_ratio(spec: PassSpec) -> float | None:
    value = spec.params.get("macs_ratio") if spec.name == "prune" else None
    return float(value) if isinstance(value, (int, float)) else None


def _missed(run: CandidateRun) -> bool:
    """Whether a candidate failed or its final model missed a budget."""
    return run.result is None or not run.result.report.verdict.get("passed", True)


def _fallback_recipe(run: CandidateRun, budgets: Sequence[Budget]) -> Recipe | None:
    """The default recipe without pruning (and so without its recovery), when the pruned chain's final model missed
    a budget: quantizing the unpruned model is then the likeliest stage to meet them."""
    if run.result is None or not any(s.name in RECOVERS.values() for s in run.recipe.passes):
        return None
    if run.result.report.verdict.get("passed", True):
        return None
    specs, _ = _without_orphans([s for s in run.recipe.passes if s.name not in RECOVERS.values()])
    return Recipe(specs, run.recipe.seed, dict(run.recipe.input_shapes), dict(run.recipe.budgets),
                  f"{END_TO_END_SOURCE} without pruning")


def _run_candidate(index: int, recipe: Recipe, model: ir.Model, context: PassContext, options: ManagerOptions,
                   budgets: Sequence[Budget], input_info: dict[str, Any] | None, drop_failing: bool,
                   default: bool) -> CandidateRun:
    """Run one recipe; with ``drop_failing`` a failing pass is removed and the recipe re-run (the cache keeps the
    prefix cheap), so one pass that cannot handle this model does not sink the others."""
    run = CandidateRun(index, recipe)
    specs = list(recipe.passes)
    while True:
        current = Recipe(specs, recipe.seed, dict(recipe.input_shapes), dict(recipe.budgets), recipe.source)
        try:
            manager = PipelineManager(current.build(), context, options, budgets, current.to_dict())
            run.result = manager.run(model.clone(), input_info=input_info)
            run.recipe = current
            return run
        except PassFailedError as exc:
            names = [s.name for s in specs]
            if not drop_failing or exc.pass_name not in names:
                if drop_failing:
                    run.error = str(exc)
                    return run
                raise
            run.skipped.append(f"{exc}; the recipe continues without '{exc.pass_name}'")
            specs = [s for s in specs if s.name != exc.pass_name]
            if default:
                specs, orphans = _without_orphans(specs)
                run.skipped += orphans
            if not specs:
                run.error = str(exc)
                return run


def _points(runs: Sequence[CandidateRun]) -> list[StagePoint]:
    """The input once, then each distinct stage model; identical models (shared prefixes) become one point."""
    from onnxopt.pipeline.cache import model_digest

    first = runs[0].result
    assert first is not None
    points = [StagePoint("input", -1, "input", 0, [], first.report.steps[0], None, "input")]
    by_digest: dict[str, StagePoint] = {}
    for run in runs:
        assert run.result is not None
        prefix: list[dict[str, Any]] = []
        seen: dict[str, int] = {}
        for offset, (step, stage_model) in enumerate(zip(run.result.report.steps[1:], run.result.stage_models)):
            prefix = prefix + [{"pass": step.name, "params": dict(step.params)}]
            digest = model_digest(stage_model)
            seen[step.name] = seen.get(step.name, 0) + 1  # a pass that runs twice: c0:normalize, c0:normalize2
            label = f"c{run.index}:{step.name}" + (str(seen[step.name]) if seen[step.name] > 1 else "")
            if digest in by_digest:
                by_digest[digest].same_as.append(label)
                continue
            point = StagePoint(label, run.index, step.name, offset + 1, list(prefix), step, stage_model, digest)
            by_digest[digest] = point
            points.append(point)
    return points


def _time_points(points: Sequence[StagePoint], context: PassContext, options: ManagerOptions) -> dict[str, Any] | None:
    """Input and every stage model, round-robin in one benchmark: the latencies selection and budgets use."""
    if not options.measure_latency:
        return None
    from onnxopt.bench import BenchConfig, benchmark

    original = context.original
    assert original is not None
    shapes = dict(context.input_shapes)
    source = context.eval if context.eval is not None else context.calib
    if not shapes and source is not None:
        from onnxopt.modelio import input_specs

        try:
            shapes = source.sample_shapes(input_specs(original))
        except Exception:  # noqa: BLE001 - shapes are hints; benchmark() says what it cannot run
            shapes = {}
    config = BenchConfig(batch_sizes=(options.latency_batch_size,), threads=(context.threads,),
                         warmup=options.latency_warmup, repeats=2 * options.latency_repeats,
                         provider=context.provider, input_shapes=shapes, seed=context.seed)
    # Stages ONNX Runtime runs as the same graph (weights aside) are timed once: their speed is the same by
    # construction, and timing both would let noise pick between them.
    first_of: dict[str, StagePoint] = {}
    timed: list[StagePoint] = []
    for point in points:
        key = runtime_key(original if point.stage == "input" else point.model)  # type: ignore[arg-type]
        if key in first_of:
            point.timed_as = first_of[key].label
        else:
            first_of[key] = point
            timed.append(point)
    models = [original if p.stage == "input" else p.model for p in timed]
    try:
        report = benchmark(models, config, labels=[p.label for p in timed])  # type: ignore[arg-type]
    except BadInputError as exc:
        return {"note": f"not measured: {exc}"}
    for point in points:
        item = report.result(point.timed_as or point.label, options.latency_batch_size, context.threads)
        if item is not None:
            point.latency_ms, point.latency_p90_ms = item.median_ms, item.p90_ms
    shared = {p.label: p.timed_as for p in points if p.timed_as}
    return {"batch_size": options.latency_batch_size, "threads": context.threads, "repeats": config.repeats,
            "warmup": config.warmup, "method": "input and every stage model interleaved round-robin, one run",
            "timed_as": shared, "skipped": [s._asdict() for s in report.skipped]}


def runtime_key(model: ir.Model) -> str:
    """A digest of the graph ONNX Runtime runs, weight values aside: `compress`'s Cast -> Mul folded (as ORT folds
    it at load) and each initializer reduced to its name, dtype and shape. Two models with the same key run the same
    kernels on the same shapes (a pruned model and its distilled weights; a model and its compressed file)."""
    import hashlib

    from onnxopt.modelio import to_proto
    from onnxopt.passes.compress import expand_weights, has_stored_weights

    if has_stored_weights(model.graph):
        model = model.clone()
        expand_weights(model.graph)
    proto = to_proto(model)
    graph = proto.graph
    shapes = sorted((init.name, tuple(init.dims), init.data_type) for init in graph.initializer)
    del graph.initializer[:]
    del graph.value_info[:]
    digest = hashlib.sha256(graph.SerializeToString())
    digest.update(repr((shapes, sorted((o.domain, o.version) for o in proto.opset_import))).encode())
    return digest.hexdigest()


def _final_result(runs: Sequence[CandidateRun], points: Sequence[StagePoint], chosen: StagePoint, reason: str,
                  target: str, search: bool, notes: list[str], options: ManagerOptions,
                  start: float) -> PipelineResult:
    """The chosen candidate's report plus a ``select`` step (the kept model's figures) and the budget verdicts."""
    run = next(r for r in runs if r.index == chosen.candidate) if chosen.candidate >= 0 else runs[0]
    assert run.result is not None
    report: RunReport = copy.deepcopy(run.result.report)
    model = run.result.stage_models[chosen.step_index - 1] if chosen.step_index else run.result.model
    if chosen.stage == "input":
        assert points[0].model is not None
        model = points[0].model.clone()
    last_stage = len(run.result.stage_models)
    select_notes = [f"kept {chosen.label} ({describe_recipe(chosen.recipe)}): {reason}"]
    if chosen.step_index != last_stage and chosen.stage != "input":
        final = next((p for p in points if p.candidate == chosen.candidate and p.step_index == last_stage), None)
        last_label = f"c{chosen.candidate}:{run.result.report.steps[last_stage].name}"
        if final is not None:
            select_notes.append(f"fell back from the last stage '{final.stage}': " + _why_not(final, chosen, target))
        elif last_label in chosen.same_as:
            select_notes.append(f"the last stage ({last_label}) left the model as {chosen.label} had it")
    select_notes += notes
    points_dicts = [p.to_dict() for p in points]
    details = {
        "target": target, "search": search, "chosen": chosen.label, "reason": reason, "candidates": len(runs),
        "points": points_dicts,
        "pareto_latency": [p.label for p in pareto_front(points, "latency")],
        "pareto_size": [p.label for p in pareto_front(points, "size")],
    }
    report.steps.append(StepRecord(
        "select", {"target": target, "search": search}, "ok", time.perf_counter() - start,
        copy.deepcopy(chosen.metrics), fidelity_vs_previous=None,
        fidelity_vs_original=copy.deepcopy(chosen.step.fidelity_vs_original), notes=select_notes, details=details,
    ))
    original = points[0]
    if original.latency_ms and chosen.latency_ms:
        report.latency_comparison = {
            "input_median_ms": original.latency_ms, "output_median_ms": chosen.latency_ms,
            "input_p90_ms": original.latency_p90_ms, "output_p90_ms": chosen.latency_p90_ms,
            "latency_ratio": chosen.latency_ms / original.latency_ms,
            "speedup": original.latency_ms / chosen.latency_ms, "batch_size": options.latency_batch_size,
            "threads": report.settings.get("threads"), "runs": 2 * options.latency_repeats,
            "method": "round-robin interleaved with every candidate stage, one run",
        }
    report.budgets = [v.to_dict() for v in chosen.verdicts]
    missed = [v for v in chosen.verdicts if not v.passed]
    report.verdict = {
        "passed": not missed,
        "summary": ("all budgets met" if chosen.verdicts else "no budgets given") if not missed
        else "missed: " + "; ".join(v.describe() for v in missed),
    }
    report.recipe = {**report.recipe, "selection": {"target": target, "search": search, "chosen": chosen.label}}
    return PipelineResult(model, report, list(run.result.stage_models))


def _why_not(final: StagePoint, chosen: StagePoint, target: str) -> str:
    missed = [v for v in final.verdicts if not v.passed]
    if missed:
        return "it missed " + "; ".join(v.describe() for v in missed)
    if target == "latency" and final.latency_ms and chosen.latency_ms \
            and final.latency_ms > chosen.latency_ms * (1.0 + LATENCY_TIE):
        return f"it meets the budgets but is slower ({final.latency_ms:.3f} ms vs {chosen.latency_ms:.3f} ms)"
    return f"it meets the budgets but is larger ({final.metrics.size_bytes} vs {chosen.metrics.size_bytes} bytes)"


__all__ = [
    "END_TO_END_PASSES", "EXAMPLE_PASSES", "SEARCH_AXES", "TARGETS", "CandidateRun", "SearchOutcome", "StagePoint",
    "choose", "end_to_end_recipe", "example_recipe", "judge_point", "pareto_front", "run_selection", "runtime_key",
    "search_recipes",
    "target_overrides",
]
