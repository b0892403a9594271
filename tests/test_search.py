"""End-to-end optimize: candidate recipes, Pareto fronts, selection under budgets and fallback, CLI options."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from onnxopt.budgets import parse_budgets
from onnxopt.errors import BadInputError
from onnxopt.cli import main
from onnxopt.pipeline import registry
from onnxopt.pipeline.base import OnnxoptPass
from onnxopt.pipeline.recipe import PassSpec, Recipe
from onnxopt.pipeline.search import (
    END_TO_END_PASSES,
    StagePoint,
    choose,
    end_to_end_recipe,
    judge_point,
    pareto_front,
    search_recipes,
)
from onnxopt.report.schema import StepMetrics, StepRecord
from onnx_builders import run


@registry.register
@dataclass
class LossyPass(OnnxoptPass):
    """Negates the last Gemm's weights: every prediction changes (a stand-in for a pass that misses the budget)."""

    name = "test_e2e_lossy"
    exact = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        value = model.graph.initializers["fc.weight"]
        value.const_value = ir.tensor(-value.const_value.numpy())
        return ir.passes.PassResult(model, modified=True)


def needs_pass(name: str) -> None:
    if name not in registry.available():
        pytest.skip(f"pass '{name}' is not registered yet")


def _point(label: str, latency: float | None, size: int, accuracy: float | None, stage: str = "p",
           agreement: float | None = None, macs: int = 100, params: int = 10) -> StagePoint:
    metrics = StepMetrics(size_bytes=size, params=params, macs=macs, num_nodes=1, accuracy=accuracy)
    step = StepRecord(stage, {}, "ok", 0.0, metrics, fidelity_vs_original={"top1_agreement": agreement})
    return StagePoint(label, 0, stage, 1, [], step, None, label, latency_ms=latency)


# ------------------------------------------------------------------------------------------------ pure functions
def test_pareto_front_is_exactly_the_non_dominated_points():
    rng = np.random.default_rng(0)
    points = [_point(f"p{i}", float(rng.uniform(1, 10)), int(rng.integers(1000, 9000)),
                     float(rng.uniform(0.5, 1.0))) for i in range(40)]
    points.append(_point("dup", points[0].latency_ms, 5000, points[0].quality))  # ties do not dominate
    for cost in ("latency", "size"):
        front = pareto_front(points, cost)
        key = (lambda p: p.latency_ms) if cost == "latency" else (lambda p: p.metrics.size_bytes)
        for p in points:
            dominated = any(key(q) <= key(p) and q.quality >= p.quality and (key(q) < key(p) or q.quality > p.quality)
                            for q in points)
            assert (p in front) == (not dominated), p.label
        costs = [key(p) for p in front]
        qualities = [p.quality for p in front]
        assert costs == sorted(costs) and qualities == sorted(qualities)  # faster points are less accurate


def test_points_without_latency_or_quality_are_not_on_the_front():
    points = [_point("a", None, 10, 0.9), _point("b", 1.0, 2, None), _point("c", 2.0, 5, 0.8)]
    assert [p.label for p in pareto_front(points, "latency")] == ["c"]
    assert [p.label for p in pareto_front(points, "size")] == ["c", "a"]


def test_budgets_judged_per_point_and_selection_with_fallback():
    original = _point("input", 10.0, 1000, 0.95, stage="input")
    pruned = _point("prune", 6.0, 600, 0.945)
    quantized = _point("quantize", 3.0, 200, 0.92)  # fastest and smallest, but 3 points lost
    budgets = parse_budgets(["accuracy_drop=0.01", "latency_ratio=0.8"])
    points = [original, pruned, quantized]
    for p in points:
        p.verdicts = judge_point(budgets, original, p)
    assert [v.passed for v in pruned.verdicts] == [True, True]
    assert [v.passed for v in quantized.verdicts] == [False, True]
    assert pruned.verdicts[1].measured == pytest.approx(0.6)
    chosen, reason = choose(points, "latency")
    assert chosen is pruned and "meeting every budget" in reason
    chosen, _ = choose(points, "size")
    assert chosen is pruned
    # nothing meets everything: the one meeting the most budgets, then the fastest
    original_only = [original, _point("a", 12.0, 900, 0.80), _point("b", 5.0, 300, 0.50)]
    for p in original_only:
        p.verdicts = judge_point(budgets, original, p)
    chosen, reason = choose(original_only, "latency")
    assert chosen.label == "b" and "no stage meets every budget" in reason


