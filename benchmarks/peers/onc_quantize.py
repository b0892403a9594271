"""Peer wrapper: quantize a model with `onnx-neural-compressor` (the ONNX split of Intel Neural Compressor).

Runs in its own virtual environment, because onnx-neural-compressor 1.0 pins numpy<2 (and imports the undeclared
`prettytable` and `scipy`), which onnxopt's environment cannot share. The benchmark starts it as a subprocess:

    python -m venv /work/venvs/onc
    /work/venvs/onc/bin/pip install onnx-neural-compressor==1.0 "numpy<2" prettytable scipy ml_dtypes onnxruntime
    /work/venvs/onc/bin/python benchmarks/peers/onc_quantize.py MODEL CALIB.npz OUT.onnx [--format qdq] ...

CALIB.npz holds one array per model input (first axis = samples) and optionally `y` (labels, used by --autotune
only). It prints one JSON line: {"seconds": quantization wall time, "peak_mb": peak RSS, "config": ...}. This file
imports nothing from onnxopt, so it runs with only the peer's own packages.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


class NpzReader:
    """Batch-1 calibration feeds from an npz, rewindable (ONC's CalibrationDataReader protocol)."""

    def __init__(self, path: str, input_names: list[str], limit: int) -> None:
        data = np.load(path)
        keys = [k for k in data.files if k != "y"]
        arrays = {name: data[name] if name in data.files else data[keys[i]] for i, name in enumerate(input_names)}
        count = min(len(a) for a in arrays.values())
        self.items = [{n: np.ascontiguousarray(a[i:i + 1], dtype=np.float32) for n, a in arrays.items()}
                      for i in range(min(count, limit))]
        self.labels = data["y"][: len(self.items)] if "y" in data.files else None
        self.index = 0

    def get_next(self) -> dict | None:
        if self.index >= len(self.items):
            return None
        self.index += 1
        return self.items[self.index - 1]

    def rewind(self) -> None:
        self.index = 0

    def __iter__(self):  # noqa: ANN204
        return self

    def __next__(self) -> dict:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def static_config(args: argparse.Namespace, reader: NpzReader, fmt: str,  # noqa: ANN201
                  per_channel: bool, reduce_range: bool):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat

    from onnx_neural_compressor.quantization import config

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[args.method]
    return config.StaticQuantConfig(
        calibration_data_reader=reader, calibrate_method=method,
        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
        per_channel=per_channel, reduce_range=reduce_range, calibration_sampling_size=len(reader.items),
        extra_options={"SmoothQuant": True} if args.smoothquant else None)


def accuracy_fn(reader: NpzReader):  # noqa: ANN201
    """Accuracy on the calibration set's labels: what autotune compares against FP32 (never the benchmark's eval)."""

    def evaluate(model: str | onnx.ModelProto) -> float:
        source = model if isinstance(model, str) else model.SerializeToString()
        session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        preds = [int(np.argmax(session.run(None, feed)[0].reshape(-1))) for feed in reader.items]
        return float(np.mean(np.asarray(preds) == reader.labels))

    return evaluate


def own_peak_mb() -> float | None:
    """This process's peak RSS (VmHWM, Linux), which exec resets (ru_maxrss would include the parent's size)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("output")
    parser.add_argument("--format", choices=("qoperator", "qdq"), default="qoperator")
    parser.add_argument("--per-channel", action="store_true")
    parser.add_argument("--reduce-range", action="store_true")
    parser.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax")
    parser.add_argument("--smoothquant", action="store_true")
    parser.add_argument("--autotune", action="store_true",
                        help="accuracy-aware tuning over formats/granularities, scored on the calibration labels")
    parser.add_argument("--tolerable-loss", type=float, default=0.005)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()

    from onnx_neural_compressor.quantization import quantize, tuning  # quantize: the function

    names = [i.name for i in onnx.load(args.model, load_external_data=False).graph.input]
    inits = {i.name for i in onnx.load(args.model, load_external_data=False).graph.initializer}
    reader = NpzReader(args.calib, [n for n in names if n not in inits], args.samples)
    gc.collect()  # the collection the imports leave due, before the clock (as benchmarks/quantization.py does)
    start = time.perf_counter()
    info: dict = {}
    if args.autotune:
        if reader.labels is None:
            print("--autotune needs labels 'y' in the calibration npz", file=sys.stderr)
            return 2
        configs = [static_config(args, reader, fmt, pc, rr)
                   for fmt, pc, rr in (("qoperator", False, False), ("qdq", False, False), ("qdq", True, True),
                                       ("qoperator", True, True))]
        best = tuning.autotune(args.model, tuning.TuningConfig(config_set=configs, tolerable_loss=args.tolerable_loss,
                                                               max_trials=len(configs)),
                               eval_fn=accuracy_fn(reader), calibration_data_reader=reader)
        if best is None:
            print("autotune found no configuration within the tolerable loss", file=sys.stderr)
            return 1
        onnx.save(best, args.output)
        info["config"] = "autotune"
    else:
        cfg = static_config(args, reader, args.format, args.per_channel, args.reduce_range)
        quantize(args.model, args.output, cfg)
        info["config"] = {"format": args.format, "per_channel": args.per_channel, "reduce_range": args.reduce_range,
                          "method": args.method, "smoothquant": args.smoothquant}
    info["seconds"] = time.perf_counter() - start
    info["peak_mb"] = own_peak_mb()
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
