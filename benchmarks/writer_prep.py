"""Int8 models of graphs whose weights ORT's quantizer mishandles: scaled Gemms, shared and tied initializers.

``onnxopt/passes/quantize/writer_prep.py`` rewrites the float graph (exactly) before ORT's writers see it, and the
quantize pass keeps per-tensor scales or float nodes where ORT's per-channel weights fail. Six nets, trained here
on scikit-learn's digits (train split, ``onnxopt.zoo.train``'s recipe) and exported with torch's TorchScript
exporter, have the patterns:

* ``scaled_addmm``: a head ``torch.addmm(b, h, W.t(), beta=0.5, alpha=2)``: a Gemm with alpha=2, beta=0.5;
* ``row_bias``: a head ``torch.addmm(b, h, W.t())`` with a ``[1, 10]`` bias: Gemm's C is ``[1, N]``;
* ``shared_head``: one Conv head applied to two levels of a feature pyramid (as RetinaNet/FCOS-style detectors share
  theirs): two Convs read the same weight and bias, on inputs of different ranges;
* ``tied_autoencoder``: ``h = relu(linear(f, W, b)); head(h @ W + f)``: W read by a Gemm (transB) and a MatMul;
* ``batched_heads``: ``torch.matmul`` of per-head features with a ``[4, 8, 8]`` parameter: a MatMul weight of rank 3;
* ``grouped_deconv``: an up-sampling ``ConvTranspose2d(groups=2)``.

Each model is quantized by ORT's ``quantize_static`` (QDQ with its defaults on the export as it is; QDQ and QOperator
per-channel with uint8 activations on onnxopt's normalized model) and by onnxopt's ``quantize`` pass with
``placement=all`` (per-channel weights, its default) in both formats, as it was before (the rewrites and the
per-channel guards replaced by no-ops in this process) and as it is; a quantizer that fails, or whose model ONNX
Runtime cannot run, shows its error. Columns: accuracy on the 400 held-out images, top-1 agreement and SQNR of the
logits against FP32, size vs the normalized FP32 model (the copies of shared initializers cost bytes), wall time.

Usage: nice -n 5 python benchmarks/writer_prep.py [--epochs 12] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from activation_guard import (CALIB, calibration_and_fp32, logits, measure_trained_nets,  # noqa: E402 - beside
                              ort_quantize, sqnr_db)
from report_files import write_report  # noqa: E402 - beside this script

REPO = Path(__file__).resolve().parents[1]
#: label -> (quantizer, format, with the rewrites); "ort" runs on the export as it is, "ort_best" on the normalized
VARIANTS = {
    "ORT quantize_static QDQ (defaults: per-tensor, export as it is)": ("ort", "qdq", False),
    "ORT quantize_static QDQ (normalized, per-channel, uint8 activations)": ("ort_best", "qdq", False),
    "ORT quantize_static QOperator (normalized, per-channel, uint8 activations)": ("ort_best", "qoperator", False),
    "onnxopt quantize qdq, placement=all, without the rewrites (the code before)": ("onnxopt", "qdq", False),
    "onnxopt quantize qdq, placement=all": ("onnxopt", "qdq", True),
    "onnxopt quantize qoperator, placement=all, without the rewrites (the code before)":
        ("onnxopt", "qoperator", False),
    "onnxopt quantize qoperator, placement=all": ("onnxopt", "qoperator", True),
}


def build_nets() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own name
    from torch import nn

    def stem() -> nn.Module:  # 32 features
        return nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(),
                             nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(128, 32), nn.ReLU())

    class ScaledAddmm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.w, self.b = stem(), nn.Parameter(torch.randn(10, 32) * 0.1), nn.Parameter(torch.zeros(10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addmm(self.b, self.stem(x), self.w.t(), beta=0.5, alpha=2.0)

    class RowBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.w = stem(), nn.Parameter(torch.randn(10, 32) * 0.1)
            self.b = nn.Parameter(torch.zeros(1, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addmm(self.b, self.stem(x), self.w.t())

    class SharedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU())
            self.c2 = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
            self.shared, self.head = nn.Conv2d(32, 32, 3, 1, 1), nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            fine = self.c1(x)
            levels = [fine, self.c2(fine)]  # one head for every level, as detectors share theirs across a pyramid
            pooled = [F.adaptive_avg_pool2d(F.relu(self.shared(level)), 1).flatten(1) for level in levels]
            return self.head(torch.cat(pooled, 1))

    class TiedAutoencoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.w = stem(), nn.Parameter(torch.randn(16, 32) * 0.2)
            self.b, self.head = nn.Parameter(torch.zeros(16)), nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.stem(x)
            return self.head(torch.matmul(F.relu(F.linear(f, self.w, self.b)), self.w) + f)

    class BatchedHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.w = stem(), nn.Parameter(torch.randn(4, 8, 8) * 0.3)
            self.head = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            heads = self.stem(x).reshape(-1, 4, 8).transpose(0, 1)  # [4, n, 8]
            return self.head(F.relu(torch.matmul(heads, self.w)).transpose(0, 1).reshape(-1, 32))

    class GroupedDeconv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
            self.up = nn.ConvTranspose2d(32, 32, 2, 2, groups=2)
            self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten(), nn.Linear(128, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.up(self.down(x)))

    return {"scaled_addmm": ScaledAddmm, "row_bias": RowBias, "shared_head": SharedHead,
            "tied_autoencoder": TiedAutoencoder, "batched_heads": BatchedHeads, "grouped_deconv": GroupedDeconv}


def onnxopt_quantize(source: Path, target: Path, calib_file: Path, fmt: str, rewrites: bool) -> list[str]:
    """onnxopt's pipeline (normalize, quantize); without ``rewrites``, as the code was before them. Its notes on
    the rewrites."""
    import onnx

    import onnxopt
    from onnxopt.passes.quantize.pass_ import QuantizePass

    original = (QuantizePass._prepare_for_writers, QuantizePass._where_per_channel_breaks)
    if not rewrites:
        QuantizePass._prepare_for_writers = lambda _self, fp32, *_args: fp32
        QuantizePass._where_per_channel_breaks = lambda _self, _proto, _ops, exclude, *_args: exclude
    try:
        result = onnxopt.optimize(str(source), ["normalize", {"name": "quantize", "format": fmt, "placement": "all"}],
                                  calib=str(calib_file), measure_latency=False)
    finally:
        QuantizePass._prepare_for_writers, QuantizePass._where_per_channel_breaks = original
    onnx.save(result.model, str(target))
    notes = result.report.to_dict()["steps"][-1].get("notes", [])
    return [note for note in notes if any(key in note for key in ("folded", "copied", "not a vector",
                                                                    "per tensor (", "rank 3+"))]


def measure_model(name: str, path: Path, splits: dict, workdir: Path) -> dict[str, Any]:
    calib_x, calib_file, fp32 = calibration_and_fp32(name, path, splits, workdir)
    x_eval, y_eval = splits["eval"]
    reference = logits(fp32, x_eval)
    rows: dict[str, dict[str, Any]] = {"FP32 (normalized)": _scores(reference, reference, y_eval, fp32, fp32)}
    for index, (label, (quantizer, fmt, rewrites)) in enumerate(VARIANTS.items()):
        target = workdir / f"{name}_{index}.onnx"
        started = time.perf_counter()
        notes: list[str] = []
        try:
            if quantizer == "onnxopt":
                notes = onnxopt_quantize(path, target, calib_file, fmt, rewrites)
            else:
                ort_quantize(path if quantizer == "ort" else fp32, target, calib_x, fmt, best=quantizer == "ort_best")
            seconds = time.perf_counter() - started
            out = logits(target, x_eval)
        except Exception as exc:  # noqa: BLE001 - a quantizer that fails is a row with its error
            rows[label] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:220]}
            continue
        rows[label] = {**_scores(reference, out, y_eval, fp32, target), "seconds": round(seconds, 2), "notes": notes}
    return {"model": name, "rows": rows}


def _scores(reference: np.ndarray, out: np.ndarray, labels: np.ndarray, fp32: Path, model: Path) -> dict[str, Any]:
    return {"accuracy": float(np.mean(out.argmax(1) == labels)),
            "agreement": float(np.mean(out.argmax(1) == reference.argmax(1))),
            "sqnr_db": sqnr_db(reference, out), "size_ratio": model.stat().st_size / fp32.stat().st_size}


def render(payload: dict) -> str:
    lines = ["# Int8 models of graphs whose weights ORT's quantizer mishandles", "",
             f"Generated by `{payload['command']}` in {payload['minutes']:.1f} min. Do not edit by hand.", "",
             f"Host: {payload['host']}.", "",
             "Data: scikit-learn digits (onnxopt.datasets.digits): nets trained on the 1097 training images "
             f"({payload['epochs']} epochs, onnxopt.zoo.train's recipe), {CALIB} calibration images, 400 held-out "
             "evaluation images. Columns: accuracy on the evaluation images; top-1 agreement and SQNR of the logits "
             "against the normalized FP32 model; size = file bytes / the normalized FP32 model's; time = the "
             "quantizer's wall time (onnxopt: normalize + quantize through `onnxopt.optimize`, validation "
             "included). 'failed' = the quantizer stopped, or ONNX Runtime could not run its model.", ""]
    for result in payload["results"]:
        lines += [f"## {result['model']}", "", "| variant | accuracy | agreement | SQNR dB | size | time |",
                  "|---|---|---|---|---|---|"]
        for label, row in result["rows"].items():
            if "error" in row:
                lines.append(f"| {label} | failed: {row['error']} | | | | |")
                continue
            lines.append(f"| {label} | {row['accuracy']:.2%} | {row['agreement']:.2%} | {row['sqnr_db']:.1f} | "
                         f"{row['size_ratio']:.3f} | " + (f"{row['seconds']:.1f} s" if "seconds" in row else "-")
                         + " |")
        notes = {note for row in result["rows"].values() for note in row.get("notes", [])}
        lines += [""] + [f"- onnxopt's note: {note}" for note in sorted(notes)] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "writer_prep.md")
    args = parser.parse_args()
    from onnxopt.datasets.digits import build_splits
    from onnxopt.hostinfo import host_info

    started = time.perf_counter()
    splits, _ = build_splits()
    with tempfile.TemporaryDirectory() as tmp:
        results = measure_trained_nets(build_nets(), measure_model, splits, args.epochs, Path(tmp))
    command = "nice -n 5 python benchmarks/writer_prep.py" + (f" --epochs {args.epochs}" if args.epochs != 12 else "")
    payload = {"command": command, "minutes": (time.perf_counter() - started) / 60, "host": host_info().describe(),
               "epochs": args.epochs, "results": results}
    write_report(args.out, payload, render)


if __name__ == "__main__":
    main()