def test_latency_ties_go_to_the_smaller_file():
    """Within LATENCY_TIE of the fastest (timing noise), --target latency keeps the smaller model."""
    original = _point("input", 1.0, 1000, 0.95, stage="input")
    fp32 = _point("normalize", 0.500, 600, 0.95)
    int8 = _point("quantize", 0.507, 180, 0.95)  # 1.4% slower, 3.3x smaller
    slow = _point("slow", 0.600, 100, 0.95)  # smallest, but clearly slower
    budgets = parse_budgets(["accuracy_drop=0.01"])
    for p in (original, fp32, int8, slow):
        p.verdicts = judge_point(budgets, original, p)
    chosen, reason = choose([original, fp32, int8, slow], "latency")
    assert chosen is int8 and "within 3% of the fastest" in reason
    chosen, _ = choose([original, fp32, slow], "latency")
    assert chosen is fp32


def test_unlabelled_points_use_top1_agreement():
    original = _point("input", 1.0, 100, None, stage="input")
    agree = _point("q", 0.5, 50, None, agreement=0.995)
    verdicts = judge_point(parse_budgets(["accuracy_drop=0.01", "min_top1_agreement=0.99"]), original, agree)
    assert all(v.passed for v in verdicts) and "disagreement" in verdicts[0].note
    assert agree.quality == 0.995 and original.quality == 1.0


def test_selection_without_latency_uses_size():
    a, b = _point("a", None, 300, 0.9), _point("b", None, 100, 0.9)
    chosen, reason = choose([_point("input", None, 500, 0.9, stage="input"), a, b], "latency")
    assert chosen is b and "smallest instead" in reason


def test_end_to_end_recipe_skips_passes_not_registered(monkeypatch):
    monkeypatch.setattr(registry, "available", lambda: ["normalize", "quantize"])
    recipe, notes = end_to_end_recipe()
    assert [s.name for s in recipe.passes] == ["normalize", "quantize"]
    assert any("'prune' is not available" in n for n in notes)
    assert any("'distill' is not available" in n for n in notes)


def test_distill_is_skipped_without_prune(monkeypatch):
    monkeypatch.setattr(registry, "available", lambda: ["distill", "normalize", "quantize"])
    recipe, notes = end_to_end_recipe()
    assert [s.name for s in recipe.passes] == ["normalize", "quantize"]
    assert any("'distill' skipped: it recovers what 'prune' loses" in n for n in notes)


def test_target_size_quantizes_everything_the_budget_allows():
    from onnxopt.pipeline.search import target_overrides

    recipe, _ = end_to_end_recipe(target_overrides("size"))
    if "quantize" in registry.available():
        assert [s.params for s in recipe.passes if s.name == "quantize"] == [{"placement": "all"}]
    assert target_overrides("latency") is None


def test_search_recipes_are_bounded_valid_and_start_with_the_base():
    base = Recipe([PassSpec("normalize"), PassSpec("quantize", {"placement": "all"})], source="test")
    recipes = search_recipes(base, max_candidates=4)
    assert len(recipes) == 4
    assert recipes[0].passes == base.passes
    variations = set()
    for recipe in recipes[1:]:
        recipe.build()  # every candidate is a valid recipe
        (changed,) = [(k, v) for k, v in recipe.passes[1].params.items() if k != "placement"]
        variations.add(changed)
    assert len(variations) == 3  # all different
    assert len(search_recipes(base, max_candidates=1)) == 1
    assert len(search_recipes(base, max_candidates=100)) < 100  # the grid is finite


