"""The pass-result cache: a re-run reuses results; a change of model, parameter or data is a miss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

import onnxopt
from onnxopt.cli import main
from onnxopt.pipeline.cache import PassCache
from onnx_builders import conv_classifier, labelled_npz, save


def _steps(result) -> list[dict]:
    return result.report.to_dict()["steps"]


def _reused(step: dict) -> bool:
    return any("reused from the pass cache" in note for note in step["notes"])


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("??/*.onnx"))


def test_rerun_hits_and_gives_the_same_model(model_path: Path, data_path: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    kwargs = dict(calib=data_path, eval=data_path, measure_latency=False, cache_dir=cache)
    recipe = ["normalize", {"quantize": {"placement": "all"}}]
    first = onnxopt.optimize(model_path, recipe, output=tmp_path / "a.onnx", **kwargs)
    assert not any(_reused(s) for s in _steps(first)[1:])
    assert len(_entries(cache)) == 2
    second = onnxopt.optimize(model_path, recipe, output=tmp_path / "b.onnx", **kwargs)
    assert all(_reused(s) for s in _steps(second)[1:])
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # the pass's own notes and details come back with the model
    assert _steps(second)[2]["details"]["quantized_nodes"] == _steps(first)[2]["details"]["quantized_nodes"]
    assert len(_entries(cache)) == 2


def test_changed_parameter_or_data_or_model_is_a_miss(model_path: Path, data_path: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    common = dict(eval=data_path, measure_latency=False, cache_dir=cache)
    onnxopt.optimize(model_path, ["normalize", {"quantize": {"placement": "all"}}], calib=data_path, **common)
    changed_param = onnxopt.optimize(model_path, ["normalize", {"quantize": {"placement": "all", "method": "mse"}}],
                                     calib=data_path, **common)
    steps = _steps(changed_param)
    assert _reused(steps[1]) and not _reused(steps[2])  # normalize shared, quantize recomputed

    other = np.load(data_path)
    other_data = tmp_path / "other.npz"
    np.savez(other_data, input=other["input"] * 0.5, y=other["y"])
    changed_data = onnxopt.optimize(model_path, ["normalize", {"quantize": {"placement": "all"}}], calib=other_data,
                                    **common)
    assert not any(_reused(s) for s in _steps(changed_data)[1:])  # data is part of every key

    other_model = save(conv_classifier(seed=5), tmp_path / "other.onnx")
    changed_model = onnxopt.optimize(other_model, ["normalize"], calib=data_path, **common)
    assert not _reused(_steps(changed_model)[1])
    assert len(_entries(cache)) == 2 + 1 + 2 + 1


def test_damaged_entry_is_a_miss_not_an_error(model_path: Path, data_path: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    onnxopt.optimize(model_path, ["normalize"], eval=data_path, measure_latency=False, cache_dir=cache)
    (entry,) = _entries(cache)
    entry.write_bytes(b"not a model")
    again = onnxopt.optimize(model_path, ["normalize"], eval=data_path, measure_latency=False, cache_dir=cache)
    assert not _reused(_steps(again)[1])
    onnx.checker.check_model(onnx.load(str(entry)))  # rewritten by the run


def test_eviction_keeps_the_cache_bounded(tmp_path: Path):
    from onnxopt.modelio import as_ir_model
    from onnxopt.passes import NormalizePass

    cache = PassCache(tmp_path / "cache", max_bytes=1)
    model = as_ir_model(conv_classifier())
    assert cache.store("ab" + "0" * 62, NormalizePass(), model) is None
    assert cache.load("ab" + "0" * 62) is None  # evicted right away: over the limit
    assert cache.misses == 1 and cache.hits == 0


def test_cli_cache_dir_and_no_cache(capsys, model_path: Path, data_path: Path, tmp_path: Path):
    cache = tmp_path / "cli-cache"
    args = ["optimize", str(model_path), "--eval", str(data_path), "--no-latency", "-q", "--pass", "normalize"]
    assert main(args + ["-o", str(tmp_path / "a.onnx"), "--cache-dir", str(cache)]) == 0
    assert len(_entries(cache)) == 1
    assert main(args + ["-o", str(tmp_path / "b.onnx"), "--cache-dir", str(cache)]) == 0
    report = json.loads((tmp_path / "b.onnx.report.json").read_text())
    assert _reused(report["steps"][1])
    assert main(args + ["-o", str(tmp_path / "c.onnx"), "--cache-dir", str(tmp_path / "unused"), "--no-cache"]) == 0
    assert not (tmp_path / "unused").exists()
    capsys.readouterr()


def test_seed_is_part_of_the_key(tmp_path: Path):
    from onnxopt.calib_data import open_data
    from onnxopt.modelio import as_ir_model
    from onnxopt.passes import NormalizePass
    from onnxopt.pipeline.context import PassContext

    model = as_ir_model(conv_classifier())
    data = open_data(str(labelled_npz(tmp_path / "d.npz", conv_classifier())))
    cache = PassCache(tmp_path / "cache")
    keys = {cache.key(NormalizePass(), model, PassContext(calib=data, seed=seed)) for seed in (0, 0, 1)}
    assert len(keys) == 2


def test_models_with_external_tensors_are_not_cached(tmp_path: Path, monkeypatch):
    """A model exported again to the same files with new weights (retrained): a serialization with external tensors
    names the data file, not the data, so both would share a cache key and the second run would get the first's
    result. Such models (above the external-data threshold, lowered here) are neither looked up nor stored."""
    from onnxopt import modelio

    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 64)
    cache = tmp_path / "cache"
    steps = []
    for seed in (0, 1):
        (tmp_path / "m.data").unlink(missing_ok=True)  # onnx.save appends to an existing data file
        onnx.save(conv_classifier(seed=seed), str(tmp_path / "m.onnx"), save_as_external_data=True,
                  location="m.data", size_threshold=0)  # every tensor in the file: the graphs are identical
        result = onnxopt.optimize(tmp_path / "m.onnx", ["normalize"], cache_dir=cache, measure_latency=False)
        steps.append(result.report.steps[-1])
    for step in steps:  # each model's own weights, not a cached neighbour's
        assert step.fidelity_vs_original["max_rel_error"] < 1e-5, step.notes
    for step in steps:
        assert "pass cache not used: the model's tensors live in external files" in step.notes
    assert not PassCache(cache)._entries()
