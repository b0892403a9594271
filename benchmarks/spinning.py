"""Interleaved ONNX Runtime timing with and without intra-op thread spinning, against each model timed alone.

``onnxopt.bench`` times the models it compares round-robin in one process, one session each, and the placement
search times its candidates the same way. ORT's intra-op threads spin for a while after each run, waiting for the
next one; with several sessions in turn, the threads of the session that just ran spin on the cores the next
session needs. This script times, at batch 1 and 8 on 1 and 2 threads, an FP32 model beside three sessions of its
int8 model and two more FP32 copies, round-robin as ``onnxopt.bench`` does, with ORT's default spinning (the code
before) and without (``runtime.session_options(spinning=False)``, now), and as the reference each model alone in its
own process with default spinning (how it runs deployed), alternating FP32 and int8 processes. Copies of one file
should read the same ratio: their spread is the measurement's own noise.

Models: the digits example (MobileNetV2-style) and the zoo's MnasNet, FP32 normalized and int8 by onnxopt's
``quantize`` with ``placement=all`` (QDQ, per-channel), calibrated on 200 digits images.

Usage: nice -n 5 python benchmarks/spinning.py [--runs 3] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_files import write_report  # noqa: E402 - beside this script

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [(1, 1), (1, 2), (8, 1), (8, 2)]
MODELS = {"example": REPO / "onnxopt" / "examples" / "digits_cnn.onnx",
          "mnasnet": REPO / "onnxopt" / "zoo" / "models" / "mnasnet.onnx"}
#: The interleaved run: the FP32 reference, three sessions of the int8 file, two more of the FP32 file.
COPIES = ["fp32", "int8", "int8", "int8", "fp32", "fp32"]
REPEATS, ALONE_REPEATS = 30, 200


def prepare(name: str, source: Path, workdir: Path) -> dict[str, Path]:
    import onnx

    import onnxopt
    from onnxopt.datasets.digits import build_splits

    calib = workdir / f"{name}_calib.npz"
    np.savez(calib, **{onnx.load(str(source)).graph.input[0].name: build_splits()[0]["calib"][0][:200]})
    files = {"fp32": workdir / f"{name}_fp32.onnx", "int8": workdir / f"{name}_int8.onnx"}
    onnx.save(onnxopt.optimize(str(source), ["normalize"], measure_latency=False).model, str(files["fp32"]))
    quantized = onnxopt.optimize(str(source), ["normalize", {"name": "quantize", "placement": "all"}],
                                 calib=str(calib), measure_latency=False)
    onnx.save(quantized.model, str(files["int8"]))
    return files


@contextlib.contextmanager
def spinning_sessions(on: bool = True) -> Iterator[None]:
    """Within the block every ORT session spins between runs, as ``onnxopt.bench``'s did before it turned spinning
    off for interleaved sessions (``on=False``: no change)."""
    from onnxopt import runtime

    original = runtime.session_options
    if on:
        runtime.session_options = lambda *args, **kw: original(*args, **{**kw, "spinning": True})
    try:
        yield
    finally:
        runtime.session_options = original


def interleaved(files: dict[str, Path], batch: int, threads: int, spinning: bool, runs: int) -> list[list[float]]:
    """Per run, each copy's ratio FP32 median / copy median (``COPIES[1:]``), timed by ``onnxopt.bench``."""
    from onnxopt.bench import BenchConfig, benchmark

    labels = [f"{kind}_{i}" for i, kind in enumerate(COPIES)]
    config = BenchConfig(batch_sizes=(batch,), threads=(threads,), warmup=5, repeats=REPEATS)
    ratios = []
    with spinning_sessions(spinning):
        for _ in range(runs):
            report = benchmark([str(files[kind]) for kind in COPIES], config, labels=labels)
            base = report.result(labels[0], batch, threads).median_ms
            ratios.append([base / report.result(label, batch, threads).median_ms for label in labels[1:]])
    return ratios


def alone(files: dict[str, Path], batch: int, threads: int, runs: int) -> list[float]:
    """Per run, FP32 median / int8 median, each timed alone in its own process (default spinning)."""
    medians: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(runs):
        for kind in ("fp32", "int8"):
            done = subprocess.run([sys.executable, __file__, "--worker", str(files[kind]), str(batch), str(threads)],
                                  capture_output=True, text=True, check=True)
            medians[kind].append(json.loads(done.stdout.strip().splitlines()[-1])["median_ms"])
    return [f / q for f, q in zip(medians["fp32"], medians["int8"])]


def worker(path: str, batch: int, threads: int) -> None:
    from onnxopt.bench import measure_latency

    result = measure_latency(path, batch_size=batch, threads=threads, warmup=10, repeats=ALONE_REPEATS)
    print(json.dumps({"median_ms": result.median_ms}))


def render(payload: dict) -> str:
    lines = ["# Interleaved timing with and without ORT's intra-op spinning", "",
             f"Generated by `{payload['command']}` in {payload['minutes']:.1f} min. Do not edit by hand.", "",
             f"Host: {payload['host']}.", "",
             "Speed = FP32 median latency / model median latency (> 1: faster). 'alone' = each model in its own "
             f"process with ORT's default spinning, {ALONE_REPEATS} timed runs, FP32 and int8 processes alternated, "
             f"median over {payload['runs']} pairs (the deployed case). The interleaved columns time, round-robin in "
             f"one process as `onnxopt.bench` does ({REPEATS} rounds), the FP32 model beside three sessions of its "
             "int8 file and two more of the FP32 file: the range over the copies and the runs of the int8 copies' "
             "speed, and of the FP32 copies' (which should read 1.00x).", "",
             "| model | batch | threads | alone: int8 | interleaved, spinning (before): int8 copies | FP32 copies "
             "| interleaved, no spinning (now): int8 copies | FP32 copies |",
             "|---|---|---|---|---|---|---|---|"]

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}x-{max(values):.2f}x"

    for row in payload["rows"]:
        cells = []
        for mode in ("spinning", "no_spinning"):
            flat = [r for run in row[mode] for r in run]
            int8 = [r for i, r in enumerate(flat) if COPIES[1:][i % (len(COPIES) - 1)] == "int8"]
            fp32 = [r for i, r in enumerate(flat) if COPIES[1:][i % (len(COPIES) - 1)] == "fp32"]
            cells += [span(int8), span(fp32)]
        lines.append(f"| {row['model']} | {row['batch']} | {row['threads']} | {np.median(row['alone']):.2f}x | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "spinning.md")
    args = parser.parse_args()
    from onnxopt.hostinfo import host_info

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in MODELS.items():
            files = prepare(name, source, Path(tmp))
            for batch, threads in SETTINGS:
                print(f"{name} b{batch} t{threads}", flush=True)
                rows.append({"model": name, "batch": batch, "threads": threads,
                             "alone": alone(files, batch, threads, args.runs),
                             "spinning": interleaved(files, batch, threads, True, args.runs),
                             "no_spinning": interleaved(files, batch, threads, False, args.runs)})
    command = "nice -n 5 python benchmarks/spinning.py" + (f" --runs {args.runs}" if args.runs != 3 else "")
    payload = {"command": command, "minutes": (time.perf_counter() - started) / 60, "host": host_info().describe(),
               "runs": args.runs, "rows": rows}
    write_report(args.out, payload, render)


if __name__ == "__main__":
    main()
