"""The fast subset of the corpus sweep (benchmarks/corpus.py): foreign exports through every registered pass and the
default recipe: an output that passes the checker, loads in ORT and matches its input on data, or a clear refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def corpus():
    return load_benchmark("corpus.py", "onnxopt_corpus_sweep")


@pytest.fixture(scope="module")
def small_cases(corpus, tmp_path_factory):
    """Three of onnx's torch-converted test models: a depthwise conv, a Linear (Gemm-6, which ORT cannot load: a
    refusal), a BatchNorm; with the sweep's own data files."""
    workdir = tmp_path_factory.mktemp("corpus")
    cases = []
    for name in ("Conv2d_depthwise", "Linear", "BatchNorm2d_eval"):
        path = corpus.ONNX_DATA / "pytorch-converted" / f"test_{name}" / "model.onnx"
        if not path.exists():
            pytest.skip(f"the installed onnx package ships no {path}")
        cases.append(corpus._with_data(corpus.Case(f"pytorch-converted/{name}", str(path), "pytorch-converted"),
                                       workdir, samples=8))
    return workdir, cases


def test_small_corpus_has_the_expected_models(small_cases):
    _, cases = small_cases
    assert len(cases) == 3
    for case in cases:
        assert Path(case.data).exists() and case.input_shapes


def test_recipes_pick_up_every_registered_pass(corpus):
    from onnxopt.pipeline import registry

    plans = corpus.recipes()
    assert set(registry.available()) <= set(plans) and "optimize(default)" in plans


@pytest.mark.parametrize("index", [0, 1, 2])
def test_every_pass_ok_or_refused(corpus, small_cases, index):
    from onnxopt import errors

    workdir, cases = small_cases
    case = cases[index]
    known = {name for name, value in vars(errors).items() if isinstance(value, type)}
    for label, recipe in corpus.recipes().items():
        row = corpus.run_one(case, label, recipe, workdir)
        assert row["status"] in ("ok", "refused", "budget missed"), row
        if row["status"] == "refused":
            assert row["error_class"] in known and len(row["message"]) > 20, row
        else:
            assert row["compared_samples"] > 0
            if label in ("normalize", "optimize(default)"):
                assert row["max_rel_error"] <= corpus.EXACT_TOLERANCE, row


def test_run_one_flags_a_silent_loss(corpus, small_cases, monkeypatch):
    """The sweep's own oracle fires: a fake 'normalize' that changes a weight is reported as a CRASH, not ok."""
    import onnxopt

    workdir, cases = small_cases
    case = cases[0]
    real = onnxopt.optimize

    def lossy(*args, **kwargs):
        result = real(*args, **kwargs)
        import onnx

        model = onnx.load(str(kwargs["output"]))
        weight = model.graph.initializer[0]
        array = onnx.numpy_helper.to_array(weight) * 1.5
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        onnx.save(model, str(kwargs["output"]))
        return result

    monkeypatch.setattr(onnxopt, "optimize", lossy)
    row = corpus.run_one(case, "normalize", [{"name": "normalize", "params": {}}], workdir)
    assert row["status"] == "CRASH" and "silent fidelity loss" in row["message"], row
