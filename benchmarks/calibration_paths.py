"""Three measured choices of the quantize pass's calibration and compaction, each against its alternative. One run.

1. The calibration session's ORT optimization level: ``all`` (used) vs ``basic`` (before), min-max statistics over
   200 digits calibration images, on the example and the zoo nets: wall time (fastest of 3) and how far the ranges
   move (relative).
2. Histograms of float32 activations binned in float32 (used) vs in a float64 copy (before), on the example: wall
   time of the histogram statistics (fastest of 3) and whether the counts are equal.
4. The calibration batch size: min-max statistics at batch 8, 32 (before) and the size ``collect.calibration_batch``
   picks from the activations' bytes per sample (used), on the example and the zoo nets, and histogram statistics
   (entropy/percentile/mse) at 8 and 32 (used) on three of them: wall time (fastest of 5).
3. The int32-bias guard of ``compact``: an untrained MnasNet export (random weights, legacy exporter, opset 13, no
   normalize) quantized with ``placement=all`` on 16 random inputs, with the guard (used) and without it (the
   float bias of every Conv/Gemm left to ONNX Runtime to re-quantize at load): output SQNR against FP32.

Usage: nice -n 5 python benchmarks/calibration_paths.py [--out reports/calibration_paths.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report_files import write_report  # noqa: E402 - beside this script

NETS = ("example", "resnet", "mnasnet", "shufflenetv2", "vgg")


def _prepared(name: str):  # noqa: ANN202 - (proto, specs, tensors)
    from onnxopt import examples, zoo
    from onnxopt.modelio import input_specs, load_model
    from onnxopt.passes import NormalizePass
    from onnxopt.passes.quantize.collect import tensors_to_calibrate
    from onnxopt.passes.quantize.pass_ import _with_inferred_shapes

    model = load_model(examples.default_model_path() if name == "example" else zoo.model_path(name))
    NormalizePass().apply(model)
    proto = _with_inferred_shapes(model)
    ops = ["Conv", "Gemm", "MatMul", "Relu", "Clip", "Add", "Mul", "Concat", "GlobalAveragePool", "MaxPool",
           "AveragePool", "Flatten", "Reshape", "Transpose", "Gather", "HardSigmoid", "Sigmoid", "ReduceMean"]
    return proto, input_specs(model), tensors_to_calibrate(proto, ops)


def _fastest(run, repeats: int = 3) -> tuple[float, object]:  # noqa: ANN001
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def optimization_levels(calib: str) -> list[dict]:
    from onnxopt import runtime
    from onnxopt.calib_data import open_data
    from onnxopt.passes.quantize import collect

    rows = []
    real = runtime.make_session  # what collect's make_full_session calls
    for name in NETS:
        proto, specs, tensors = _prepared(name)
        ranges, seconds = {}, {}
        for level in ("basic", "all"):
            runtime.make_session = lambda *a, level=level, **k: real(*a, **{**k, "optimization": level})
            try:
                seconds[level], (calibrator, _) = _fastest(lambda: collect.collect_statistics(
                    proto, tensors, open_data(calib), specs, samples=200, histograms=False))
            finally:
                runtime.make_session = real
            ranges[level] = calibrator.compute("minmax")
        moved = max(max(abs(ranges["all"][t].low - ranges["basic"][t].low), abs(ranges["all"][t].high
                        - ranges["basic"][t].high)) / max(abs(ranges["basic"][t].low), abs(ranges["basic"][t].high),
                                                          1e-12) for t in ranges["basic"])
        rows.append({"model": name, "tensors": len(tensors), "basic_s": seconds["basic"], "all_s": seconds["all"],
                     "max_relative_range_change": moved})
        print(f"levels {name}: basic {seconds['basic']:.3f} s, all {seconds['all']:.3f} s, moved {moved:.1e}",
              flush=True)
    return rows


def histogram_dtypes(calib: str) -> dict:
    from onnxopt.calib_data import open_data
    from onnxopt.passes.quantize.calibrators import Calibrator
    from onnxopt.passes.quantize.collect import _with_outputs
    from onnxopt.runtime import make_session

    proto, specs, tensors = _prepared("example")
    session = make_session(_with_outputs(proto, tensors))
    names = [o.name for o in session.get_outputs()]
    batches = []
    for batch in open_data(calib).iter_batches(specs, batch_size=32):
        outputs = dict(zip(names, session.run(names, batch.inputs)))
        batches.append({name: outputs.get(name, batch.inputs.get(name)) for name in tensors})

    def fold(wide: bool) -> Calibrator:
        calibrator = Calibrator(histograms=True)
        for arrays in batches:
            calibrator.update_many({n: (a.astype(np.float64) if wide else a) for n, a in arrays.items()})
        return calibrator

    single_s, single = _fastest(lambda: fold(False))
    double_s, double = _fastest(lambda: fold(True))
    equal = all(np.array_equal(single.stats(t).signed_hist.counts, double.stats(t).signed_hist.counts)
                and np.array_equal(single.stats(t).abs_hist.counts, double.stats(t).abs_hist.counts) for t in tensors)
    print(f"histograms: float32 {single_s:.3f} s, float64 copy {double_s:.3f} s, equal counts {equal}", flush=True)
    return {"model": "example", "tensors": len(tensors), "float32_s": single_s, "float64_copy_s": double_s,
            "equal_counts": equal}


def batch_sizes(calib: str) -> list[dict]:
    from onnxopt.calib_data import open_data
    from onnxopt.passes.quantize import collect

    rows = []
    rule = collect.calibration_batch
    for name in NETS:
        proto, specs, tensors = _prepared(name)
        for histograms in (False, True):
            if histograms and name not in ("example", "mnasnet", "resnet"):
                continue
            used = rule(proto, tensors, histograms)
            seconds = {}
            for size in sorted({8, 32, used}):
                collect.calibration_batch = lambda *a, size=size: size
                try:
                    seconds[size], _ = _fastest(lambda: collect.collect_statistics(
                        proto, tensors, open_data(calib), specs, samples=200, histograms=histograms), repeats=5)
                finally:
                    collect.calibration_batch = rule
            rows.append({"model": name, "histograms": histograms, "used": used, "seconds": seconds})
            print(f"batch sizes {name} histograms={histograms}: used {used}, {seconds}", flush=True)
    return rows


def int32_bias_guard(workdir: Path) -> dict:
    import onnxruntime as ort
    import torch

    from onnxopt.calib_data import open_data
    from onnxopt.passes.quantize import QuantizePass, compact
    from onnxopt.pipeline.context import PassContext
    from onnxopt.zoo import nets

    torch.set_num_threads(1)
    path = workdir / "mnasnet_untrained_op13.onnx"
    nets.export_onnx(nets.build("mnasnet", seed=0), path, opset=13)
    model = onnx.load(str(path))
    name = model.graph.input[0].name
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).normal(size=(16, *dims[1:])).astype(np.float32)
    np.savez(workdir / "random.npz", **{name: x})
    reference = ort.InferenceSession(str(path)).run(None, {name: x})[0]
    out = {}
    for label, limit in (("with the guard", compact._FLOAT_BIAS_LIMIT), ("without it", float("inf"))):
        compact._FLOAT_BIAS_LIMIT, saved = limit, compact._FLOAT_BIAS_LIMIT
        try:
            step = QuantizePass(placement="all", calib_samples=16, normalize_first=False)
            quantized = step.bind(PassContext(calib=open_data(str(workdir / "random.npz")))).apply(model)
        finally:
            compact._FLOAT_BIAS_LIMIT = saved
        output = ort.InferenceSession(quantized.SerializeToString()).run(None, {name: x})[0]
        sqnr = 10 * np.log10(float(np.sum(reference ** 2)) / float(np.sum((reference - output) ** 2)))
        out[label] = float(sqnr)
        print(f"int32 bias {label}: {sqnr:.1f} dB", flush=True)
    return out


def render(payload: dict) -> str:
    lines = ["# Calibration and compaction choices of the quantize pass, each against its alternative", "",
             f"Generated by `{payload['command']}` in {payload['seconds']:.0f} s. Do not edit by hand.", "",
             "## 1. ORT optimization level of the calibration session (min-max, 200 digits calibration images)", "",
             "| model | tensors | basic level | full level (used) | ratio | largest range change (relative) |",
             "|---|---|---|---|---|---|"]
    for row in payload["levels"]:
        lines.append(f"| {row['model']} | {row['tensors']} | {row['basic_s']:.3f} s | {row['all_s']:.3f} s | "
                     f"{row['basic_s'] / row['all_s']:.2f}x | {row['max_relative_range_change']:.1e} |")
    h = payload["histograms"]
    lines += ["", "## 2. Histograms of float32 activations (the example, 200 images, both histograms per tensor)", "",
              "| binned in | wall time (fastest of 3) |", "|---|---|",
              f"| float32 (used) | {h['float32_s']:.3f} s |", f"| a float64 copy | {h['float64_copy_s']:.3f} s |", "",
              f"Equal counts in every bin of every tensor ({h['tensors']} tensors): {h['equal_counts']}.", "",
              "## 3. The int32-bias guard of `compact` (untrained MnasNet export, 16 random inputs, placement=all)", "",
              "| compact | output SQNR vs FP32 |", "|---|---|"]
    for label, sqnr in payload["int32_bias"].items():
        lines.append(f"| {label} | {sqnr:.1f} dB |")
    lines += ["", "## 4. Calibration batch size (200 digits calibration images, fastest of 5)", "",
              "| model | statistics | batch 8 | batch 32 | the rule's batch (used) | used / batch 32 |",
              "|---|---|---|---|---|---|"]
    for row in payload.get("batch_sizes", []):
        t = {int(k): v for k, v in row["seconds"].items()}
        used = row["used"]
        lines.append(f"| {row['model']} | {'histograms' if row['histograms'] else 'min-max'} | {t[8]:.3f} s | "
                     f"{t[32]:.3f} s | {used}: {t[used]:.3f} s | {t[used] / t[32]:.2f}x |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "reports" / "calibration_paths.md"))
    args = parser.parse_args()
    from onnxopt import examples

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        calib = np.load(examples.default_calib_path())
        path = Path(tmp) / "calib200.npz"
        np.savez(path, input=calib["input"][:200], y=calib["y"][:200])
        payload = {"levels": optimization_levels(str(path)), "histograms": histogram_dtypes(str(path)),
                   "int32_bias": int32_bias_guard(Path(tmp)), "batch_sizes": batch_sizes(str(path))}
    payload["seconds"] = time.time() - start
    payload["command"] = "nice -n 5 python benchmarks/calibration_paths.py"
    write_report(Path(args.out), payload, render)


if __name__ == "__main__":
    main()
