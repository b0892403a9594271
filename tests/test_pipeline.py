"""Pass manager, recipes and the optimize API on small self-built models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from onnxopt.errors import BadInputError, PassFailedError, RecipeError
from onnxopt.modelio import file_sha256
from onnxopt.pipeline import ManagerOptions, OnnxoptPass, PassContext, PipelineManager, Recipe, register
from onnxopt.pipeline.recipe import parse_pass_flag
from onnxopt.passes import NormalizePass
from onnx_builders import conv_classifier


@register
@dataclass
class ScaleWeightsPass(OnnxoptPass):
    """Test pass: multiplies the classifier weight, which changes outputs (lossy unless factor is 1)."""

    name = "test_scale"
    exact = False
    factor: float = 1.0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        value = model.graph.initializers["fc.weight"]
        value.const_value = ir.tensor(value.const_value.numpy() * self.factor, name="fc.weight")
        self.note(f"scaled fc.weight by {self.factor}")
        return ir.passes.PassResult(model, modified=True)


@register
@dataclass
class ExactScalePass(ScaleWeightsPass):
    """Test pass claiming to be exact while changing outputs."""

    name = "test_exact_scale"
    exact = True


@register
@dataclass
class BreakGraphPass(OnnxoptPass):
    """Test pass: wires a node to a value that no node produces, so the checker rejects the model."""

    name = "test_break"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ghost = ir.Value(name="ghost")
        node = ir.node("Relu", [ghost], name="broken_relu")
        model.graph.append(node)
        model.graph.outputs.append(node.outputs[0])
        node.outputs[0].name = "broken_out"
        return ir.passes.PassResult(model, modified=True)


@register
@dataclass
class CrashPass(OnnxoptPass):
    name = "test_crash"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise ZeroDivisionError("boom")


def test_optimize_default_recipe_writes_valid_model_and_reports(model_path: Path, data_path: Path, tmp_path: Path):
    before = file_sha256(model_path)
    out = tmp_path / "out.onnx"
    result = onnxopt.optimize(model_path, calib=data_path, eval=data_path, output=out)
    assert file_sha256(model_path) == before
    assert out.is_file()
    onnx.checker.check_model(onnx.load(str(out)))
    report = result.report.to_dict()
    assert [s["name"] for s in report["steps"]] == ["input", "normalize"]
    normalize = report["steps"][1]
    assert normalize["fidelity_vs_original"]["max_rel_error"] < 1e-4
    assert normalize["fidelity_vs_original"]["top1_agreement"] == 1.0
    assert report["steps"][0]["metrics"]["accuracy"] == 1.0
    assert normalize["metrics"]["op_counts"].get("BatchNormalization", 0) == 0
    assert normalize["metrics"]["size_bytes"] == out.stat().st_size  # from the serialization the checks share
    assert normalize["metrics"]["latency"]["median_ms"] > 0
    assert report["steps"][0]["metrics"]["macs"] == 8 * 3 * 9 * 64 + 8 * 4
    assert sorted(p.name for p in result.report_paths) == ["out.onnx.report.json", "out.onnx.report.md",
                                                           "out.onnx.report.png"]
    data = json.loads((tmp_path / "out.onnx.report.json").read_text())
    assert data["schema"] == "onnxopt.report" and data["schema_version"] == 1
    assert data["output"]["sha256"] == file_sha256(out)
    assert "normalize" in (tmp_path / "out.onnx.report.md").read_text()
    assert (tmp_path / "out.onnx.report.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_latency_shows_size_against_accuracy(model_path: Path, data_path: Path, tmp_path: Path):
    from onnxopt.report.writers import trajectory_points

    result = onnxopt.optimize(model_path, calib=data_path, eval=data_path, output=tmp_path / "out.onnx",
                              measure_latency=False)
    data = result.report.to_dict()
    points, xlabel = trajectory_points(data)
    assert xlabel.startswith("model size, MB")
    assert [name for name, _, _ in points] == ["input", "normalize"]
    assert [x for _, x, _ in points] == [s["metrics"]["size_bytes"] / 1e6 for s in data["steps"]]
    assert [q for _, _, q in points] == [s["metrics"]["accuracy"] for s in data["steps"]]
    assert (tmp_path / "out.onnx.report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_plot_leaves_pyplot_alone(model_path: Path, tmp_path: Path):
    """The plot is drawn on a bare matplotlib Figure: the API never imports pyplot nor switches its backend (which
    closes a notebook user's open figures)."""
    import subprocess
    import sys

    code = ("import sys, onnxopt; onnxopt.optimize(sys.argv[1], ['normalize'], output=sys.argv[2], "
            "measure_latency=False); print('matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(model_path), str(tmp_path / "out.onnx")],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
    assert (tmp_path / "out.onnx.report.png").read_bytes()[:4] == b"\x89PNG"


def test_python_list_recipe_and_in_memory_models(data_path: Path):
    proto = conv_classifier()
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    result = onnxopt.optimize(proto, [NormalizePass(simplify=False), ScaleWeightsPass(factor=2.0)], eval=data_path,
                              measure_latency=False)
    assert proto == copy, "the caller's ModelProto must not be modified"
    steps = result.report.to_dict()["steps"]
    assert [s["name"] for s in steps] == ["input", "normalize", "test_scale"]
    assert steps[2]["notes"] == ["scaled fc.weight by 2.0"]
    assert 0.5 < steps[2]["fidelity_vs_previous"]["max_rel_error"] < 2.0  # logits ~doubled (plus bias)
    assert steps[1]["fidelity_vs_previous"]["max_rel_error"] < 1e-5
    assert isinstance(result.model, onnx.ModelProto)


def test_yaml_toml_and_cli_recipes_are_equivalent(tmp_path: Path):
    (tmp_path / "r.yaml").write_text("passes:\n  - normalize: {min_opset: 14, simplify: false}\n  - test_scale\n")
    (tmp_path / "r.toml").write_text('[[passes]]\nname = "normalize"\nmin_opset = 14\nsimplify = false\n'
                                     '[[passes]]\nname = "test_scale"\n')
    from_yaml = Recipe.from_file(tmp_path / "r.yaml").to_dict()["passes"]
    from_toml = Recipe.from_file(tmp_path / "r.toml").to_dict()["passes"]
    from_cli = Recipe.from_cli(["normalize:min_opset=14,simplify=false", "test_scale"]).to_dict()["passes"]
    assert from_yaml == from_toml
    built = [p.params() for p in Recipe.from_cli(["normalize:min_opset=14,simplify=false"]).build()]
    assert built[0]["min_opset"] == 14 and built[0]["simplify"] is False
    assert [p["pass"] for p in from_cli] == ["normalize", "test_scale"]


def test_pass_flag_values_may_contain_commas():
    spec = parse_pass_flag("normalize:min_opset=13,name_nodes=true")
    assert spec.params == {"min_opset": "13", "name_nodes": "true"}
    assert parse_pass_flag("x:items=a,b,c,k=1").params == {"items": "a,b,c", "k": "1"}


@pytest.mark.parametrize("text, message", [
    ("passes:\n  - nosuchpass\n", "unknown pass 'nosuchpass'"),
    ("passes:\n  - normalize: {bogus: 1}\n", "has no parameter 'bogus'"),
    ("passes:\n  - normalize: {min_opset: many}\n", "normalize.min_opset"),
    ("passes: []\n", "non-empty list"),
    ("steps: [normalize]\n", "'passes'"),
    ("passes: [normalize\n", "cannot be parsed"),
])
def test_bad_recipes_are_refused_before_any_work(tmp_path: Path, text: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        Recipe.from_file(path)


def test_exact_pass_that_changes_outputs_stops_the_run(model_path: Path, data_path: Path, tmp_path: Path):
    out = tmp_path / "out.onnx"
    with pytest.raises(PassFailedError, match="pass 'test_exact_scale' failed.*relative error"):
        onnxopt.optimize(model_path, ["normalize", {"test_exact_scale": {"factor": 3.0}}], eval=data_path,
                         output=out, measure_latency=False)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.onnx*")), "no temporary leftovers"


def test_broken_model_names_pass_and_node(model_path: Path, tmp_path: Path):
    out = tmp_path / "out.onnx"
    with pytest.raises(PassFailedError, match="pass 'test_break' failed.*checker"):
        onnxopt.optimize(model_path, ["test_break"], output=out, measure_latency=False)
    assert not out.exists()


def test_a_pass_that_changes_nothing_reuses_the_evaluation_before_it(model_path: Path, data_path: Path,
                                                                       monkeypatch):
    """test_scale with factor 1 leaves the bytes as they were: one evaluation fewer, a note says so, the figures
    are the previous step's; factor 2 changes them and is evaluated again."""
    from onnxopt.pipeline import manager

    runs = []
    real = manager.collect_outputs

    def spy(*args, **kwargs):
        runs.append(kwargs.get("what"))
        return real(*args, **kwargs)

    monkeypatch.setattr(manager, "collect_outputs", spy)
    result = onnxopt.optimize(model_path, ["normalize", {"test_scale": {"factor": 1.0}},
                                           {"test_scale": {"factor": 2.0}}], eval=data_path, measure_latency=False)
    steps = result.report.to_dict()["steps"]
    assert len(runs) == 3 and "test_scale" in runs[-1]  # input, normalize, the second test_scale
    assert any("byte for byte" in note for note in steps[2]["notes"])
    assert not any("byte for byte" in note for note in steps[3]["notes"])
    assert steps[2]["metrics"] == steps[1]["metrics"] and steps[2]["fidelity_vs_previous"]["max_abs_error"] == 0
    assert steps[3]["fidelity_vs_previous"]["max_abs_error"] > 0


def test_crashing_pass_is_reported_with_its_name(model_path: Path):
    with pytest.raises(PassFailedError, match="pass 'test_crash' failed: ZeroDivisionError: boom"):
        onnxopt.optimize(model_path, ["test_crash"], measure_latency=False)


def test_budgets_met_and_missed(model_path: Path, data_path: Path):
    met = onnxopt.optimize(model_path, ["normalize"], eval=data_path, budgets=["accuracy_drop=0.0", "size_ratio=1.5"])
    assert met.passed
    missed = onnxopt.optimize(model_path, [{"test_scale": {"factor": -1.0}}], eval=data_path,
                              budgets=["accuracy_drop=0.01", "macs_ratio=1.0"], measure_latency=False)
    assert not missed.passed
    verdicts = {v["name"]: v for v in missed.report.to_dict()["budgets"]}
    assert verdicts["accuracy_drop"]["passed"] is False and verdicts["accuracy_drop"]["measured"] > 0.5
    assert verdicts["macs_ratio"]["passed"] is True
    assert "accuracy_drop" in missed.report.verdict["summary"]


def test_budget_without_labels_uses_top1_disagreement(model_path: Path, tmp_path: Path):
    x = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "unlabelled.npz", input=x)
    result = onnxopt.optimize(model_path, ["normalize"], eval=tmp_path / "unlabelled.npz",
                              budgets=["accuracy_drop=0.0"], measure_latency=False)
    verdict = result.report.to_dict()["budgets"][0]
    assert verdict["passed"] and "top-1 disagreement" in verdict["note"]


def test_random_data_is_flagged_synthetic(model_path: Path):
    result = onnxopt.optimize(model_path, measure_latency=False)
    report = result.report.to_dict()
    assert report["data"]["eval"]["synthetic"] is True
    assert any("random inputs" in note for note in report["steps"][0]["notes"])


def test_manager_is_an_onnx_ir_pass(model_path: Path):
    model = ir.load(model_path)
    manager = PipelineManager([NormalizePass(simplify=False)], PassContext(), ManagerOptions(measure_latency=False))
    result = ir.passes.PassManager([manager])(model)
    assert result.modified
    assert manager.report is not None and manager.report.steps[-1].name == "normalize"


def test_output_equal_to_input_is_refused(model_path: Path):
    before = file_sha256(model_path)
    with pytest.raises(BadInputError, match="is the input model"):
        onnxopt.optimize(model_path, output=model_path)
    assert file_sha256(model_path) == before


def test_input_shape_for_unknown_input_is_refused(model_path: Path):
    with pytest.raises(BadInputError, match="inputs are: input"):
        onnxopt.optimize(model_path, input_shapes={"images": (1, 3, 8, 8)})


def test_same_seed_gives_byte_identical_output(model_path: Path, data_path: Path, tmp_path: Path):
    first = onnxopt.optimize(model_path, calib=data_path, output=tmp_path / "a.onnx", measure_latency=False)
    second = onnxopt.optimize(model_path, calib=data_path, output=tmp_path / "b.onnx", measure_latency=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert first.report.to_dict()["steps"][1]["fidelity_vs_original"] == \
        second.report.to_dict()["steps"][1]["fidelity_vs_original"]


def test_output_is_written_from_the_validation_serialization_byte_for_byte(tmp_path, monkeypatch):
    """optimize writes the bytes its validation of the last pass serialized (no second serialization of the model):
    the same file as a fresh deterministic serialization, and ``result.model`` is that model as a proto."""
    from onnxopt import modelio
    from onnxopt.modelio import _save_in_memory, serialized_in_memory

    source = tmp_path / "in.onnx"
    onnx.save(conv_classifier(channels=8, seed=3), str(source))
    serializations: list[Path] = []
    monkeypatch.setattr(modelio, "_save_in_memory", lambda model, target: serializations.append(target))
    result = onnxopt.optimize(str(source), ["normalize"], output=tmp_path / "out.onnx", measure_latency=False)
    assert serializations == []
    _save_in_memory(result.ir_model, tmp_path / "fresh.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == (tmp_path / "fresh.onnx").read_bytes()
    assert result.model.SerializeToString() == serialized_in_memory(result.ir_model)
    assert result.model is result.model  # made once
