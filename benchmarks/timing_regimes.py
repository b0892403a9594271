"""Does an int8 model's speed-up over FP32 depend on how it is timed? The same models timed four ways, side by side.

On the VNNI host the quantization benchmark read MnasNet's kept int8 model at 0.91x FP32 at batch 1 / 2 threads
(reports/quantization_mnist.md), while the placement search that kept it had read 1.07x-1.10x at that setting. The
two time differently. For each MNIST net (benchmarks/mnist_nets.py) this script builds FP32 (onnxopt `normalize`),
the whole int8 QDQ model and the whole int8 QOperator model (`quantize`, `placement=all`, MinMax, per-channel), and
times each int8 model against FP32 at batch 1 with 1 and 2 threads, ``--runs`` times in each of four regimes:

- **search race**: the placement search's own race (`placement.time_models`): FP32 and the candidate interleaved,
  sessions not spinning, sub-millisecond models looped to 2 ms per timed run;
- **pair round-robin**: `onnxopt.bench` with FP32 and the candidate only (interleaved, not spinning, one inference per
  timed run);
- **13-session round-robin**: `onnxopt.bench` with the three models and ten more sessions of them, as the quantization
  benchmark times its 12-13 rows together;
- **as deployed**: the quantize pass's own check (`placement.time_deployed`): one session per model with ONNX
  Runtime's defaults (intra-op threads spin between runs, as in deployment), blocks of 10 ms alternated between the
  three models so that one session runs at a time; the ratio of the medians of the block medians.

Ratio = FP32 median / model median (> 1: int8 faster). One run of the script; nothing here is a unit test.

Usage: nice -n 5 python benchmarks/timing_regimes.py [--models mnasnet,resnet] [--runs 5] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mnist_nets  # noqa: E402 - beside this script
from report_files import command_line, write_report  # noqa: E402 - beside this script

REGIMES = ("search race", "pair round-robin", "13-session round-robin", "as deployed")
INT8 = ("int8 QDQ", "int8 QOperator")
THREADS = (1, 2)
ROUND_ROBIN_SESSIONS = 13


def build_models(name: str, calib: Path) -> dict:
    """FP32 and the two whole int8 models of MNIST net ``name`` (onnx protos)."""
    import onnxopt

    info = mnist_nets.build(mnist_nets.DEFAULT_DIR, (name,))
    source = str(mnist_nets.DEFAULT_DIR / info["models"][name]["onnx"])
    models = {"FP32": onnxopt.optimize(source, ["normalize"], calib=str(calib), measure_latency=False).model}
    for label, fmt in zip(INT8, ("qdq", "qoperator"), strict=True):
        models[label] = onnxopt.optimize(source, ["normalize", {"name": "quantize", "placement": "all",
                                                                "format": fmt}],
                                         calib=str(calib), measure_latency=False).model
    return models


def search_race(models: dict, label: str, threads: int) -> float:
    from onnxopt.passes.quantize import placement

    timings = placement.time_models({placement.FP32: models["FP32"], label: models[label]}, threads, {})
    return timings[placement.FP32].median_ms / timings[label].median_ms


def round_robin(models: dict, labels: list[str], threads: int) -> dict[str, float]:
    from onnxopt.bench import BenchConfig, benchmark

    config = BenchConfig(batch_sizes=(1,), threads=(threads,), warmup=10, repeats=30)
    report = benchmark([models[label] for label in labels], config, labels=labels)
    fp32 = report.result("FP32", 1, threads).median_ms
    return {label: fp32 / report.result(label, 1, threads).median_ms for label in INT8 if label in labels}


def as_deployed(models: dict, threads: int) -> dict[str, float]:
    from onnxopt.passes.quantize import placement

    timings = placement.time_deployed(models, threads, {})
    return {label: timings["FP32"].median_ms / timings[label].median_ms for label in INT8}


def measure(name: str, models: dict, runs: int) -> dict:
    """``{regime: {setting: {model: [ratio per run]}}}``."""
    padded = list(models) + [f"copy {i}" for i in range(ROUND_ROBIN_SESSIONS - len(models))]
    copies = {**models, **{f"copy {i}": models[list(models)[i % len(models)]]
                           for i in range(ROUND_ROBIN_SESSIONS - len(models))}}
    steps: dict[str, Callable[[int], dict[str, float]]] = {
        "search race": lambda t: {label: search_race(models, label, t) for label in INT8},
        "pair round-robin": lambda t: {label: round_robin(models, ["FP32", label], t)[label] for label in INT8},
        "13-session round-robin": lambda t: round_robin(copies, padded, t),
        "as deployed": lambda t: as_deployed(models, t),
    }
    out: dict = {regime: {f"b1_t{t}": {label: [] for label in INT8} for t in THREADS} for regime in REGIMES}
    for run in range(runs):
        for threads in THREADS:
            for regime in REGIMES:  # the regimes take turns within each run: a slow phase hits all of them
                for label, ratio in steps[regime](threads).items():
                    out[regime][f"b1_t{threads}"][label].append(ratio)
        print(f"  {name}: run {run + 1}/{runs} done", file=sys.stderr, flush=True)
    return out


def render(payload: dict) -> str:
    lines = ["# int8 speed-up over FP32, timed four ways", "",
             f"Generated by `{payload['command']}` in {payload['seconds'] / 60:.1f} min. Do not edit by hand.", "",
             f"Host: {payload['host']}.", "",
             "Ratio = FP32 median / int8 median at batch 1 (> 1: int8 faster); each cell the median over "
             f"{payload['runs']} runs (min-max). Regimes and models: the script's docstring. The regimes take turns "
             "within each run. Rows marked * have a run below 0.98x.", ""]
    for name, result in payload["results"].items():
        lines += [f"## {name} (MNIST)", "", "| regime | model | " + " | ".join(
            f"batch 1, {t} thread{'s' if t > 1 else ''}" for t in THREADS) + " |",
                  "|---|---|" + "---|" * len(THREADS)]
        for regime in REGIMES:
            for label in INT8:
                cells, low = [], False
                for t in THREADS:
                    ratios = result[regime][f"b1_t{t}"][label]
                    low = low or min(ratios) < 0.98
                    cells.append(f"{np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
                lines.append(f"| {regime} | {label}{' *' if low else ''} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mnasnet,resnet,mobilenetv2")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "timing_regimes.md")
    args = parser.parse_args()
    from onnxopt.datasets.mnist import build_splits
    from onnxopt.hostinfo import host_info

    started = time.perf_counter()
    splits, _ = build_splits()
    x_train = splits["train"][0]
    pick = np.sort(np.random.default_rng(0).choice(len(x_train), 200, replace=False))
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnxopt-regimes-") as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, input=x_train[pick])
        for name in args.models.split(","):
            results[name] = measure(name, build_models(name, calib), args.runs)
    payload = {"command": command_line("timing_regimes.py", parser, args, ("models", "runs")),
               "host": host_info().describe(), "runs": args.runs, "seconds": time.perf_counter() - started,
               "results": results}
    write_report(args.out, payload, render)


if __name__ == "__main__":
    main()
