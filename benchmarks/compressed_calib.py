"""Calibration data in ``.npz`` (compressed or not) and ``.npy`` files: memory and time of reading it. One run.

``NpzSource`` used to memory-map a member written by ``np.savez`` and ``NpyFileSource`` a ``.npy`` file (a pass over
all of it then left every page of the file in the process's resident set), and to decompress a
``np.savez_compressed`` member whole, once to count its samples and again for every pass over the data, so a run
held the whole array. All three are now read a block of samples at a time (``NpzSource.block_bytes``) and counted
from their headers.

The data: ``--samples`` image-like samples of 3x128x128 float32 (seeded smooth fields in steps of 1/255, like
decoded images; 2000 samples = 393 MB raw), saved in a compressed and an uncompressed ``.npz`` (with labels) and a
``.npy``; the model: a seeded 3-conv net with a
Gemm head on that input (built here). Each run is its own subprocess (``nice -n 5``), timed from start to exit, its
peak memory its own high-water mark (``VmHWM``), per code version: this commit, and with ``--before REF`` the code
of git ref ``REF`` (a temporary worktree first on PYTHONPATH); each row runs ``--repeats`` times per version, the
versions taking turns going first. Rows, per file:

* ``read``: ``open_data(file).num_samples()``, then every batch of 32 (what a calibration pass over all of it does);
* ``onnxopt quantize --placement all`` and ``onnxopt quantize`` (defaults: the placement search), ``--no-latency``:
  calibration reads at most 256 samples (``--calib-samples``); with no ``--eval`` data the pipeline's fidelity
  checks run the model on up to 2000 calibration samples before and after each pass.

Usage: nice -n 5 python benchmarks/compressed_calib.py [--before REF] [--samples 2000] [--repeats 3]
       [--out reports/compressed_calib.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from large_model import check_output, run, warm_files, worktree  # noqa: E402 - beside this script
from report_files import command_line, write_report  # noqa: E402

SHAPE = (3, 128, 128)


def build_data(folder: Path, samples: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """Smooth image-like fields (8x8 blocks of a coarse random field plus fine noise, in steps of 1/255)."""
    rng = np.random.default_rng(seed)
    x = np.empty((samples, *SHAPE), np.float32)
    for start in range(0, samples, 100):
        stop = min(start + 100, samples)
        coarse = rng.random((stop - start, SHAPE[0], SHAPE[1] // 8, SHAPE[2] // 8), dtype=np.float32)
        fields = np.kron(coarse, np.ones((1, 1, 8, 8), np.float32))
        fields += rng.normal(0.0, 0.02, fields.shape).astype(np.float32)
        x[start:stop] = np.round(np.clip(fields, 0.0, 1.0) * 255.0) / 255.0
    labels = rng.integers(0, 10, samples)
    compressed, plain, npy = folder / "calib_compressed.npz", folder / "calib_plain.npz", folder / "calib.npy"
    np.savez_compressed(compressed, x=x, y=labels)
    np.savez(plain, x=x, y=labels)
    np.save(npy, x)
    return compressed, plain, npy


def build_model(folder: Path, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    channels = [SHAPE[0], 16, 32, 64]
    nodes, weights, last = [], [], "x"
    for i in range(3):
        w = rng.normal(0.0, (2.0 / (9 * channels[i])) ** 0.5, (channels[i + 1], channels[i], 3, 3)).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"conv{i}.w"),
                    numpy_helper.from_array(np.zeros(channels[i + 1], np.float32), f"conv{i}.b")]
        nodes += [helper.make_node("Conv", [last, f"conv{i}.w", f"conv{i}.b"], [f"c{i}"], pads=[1, 1, 1, 1],
                                   strides=[2, 2]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        last = f"r{i}"
    weights += [numpy_helper.from_array(rng.normal(0.0, 0.1, (64, 10)).astype(np.float32), "fc.w"),
                numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")]
    nodes += [helper.make_node("GlobalAveragePool", [last], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"])]
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                ["N", *SHAPE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "convnet.onnx"
    onnx.save(model, path)
    return path


def read_worker(path: str, out: str) -> None:
    """Count, then read every batch of 32: what the rows time. Writes which onnxopt ran, and what it read."""
    import onnxopt
    from onnxopt.calib_data import open_data
    from onnxopt.modelio import InputSpec

    source = open_data(path)
    count = source.num_samples()
    seen = checksum = 0
    for batch in source.iter_batches([InputSpec("x", ("N", *SHAPE), np.dtype(np.float32))], 32):
        seen += batch.size
        checksum += float(batch.inputs["x"][:, 0, 0, 0].sum())
    Path(out).write_text(json.dumps({"onnxopt": onnxopt.__file__, "counted": count, "read": seen,
                                     "checksum": round(checksum, 3)}))


def rows_for(data: Path, model: Path, versions: list[tuple[str, Path | None]], tag: str,
             repeats: int) -> list[dict]:
    """Each row ``repeats`` times per version, the versions alternating within each repeat (who goes first
    alternating too): the shared host's noise spreads over both."""
    said = model.parent / "read.json"
    runs = [("read: count, then every batch of 32", [sys.executable, str(Path(__file__).resolve()),
                                                     "--read-worker", str(data), str(said)]),
            ("onnxopt quantize --placement all", ["quantize", "--placement", "all"]),
            ("onnxopt quantize (defaults)", ["quantize"])]
    rows: list[dict] = []
    for label, args in runs:
        for version, tree in versions:
            rows.append({"data": tag, "row": label, "code": version, "runs": []})
        for repeat in range(repeats):
            turn = list(zip(versions, rows[-len(versions):]))
            for (version, tree), row in turn if repeat % 2 == 0 else turn[::-1]:
                row["runs"].append(_one_run(data, model, args, tree, said))
                print(f"  {tag}: {label} [{version}]: {json.dumps(row['runs'][-1])}", file=sys.stderr, flush=True)
    for row in rows:
        runs_ok = [r for r in row["runs"] if r["exit"] == 0]
        row["exit"] = max((r["exit"] for r in row["runs"]), key=abs)
        row["seconds"] = float(np.median([r["seconds"] for r in runs_ok])) if runs_ok else float("nan")
        row["seconds_range"] = [min(r["seconds"] for r in runs_ok), max(r["seconds"] for r in runs_ok)] if runs_ok \
            else []
        row["peak_mb"] = max(r["peak_mb"] for r in row["runs"])
        row.update({k: v for k, v in row["runs"][-1].items() if k not in ("exit", "seconds", "peak_mb")})
    return rows


