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


def _table(prepared: dict[str, Any], level: str) -> tuple[float, list[Any]]:
    from onnxopt.passes.quantize.sensitivity import layer_sensitivity

    start = time.perf_counter()
    table = layer_sensitivity(prepared["proto"], prepared["layers"], prepared["ranges"], prepared["quantize_weight"],
                              prepared["feeds"], None, False, False, optimization=level)
    return time.perf_counter() - start, table


def _spearman(a: list[str], b: list[str]) -> float:
    rank_b = {name: i for i, name in enumerate(b)}
    ranks = np.array([[i, rank_b[name]] for i, name in enumerate(a)], dtype=np.float64)
    if len(ranks) < 2:
        return 1.0
    return float(np.corrcoef(ranks[:, 0], ranks[:, 1])[0, 1])


def measure() -> list[dict[str, Any]]:
    rows = []
    for name, path, arrays, shapes in _cases():
        prepared = _prepared(path, arrays, shapes)
        seconds: dict[str, list[float]] = {level: [] for level in LEVELS}
        tables: dict[str, list[Any]] = {}
        for round_ in range(2):
            for level in (LEVELS if round_ == 0 else LEVELS[::-1]):  # each level goes first once
                elapsed, tables[level] = _table(prepared, level)
                seconds[level].append(elapsed)
        by_node = {level: {row.node: row for row in tables[level]} for level in LEVELS}
        nodes = list(by_node["basic"])
        order = {level: [row.node for row in tables[level]] for level in LEVELS}
        row = {
            "model": name, "layers": len(nodes), "samples": len(prepared["feeds"]),
            "seconds": {level: min(seconds[level]) for level in LEVELS}, "all_runs_s": seconds,
            "max_output_sqnr_diff_db": max(abs(by_node["all"][n].output_sqnr_db - by_node["basic"][n].output_sqnr_db)
                                           for n in nodes),
            "max_layer_sqnr_diff_db": max(abs(by_node["all"][n].layer_sqnr_db - by_node["basic"][n].layer_sqnr_db)
                                          for n in nodes),
            "spearman": _spearman(order["basic"], order["all"]),
            "top10_same_set": set(order["basic"][:10]) == set(order["all"][:10]),
            "same_order": order["basic"] == order["all"],
        }
        rows.append(row)
        print(f"  {name}: {row}", file=sys.stderr, flush=True)
    return rows


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
                     f"{r['max_output_sqnr_diff_db']:.3f} dB | {r['max_layer_sqnr_diff_db']:.3f} dB | "
                     f"{r['spearman']:.4f} | {'yes' if r['top10_same_set'] else 'no'} | "
                     f"{'yes' if r['same_order'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "reports" / "sensitivity_levels.md"))
    args = parser.parse_args()
    write_report(Path(args.out), {"rows": measure()}, render)


if __name__ == "__main__":
    main()