def test_search_direction_orders_the_cut_axes():
    base = end_to_end_recipe()[0]
    first = {r.source.split(": ", 1)[1] for r in search_recipes(base, 3, "aggressive")[1:]}
    assert first == {"prune.depth=1.0", "prune.macs_ratio=0.7"}  # cut more than the base's 0.5 / 0.5
    first = {r.source.split(": ", 1)[1] for r in search_recipes(base, 3, "conservative")[1:]}
    assert first == {"prune.depth=0.0", "prune.macs_ratio=0.3"}  # cut less
    with pytest.raises(BadInputError, match="prefer"):
        search_recipes(base, 3, "sideways")


# ------------------------------------------------------------------------------------------------ runs
def test_fallback_to_an_earlier_stage_when_the_last_misses(model_path: Path, data_path: Path, tmp_path: Path):
    out = tmp_path / "out.onnx"
    result = onnxopt.optimize(model_path, ["normalize", "test_e2e_lossy"], calib=data_path, eval=data_path,
                              budgets=["accuracy_drop=0.01"], target="latency", output=out)
    report = result.report.to_dict()
    assert [s["name"] for s in report["steps"]] == ["input", "normalize", "test_e2e_lossy", "select"]
    select = report["steps"][-1]
    assert select["details"]["chosen"] == "c0:normalize"
    assert any("fell back from the last stage 'test_e2e_lossy'" in n and "accuracy_drop" in n for n in select["notes"])
    assert report["verdict"]["passed"] is True
    assert select["metrics"]["accuracy"] == 1.0
    feeds = {"input": np.load(data_path)["input"][:4]}
    np.testing.assert_allclose(run(onnx.load(str(out)), feeds)[0], run(onnx.load(str(model_path)), feeds)[0],
                               rtol=1e-4, atol=1e-5)
    assert report["latency_comparison"]["method"].startswith("round-robin")


def test_passing_cuts_are_combined_into_one_candidate():
    from types import SimpleNamespace

    from onnxopt.pipeline.search import CandidateRun, _combined_recipe

    base = end_to_end_recipe()[0]

    def run(source: str, passed: bool) -> CandidateRun:
        recipe = next(r for r in search_recipes(base, 8, "aggressive") if r.source.endswith(source))
        result = SimpleNamespace(report=SimpleNamespace(verdict={"passed": passed}))
        return CandidateRun(1, recipe, result)  # type: ignore[arg-type]

    combined = _combined_recipe(base, [run("prune.depth=1.0", True), run("prune.macs_ratio=0.7", True),
                                       run("prune.criterion=taylor", True)])
    assert combined is not None and "combined" in combined.source
    prune = next(spec for spec in combined.passes if spec.name == "prune")
    assert prune.params["depth"] == 1.0 and prune.params["macs_ratio"] == 0.7  # only the cut axes are combined
    assert prune.params.get("criterion", "l1") == "l1"
    # a cut that missed a budget is not combined; one passing cut alone is no combination
    assert _combined_recipe(base, [run("prune.depth=1.0", True), run("prune.macs_ratio=0.7", False)]) is None