def _one_run(data: Path, model: Path, args: list[str], tree: Path | None, said: Path) -> dict:
    # This commit's rows run this checkout's code too, not whatever an editable install points at.
    env = {**os.environ, "PYTHONPATH": str(tree or REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = model.parent / "out.onnx"
    if args[0] == sys.executable:
        command = args
    else:
        command = [sys.executable, "-m", "onnxopt", args[0], str(model), "-o", str(out), "--calib", str(data),
                   *args[1:], "--no-latency", "--no-plot", "-q"]
    result = run(command, env=env, cwd=tree or REPO)
    if args[0] == sys.executable and result["exit"] == 0:
        result.update(json.loads(said.read_text()))
    elif result["exit"] == 0 and out.exists():
        result.update(check_output(out))
        out.unlink()
    return result


def render(payload: dict) -> str:
    lines = ["# Calibration data in .npz (compressed or not) and .npy files: memory and time of reading it", "",
             f"Generated by `{payload['command']}` in {payload['minutes']:.1f} min ({payload['date']}). "
             "Do not edit by hand.", "", f"Host: {payload['host']}; load average before {payload['load_before']}, "
             f"after {payload['load_after']}.", "",
             f"Data: {payload['samples']} samples of 3x128x128 float32 ({payload['raw_mb']} MB raw): compressed "
             f".npz {payload['compressed_mb']} MB, uncompressed {payload['plain_mb']} MB, .npy (inputs only) "
             f"{payload.get('npy_mb', 'n/a')} MB. Each row is its own "
             f"process (imports included), run {payload['repeats']} times per code version (the versions taking "
             "turns going first): time = the median (the range in brackets), peak = the highest VmHWM (the resident "
             "pages of a memory-mapped file count). 'read' = `num_samples()`, then every batch of 32; the quantize "
             "rows calibrate on at most 256 samples and, with no `--eval` data, check fidelity on up to 2000 "
             "calibration samples before and after each pass (`--no-latency`).",
             "", "| data | row | code | exit | time | peak | notes |", "|---|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        notes = row.get("error") or ", ".join(
            f"{key} {row[key]}" for key in ("counted", "read", "checksum", "valid", "dequantize_nodes") if key in row)
        spread = "-".join(f"{v:.2f}" for v in row.get("seconds_range", []))
        lines.append(f"| {row['data']} | {row['row']} | {row['code']} | {row['exit']} | {row['seconds']:.2f} s "
                     f"({spread}) | {row['peak_mb']} MB | {notes} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "reports" / "compressed_calib.md"))
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each row per code version")
    parser.add_argument("--before", metavar="REF", help="also run the rows with the code of this git ref")
    parser.add_argument("--read-worker", nargs=2, metavar=("NPZ", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read_worker:
        read_worker(*args.read_worker)
        return
    from onnxopt.hostinfo import host_info

    started = time.perf_counter()
    load_before = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="onnxopt-compressed-") as tmp:
        workdir = Path(tmp)
        compressed, plain, npy = build_data(workdir, args.samples)
        model = build_model(workdir)
        warm_files(workdir)
        before = worktree(args.before, workdir / "before") if args.before else None
        try:
            versions = [("this commit", None)] + ([(f"before ({args.before})", before)] if before else [])
            rows = [row for path, tag in ((compressed, "compressed .npz"), (plain, "uncompressed .npz"), (npy, ".npy"))
                    for row in rows_for(path, model, versions, tag, args.repeats)]
        finally:
            if before is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
        sizes = {"compressed_mb": round(compressed.stat().st_size / 1e6, 1),
                 "plain_mb": round(plain.stat().st_size / 1e6, 1), "npy_mb": round(npy.stat().st_size / 1e6, 1)}
    payload = {"command": command_line("compressed_calib.py", parser, args, ("before", "samples", "repeats")),
               "minutes": (time.perf_counter() - started) / 60, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                        time.gmtime()),
               "host": host_info().describe(), "load_before": load_before,
               "load_after": ", ".join(f"{v:.1f}" for v in os.getloadavg()), "samples": args.samples,
               "repeats": args.repeats, "raw_mb": round(args.samples * int(np.prod(SHAPE)) * 4 / 1e6, 1), **sizes,
               "rows": rows}
    write_report(Path(args.out), payload, render)


if __name__ == "__main__":
    main()
