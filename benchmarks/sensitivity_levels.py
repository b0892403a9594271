"""The sensitivity table's probes at ORT's full optimization level (used) vs the basic level (used before). One run.

The per-layer sensitivity table (``onnxopt/passes/quantize/sensitivity.py``) builds one probe model per
Conv/Gemm/MatMul layer - that layer's input through a Quantize/Dequantize pair, its weight fake-quantized - and runs
each on the samples; the quantize pass uses it for the accuracy-budget search, ``sensitivity=true`` and the
placement search's mixed-precision fallback, where it was most of the fallback's 25-35 s on the PaddleOCR v4 models.
For each model: the table at both levels, alternated, the faster of 2 runs each; how far the figures move (output
and layer SQNR, dB) and whether the order the fallback bisects on changes (Spearman rank correlation, the top 10).

Models: the PaddleOCR v4 detector and recognizer from the ``rapidocr-onnxruntime`` wheel on 16 rendered inputs
(``benchmarks/ocr_agreement.py``'s, fixed batch 1 as normalized), the example and the zoo MnasNet on 16 digits
calibration images.

Usage: nice -n 5 python benchmarks/sensitivity_levels.py [--out reports/sensitivity_levels.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_files import write_report  # noqa: E402 - beside this script

SAMPLES = 16
LEVELS = ("all", "basic")


def _cases() -> list[tuple[str, Any, dict[str, np.ndarray], dict[str, tuple[int, ...]]]]:
    """(name, model path, calibration arrays, input shapes)."""
    from onnxopt import examples, zoo

    digits = np.load(examples.default_calib_path())
    digit_arrays = {key: digits[key][:SAMPLES] for key in digits.files}
    cases = [("example digits_cnn", examples.default_model_path(), digit_arrays, {}),
             ("zoo mnasnet (digits)", zoo.model_path("mnasnet"), digit_arrays, {})]
    try:
        from ocr_agreement import MODELS, model_path, render_inputs
    except ImportError as exc:  # rapidocr-onnxruntime missing
        print(f"PaddleOCR models left out: {exc}", file=sys.stderr)
        return cases
    text = render_inputs(SAMPLES, seed=11)
    for key, title in (("det", "PaddleOCR v4 detector"), ("rec", "PaddleOCR v4 recognizer")):
        cases.append((title, model_path(key), {"x": text[key]}, {"x": MODELS[key][1]}))
    return cases


def _prepared(path: Any, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """What the quantize pass hands the sensitivity table: the normalized proto, min/max ranges, the weight
    quantizer (per channel, 8 bits), the layers and the samples."""
    from onnxopt.calib_data import open_data
    from onnxopt.modelio import input_specs, load_model
    from onnxopt.passes import NormalizePass
    from onnxopt.passes.quantize.collect import collect_statistics, tensors_to_calibrate
    from onnxopt.passes.quantize.pass_ import _with_inferred_shapes
    from onnxopt.passes.quantize.placement import HEAVY_OPS
    from onnxopt.passes.quantize.weights_prep import weight_quantizer
    from onnxopt.pipeline.context import PassContext

    model = load_model(path)
    NormalizePass().bind(PassContext(input_shapes=shapes)).apply(model)
    proto = _with_inferred_shapes(model)
    specs = input_specs(model)
    ops = sorted(HEAVY_OPS)
    data = open_data(arrays, input_shapes=shapes)
    calibrator, _ = collect_statistics(proto, tensors_to_calibrate(proto, ops), data, specs, samples=SAMPLES,
                                       histograms=False)
    feeds = [batch.inputs for batch in data.iter_batches(specs, batch_size=1)][:SAMPLES]
    layers = [n for n in proto.graph.node if n.op_type in HEAVY_OPS and n.name and len(n.input) > 1]
    return {"proto": proto, "ranges": calibrator.compute("minmax", symmetric=False), "layers": layers,
            "quantize_weight": weight_quantizer(True, False, "minmax"), "feeds": feeds}


def _spearman(a: list[str], b: list[str]) -> float:
    rank_b = {name: i for i, name in enumerate(b)}
    ranks = np.array([[i, rank_b[name]] for i, name in enumerate(a)], dtype=np.float64)
    if len(ranks) < 2:
        return 1.0
    return float(np.corrcoef(ranks[:, 0], ranks[:, 1])[0, 1])


def compare(prepared: dict[str, Any], ways: dict[str, dict[str, Any]], rounds: int,
            functions: dict[str, Callable[..., list[Any]]] | None = None) -> dict[str, Any]:
    """The table made each of two ``ways`` (label -> ``layer_sensitivity`` keyword arguments; ``functions``: label ->
    the ``layer_sensitivity`` to call, this code's by default), alternately first, ``rounds`` times each: the
    fastest run of each, and how far the figures and the order of the two differ."""
    from onnxopt.passes.quantize.sensitivity import layer_sensitivity

    seconds: dict[str, list[float]] = {way: [] for way in ways}
    tables: dict[str, list[Any]] = {}
    for round_ in range(rounds):
        for way in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
            make_table = (functions or {}).get(way, layer_sensitivity)
            start = time.perf_counter()
            tables[way] = make_table(prepared["proto"], prepared["layers"], prepared["ranges"],
                                     prepared["quantize_weight"], prepared["feeds"], None, False, False, **ways[way])
            seconds[way].append(time.perf_counter() - start)
    first, second = (({row.node: row for row in tables[way]}, [row.node for row in tables[way]]) for way in ways)
    nodes = list(second[0])
    return {
        "layers": len(nodes), "samples": len(prepared["feeds"]),
        "seconds": {way: min(seconds[way]) for way in ways}, "all_runs_s": seconds,
        "max_output_sqnr_diff_db": max(abs(first[0][n].output_sqnr_db - second[0][n].output_sqnr_db) for n in nodes),
        "max_layer_sqnr_diff_db": max(abs(first[0][n].layer_sqnr_db - second[0][n].layer_sqnr_db) for n in nodes),
        "spearman": _spearman(second[1], first[1]),
        "top10_same_set": set(second[1][:10]) == set(first[1][:10]),
        "same_order": second[1] == first[1],
    }


def difference_cells(row: dict[str, Any]) -> str:
    """The Markdown cells of :func:`compare`'s differences: output and layer SQNR, Spearman, top 10, order."""
    return (f"{row['max_output_sqnr_diff_db']:.3f} dB | {row['max_layer_sqnr_diff_db']:.3f} dB | "
            f"{row['spearman']:.4f} | {'yes' if row['top10_same_set'] else 'no'} | "
            f"{'yes' if row['same_order'] else 'no'} |")


def each_case(measure_one: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """``{"model": name, **measure_one(prepared)}`` for each of :func:`_cases`, as :func:`_prepared` makes it."""
    rows = []
    for name, path, arrays, shapes in _cases():
        row = {"model": name, **measure_one(_prepared(path, arrays, shapes))}
        rows.append(row)
        print(f"  {name}: {row}", file=sys.stderr, flush=True)
    return rows


def measure() -> list[dict[str, Any]]:
    return each_case(lambda prepared: compare(prepared, {level: {"optimization": level} for level in LEVELS},
                                              rounds=2))


def render(payload: dict[str, Any]) -> str:
    lines = [
        "# Sensitivity table: probes at ORT's full vs basic optimization level", "",
        "Generated by `nice -n 5 python benchmarks/sensitivity_levels.py` (see the script's docstring). Do not edit "
        "by hand.", "",
        f"Each model: the table of every Conv/Gemm/MatMul layer on {SAMPLES} samples at both levels, alternated, "
        "the faster of 2 runs each. Differences: largest change of a layer's output SQNR and layer SQNR between the "
        "levels; Spearman correlation of the two orders (1 = the same order); whether the 10 most sensitive layers "
        "are the same set; whether the whole order is the same.", "",
        "| model | layers | full level | basic level | time saved | max diff, output SQNR | max diff, layer SQNR "
        "| Spearman | top 10 same | same order |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        full, basic = r["seconds"]["all"], r["seconds"]["basic"]
        lines.append(f"| {r['model']} | {r['layers']} | {full:.2f} s | {basic:.2f} s | {1 - full / basic:.0%} | "
                     + difference_cells(r))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "reports" / "sensitivity_levels.md"))
    args = parser.parse_args()
    write_report(Path(args.out), {"rows": measure()}, render)


if __name__ == "__main__":
    main()