def test_the_deepest_passing_cut_is_pushed_halfway_deeper():
    from types import SimpleNamespace

    from onnxopt.pipeline.search import MAX_PUSHED_MACS_RATIO, CandidateRun, _pushed_recipe

    base = end_to_end_recipe()[0]

    def run(index: int, macs_ratio: float, passed: bool) -> CandidateRun:
        specs = [PassSpec(s.name, {**s.params, "macs_ratio": macs_ratio} if s.name == "prune" else dict(s.params))
                 for s in base.passes]
        result = SimpleNamespace(report=SimpleNamespace(verdict={"passed": passed}))
        return CandidateRun(index, Recipe(specs, base.seed), result)  # type: ignore[arg-type]

    pushed = _pushed_recipe([run(0, 0.5, True), run(1, 0.7, True), run(2, 0.3, False)])
    assert pushed is not None and "candidate 1" in pushed.source
    assert next(s for s in pushed.passes if s.name == "prune").params["macs_ratio"] == 0.85
    assert [s.name for s in pushed.passes] == [s.name for s in base.passes]  # no pass added or removed
    # a deeper cut gets a longer recovery; nothing else changes
    from onnxopt.pipeline.search import PUSHED_DISTILL_STEPS

    distill = next(s for s in pushed.passes if s.name == "distill")
    assert distill.params["min_steps"] == PUSHED_DISTILL_STEPS and "distill.min_steps" in pushed.source
    assert {k: v for k, v in distill.params.items() if k != "min_steps"} == {
        k: v for k, v in next(s for s in base.passes if s.name == "distill").params.items() if k != "min_steps"}
    # a deeper cut that missed bounds the next push: bisect between the deepest pass and the shallowest miss
    bisected = _pushed_recipe([run(0, 0.5, True), run(1, 0.7, True), run(2, 0.85, False)])
    assert bisected is not None
    assert next(s for s in bisected.passes if s.name == "prune").params["macs_ratio"] == 0.775
    assert _pushed_recipe([run(0, 0.7, True), run(1, 0.705, False)]) is None  # no step left
    assert _pushed_recipe([run(0, 0.5, False)]) is None  # nothing passed: nothing to push
    assert _pushed_recipe([run(0, MAX_PUSHED_MACS_RATIO, True)]) is None  # already at the cap


def test_search_of_four_spends_the_last_on_the_combined_cuts(model_path: Path, data_path: Path):
    recipe = ["normalize", {"prune": {"macs_ratio": 0.5, "depth": 0.5, "round_to": 1}}]
    result = onnxopt.optimize(model_path, recipe, calib=data_path, eval=data_path, search=True, max_candidates=4)
    sources = [run.recipe.source for run in result.search.candidates]
    assert len(sources) == 4 and "combined" in sources[-1]
    assert "prune.depth=1.0" in sources[-1] and "prune.macs_ratio=0.7" in sources[-1]


@pytest.mark.parametrize("lossy", [False, True])
def test_search_backs_off_when_the_base_recipe_misses(model_path: Path, data_path: Path, lossy: bool, monkeypatch):
    from onnxopt.pipeline import search as search_module

    seen: list[str] = []
    real = search_module.search_recipes

    def spy(base: Recipe, max_candidates: int = 8, prefer: str = "aggressive") -> list[Recipe]:
        seen.append(prefer)
        return real(base, max_candidates, prefer)

    monkeypatch.setattr(search_module, "search_recipes", spy)
    recipe = ["normalize", *(["test_e2e_lossy"] if lossy else []), {"quantize": {"placement": "all"}}]
    result = onnxopt.optimize(model_path, recipe, calib=data_path, eval=data_path, budgets=["accuracy_drop=0.01"],
                              search=True, max_candidates=2)
    assert seen[-1] == ("conservative" if lossy else "aggressive")
    assert any("tries smaller cuts first" in n for n in result.search.notes) == lossy


