"""ORT's ``quantize_onnx_initializer`` as it is, and as the quantize pass runs it (in blocks): time and bytes. One run.

The quantize pass wraps ONNX Runtime's weight quantization (``onnxopt.passes.quantize.ort_fast``): the same float32
arithmetic, run in cache-sized blocks (:func:`quantize_blocks`) instead of ORT's one numpy expression over the whole
weight (per tensor) or its Python loop over channels (per channel). Here both quantize the same seeded float32
weights to int8, alternately, ``--repeats`` times each (the fastest time is reported), and every output is compared
byte for byte: a 12288 x 12288 MatMul weight (600 MB, a layer of the 2.4 GB MLP of ``benchmarks/large_model.py``),
per tensor and per output channel (axis 1), and a 256 x 128 x 3 x 3 conv weight per output channel (axis 0).

A last case times ORT's QOperator writer (``ONNXQuantizer``, QLinearOps) on a one-MatMul model with that 600 MB
weight, whose weights it quantizes per output channel in a Python loop: alone (its own scales, its own loop), and
as the quantize pass runs it (our per-channel scales as ``TensorQuantOverrides``, computed inside the clock, and the
wrapped per-channel writer); the two written models are compared byte for byte.

Usage: nice -n 5 python benchmarks/weight_quantization.py [--repeats 3] [--out reports/weight_quantization.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_files import write_report  # noqa: E402 - beside this script


def cases() -> list[tuple[str, tuple[int, ...], int | None]]:
    return [("MatMul 12288 x 12288, per tensor", (12288, 12288), None),
            ("MatMul 12288 x 12288, per channel (axis 1)", (12288, 12288), 1),
            ("Conv 256 x 128 x 3 x 3, per channel (axis 0)", (256, 128, 3, 3), 0)]


def measure(shape: tuple[int, ...], axis: int | None, repeats: int) -> dict:
    from onnxruntime.quantization.quant_utils import quantize_onnx_initializer

    from onnxopt.passes.quantize.ort_fast import blockwise_initializer

    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape, dtype=np.float32)
    channels = 1 if axis is None else shape[axis]
    scale = (np.abs(weight).max() / 127.0 * rng.uniform(0.5, 1.0, channels)).astype(np.float32)
    zero_point = np.zeros(channels, np.int8)
    if axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    proto = onnx.numpy_helper.from_array(weight, "w")
    del weight
    ours = blockwise_initializer(quantize_onnx_initializer)
    seconds, outputs = alternate({
        "ORT": lambda: quantize_onnx_initializer(proto, onnx.TensorProto.INT8, zero_point, scale, axis),
        "onnxopt (blocks)": lambda: ours(proto, onnx.TensorProto.INT8, zero_point, scale, axis)}, repeats)
    return {"seconds": seconds, "identical": outputs["ORT"] == outputs["onnxopt (blocks)"],
            "weight_mb": round(int(np.prod(shape)) * 4 / 1e6, 1)}


def alternate(runners: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, bytes]]:
    """Each runner ``repeats`` times, alternately: its times, and its last result's bytes (a protobuf message is
    serialized outside the clock; bytes are taken as they are)."""
    seconds: dict[str, list[float]] = {label: [] for label in runners}
    outputs: dict[str, bytes] = {}
    for _ in range(repeats):
        for label, run in runners.items():
            started = time.perf_counter()
            result = run()
            seconds[label].append(time.perf_counter() - started)
            outputs[label] = result if isinstance(result, bytes) else result.SerializeToString()
            del result
    return seconds, outputs


def measure_qoperator(shape: tuple[int, int], repeats: int) -> dict:
    """ORT's QOperator writer on MatMul(x, W), alone and as the quantize pass runs it: time and identity."""
    import contextlib

    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, QuantType

    from onnxopt.passes.quantize.ort_fast import vectorized_weight_quantization
    from onnxopt.passes.quantize.weights_prep import per_channel_scale_overrides

    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal(shape, dtype=np.float32), "W")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "one_matmul",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, shape[0]])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, shape[1]])], [weight])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    del weight
    ranges = TensorsData(CalibrationMethod.MinMax, {
        "x": TensorData(lowest=np.array(-4.0, np.float32), highest=np.array(4.0, np.float32)),
        "y": TensorData(lowest=np.array(-400.0, np.float32), highest=np.array(400.0, np.float32))})

    def write(ours: bool) -> bytes:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if ours:
            extra["TensorQuantOverrides"] = per_channel_scale_overrides(copy, {"W": 1}, False)
        with vectorized_weight_quantization() if ours else contextlib.nullcontext():
            quantizer = ONNXQuantizer(copy, per_channel=True, reduce_range=False, mode=QuantizationMode.QLinearOps,
                                      static=True, weight_qType=QuantType.QInt8, activation_qType=QuantType.QUInt8,
                                      tensors_range=ranges, nodes_to_quantize=[], nodes_to_exclude=[],
                                      op_types_to_quantize=["MatMul"], extra_options=extra)
            quantizer.quantize_model()
        return quantizer.model.model.SerializeToString()

    seconds, outputs = alternate({"ORT": lambda: write(False), "onnxopt (blocks)": lambda: write(True)}, repeats)
    return {"seconds": seconds, "identical": outputs["ORT"] == outputs["onnxopt (blocks)"],
            "weight_mb": round(int(np.prod(shape)) * 4 / 1e6, 1)}


def render(payload: dict) -> str:
    lines = ["# Weight quantization: ORT's quantize_onnx_initializer vs the quantize pass's blocks", "",
             f"Generated by `{payload['command']}` in {payload['minutes']:.1f} min ({payload['date']}). Do not edit "
             "by hand.", "", f"Host: {payload['host']}.", "",
             "Seeded float32 weights quantized to int8 by ORT's function and by the same function wrapped as the "
             "quantize pass runs it (`onnxopt.passes.quantize.ort_fast`), alternately; time = the fastest of "
             f"{payload['repeats']} runs each (every run in the JSON); identical = the two output initializers "
             "serialize to the same bytes.", "",
             "| weight | size | ORT | onnxopt (blocks) | ratio | identical |", "|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        ort_s, ours_s = min(row["seconds"]["ORT"]), min(row["seconds"]["onnxopt (blocks)"])
        lines.append(f"| {row['case']} | {row['weight_mb']} MB | {ort_s:.3f} s | {ours_s:.3f} s | "
                     f"{ours_s / ort_s:.2f}x | {'yes' if row['identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "reports" / "weight_quantization.md"))
    args = parser.parse_args()
    from onnxopt.hostinfo import host_info

    started = time.perf_counter()
    rows = []
    for case, shape, axis in cases():
        rows.append({"case": case, **measure(shape, axis, args.repeats)})
        print(f"  {case}: {rows[-1]}", file=sys.stderr, flush=True)
    case = "QOperator writer, MatMul 12288 x 12288 per channel (whole model written)"
    rows.append({"case": case, **measure_qoperator((12288, 12288), args.repeats)})
    print(f"  {case}: {rows[-1]}", file=sys.stderr, flush=True)
    command = "nice -n 5 python benchmarks/weight_quantization.py" + (
        f" --repeats {args.repeats}" if args.repeats != 3 else "")
    payload = {"command": command, "minutes": (time.perf_counter() - started) / 60, "repeats": args.repeats,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": host_info().describe(),
               "rows": rows}
    write_report(Path(args.out), payload, render)


if __name__ == "__main__":
    main()