def test_search_writes_a_valid_pareto_front_and_reuses_prefixes(model_path: Path, data_path: Path, tmp_path: Path):
    out = tmp_path / "s.onnx"
    result = onnxopt.optimize(model_path, ["normalize", {"quantize": {"placement": "all"}}], calib=data_path,
                              eval=data_path, budgets=["accuracy_drop=0.05"], search=True, max_candidates=3,
                              target="size", output=out)
    summary = json.loads((tmp_path / "s.onnx.report.pareto.json").read_text())
    assert (tmp_path / "s.onnx.report.pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "Pareto" in (tmp_path / "s.onnx.report.pareto.md").read_text()
    assert len(summary["candidates"]) == 3 and all(c["status"] == "ok" for c in summary["candidates"])
    points = {p["label"]: p for p in summary["points"]}
    # normalize ran once: the other candidates' normalize is the same model (one point, from the cache)
    assert points["c0:normalize"]["same_as"] == ["c1:normalize", "c2:normalize"]
    for cost, key in (("latency", "latency_ms"), ("size", "size_bytes")):
        front = [points[label] for label in summary["pareto"][cost]]
        assert front
        for p in front:
            assert not any(q[key] <= p[key] and q["quality"] >= p["quality"]
                           and (q[key] < p[key] or q["quality"] > p["quality"]) for q in points.values())
    chosen = points[summary["chosen"]]
    assert chosen["passed"]
    passing = [p for p in points.values() if p["passed"] and p["label"] != "input"]
    assert chosen["size_bytes"] == min(p["size_bytes"] for p in passing)
    assert result.report.to_dict()["steps"][-1]["name"] == "select"
    assert result.search.chosen.label == summary["chosen"]


def test_cli_search_and_target_options(capsys, model_path: Path, data_path: Path, tmp_path: Path):
    out = tmp_path / "c.onnx"
    code = main(["optimize", str(model_path), "-o", str(out), "--calib", str(data_path), "--eval", str(data_path),
                 "--budget", "accuracy_drop=0.05", "--pass", "normalize", "--pass", "quantize:placement=all",
                 "--target", "size", "--search", "--max-candidates", "2", "--cache-dir", str(tmp_path / "cache"),
                 "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "budget accuracy_drop" in captured.out and "met" in captured.out
    assert f"wrote {out}.report.pareto.md" in captured.out
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["recipe"]["selection"] == {"target": "size", "search": True,
                                             "chosen": report["steps"][-1]["details"]["chosen"]}
    assert main(["optimize", str(model_path), "-o", str(out), "--target", "speed"]) == 2
    assert main(["optimize", str(model_path), "-o", str(out), "--search", "--max-candidates", "0"]) == 2
    capsys.readouterr()


def test_end_to_end_needs_calibration_data(model_path: Path, data_path: Path):
    from onnxopt.errors import BadInputError

    with pytest.raises(BadInputError, match="calibration data"):
        from onnxopt.calib_data import open_data
        from onnxopt.modelio import load_model
        from onnxopt.pipeline.context import PassContext
        from onnxopt.pipeline.manager import ManagerOptions
        from onnxopt.pipeline.search import run_selection

        run_selection(load_model(model_path), None, PassContext(eval=open_data(str(data_path))), ManagerOptions(),
                      [])


def test_default_recipe_with_data_runs_every_registered_stage(model_path: Path, data_path: Path, tmp_path: Path):
    needs_pass("distill")  # the training passes import torch; without them this is the normalize -> quantize case
    recipe, _ = end_to_end_recipe({"distill": {"epochs": 1}})  # still the default recipe (same source), shorter
    result = onnxopt.optimize(model_path, recipe, calib=data_path, eval=data_path, budgets=["accuracy_drop=0.05"],
                              target="latency", output=tmp_path / "e2e.onnx", measure_latency=False)
    report = result.report.to_dict()
    assert report["steps"][0]["name"] == "input" and report["steps"][-1]["name"] == "select"
    first = result.search.candidates[0]  # the full chain (a fallback without pruning may follow it)
    names = ["input"] + [s.name for s in first.result.report.steps[1:]] + ["select"]
    notes = result.search.notes + first.skipped
    dropped = {n.split("pass '")[1].split("'")[0] for n in notes if "continues without" in n or "recovers" in n}
    missing = {n.split("pass '")[1].split("'")[0] for n in notes if "is not available" in n}
    assert set(names[1:-1]) | dropped == set(END_TO_END_PASSES) - missing  # every stage ran, failed, or is missing
    assert missing == set(END_TO_END_PASSES) - set(registry.available())
    assert result.report.to_dict()["verdict"]["passed"]
