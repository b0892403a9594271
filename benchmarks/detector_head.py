"""A YOLO-style detector whose int8 QOperator model loses its scores while its output's SQNR looks fine.

The net finds one digit pasted at a random place on a 64x64 canvas (scikit-learn's digits, the train / calib / eval
split of ``onnxopt.datasets.digits``): an 8x8 grid of cells (stride 8), each predicting a box, an objectness score
and ten class scores, decoded in the graph as YOLOv5 exports do (Sigmoid, ``(2s - 0.5 + grid) * stride`` for the
centre, ``(2s)^2 * anchor`` for the size) and concatenated into one ``[N, 64, 15]`` output: boxes in pixels (0-64)
beside scores in [0, 1]. ONNX Runtime's QOperator ``QLinearConcat`` requantizes every input to the output's one
scale, so the scores land on a grid of about 0.3: the output's SQNR, dominated by the boxes, is the same with the
scores right or wrong, and the placement search's check (20 dB) let such a model through.
``onnxopt/passes/quantize/activation_guard.py`` keeps a Concat whose inputs' ranges differ over 16x float in
QOperator form.

Variants: ORT's ``quantize_static`` (QDQ defaults on the export; QOperator per-channel uint8 on the normalized
model); onnxopt's ``quantize`` in QOperator form with ``placement=all``, without the guard (the code before, in this
process) and with it, its QDQ form, and its defaults (the placement search). Columns: detection accuracy on the
400 held-out digits (the cell with the highest objectness has the right class and a centre within 4 px),
mean |score - FP32 score| over every cell's objectness and class scores, mean |centre - FP32 centre| in px at the
detected cell, the output's SQNR against FP32.

Usage: nice -n 5 python benchmarks/detector_head.py [--epochs 60] [--out FILE.md]
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

from activation_guard import ort_quantize, sqnr_db  # noqa: E402 - beside this script
from report_files import write_report  # noqa: E402 - beside this script

REPO = Path(__file__).resolve().parents[1]
CANVAS, GRID, STRIDE, DIGIT = 64, 8, 8, 32
CLASSES = 10
CALIB = 200
#: A detection is right when its class is and its centre is within this many pixels of the digit's.
HIT_PX = 4.0
#: label -> (quantizer, format, placement, guard)
VARIANTS = {
    "ORT quantize_static QDQ (defaults, export as it is)": ("ort", "qdq", None, False),
    "ORT quantize_static QOperator (normalized, per-channel, uint8 activations)":
        ("ort_best", "qoperator", None, False),
    "onnxopt quantize qoperator, placement=all, without the Concat guard (the code before)":
        ("onnxopt", "qoperator", "all", False),
    "onnxopt quantize qoperator, placement=all": ("onnxopt", "qoperator", "all", True),
    "onnxopt quantize qdq, placement=all": ("onnxopt", "qdq", "all", True),
    "onnxopt quantize qoperator (placement search), without the Concat guard (the code before)":
        ("onnxopt", "qoperator", "auto", False),
    "onnxopt quantize qoperator (placement search)": ("onnxopt", "qoperator", "auto", True),
    "onnxopt quantize (defaults: qdq, placement search)": ("onnxopt", "qdq", "auto", True),
}


def scenes(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each digit pasted at a random place on a blank canvas: images [N, 3, 64, 64], labels, centres [N, 2] (x, y)."""
    rng = np.random.default_rng(seed)
    blank = float(x.min())
    images = np.full((len(x), 3, CANVAS, CANVAS), blank, np.float32)
    offsets = rng.integers(0, CANVAS - DIGIT + 1, size=(len(x), 2))
    for i, (dx, dy) in enumerate(offsets):
        images[i, :, dy:dy + DIGIT, dx:dx + DIGIT] = x[i]
    return images, y, (offsets + DIGIT / 2).astype(np.float32)


def build_detector() -> Any:
    import torch
    from torch import nn

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for cin, cout in ((3, 16), (16, 32), (32, 32)):
                layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.head = nn.Conv2d(32, 5 + CLASSES, 1)
            cells = torch.arange(GRID, dtype=torch.float32)
            gy, gx = torch.meshgrid(cells, cells, indexing="ij")
            self.register_buffer("grid", torch.stack([gx, gy], -1).reshape(1, GRID * GRID, 2))
            self.register_buffer("anchor", torch.tensor([[[DIGIT / 2, DIGIT / 2]]]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raw = self.head(self.body(x)).flatten(2).transpose(1, 2)  # [N, 64, 15]
            s = torch.sigmoid(raw)
            xy = (s[..., :2] * 2 - 0.5 + self.grid) * STRIDE
            wh = (s[..., 2:4] * 2) ** 2 * self.anchor
            return torch.cat([xy, wh, s[..., 4:]], -1)

    return Detector


def train_detector(images: np.ndarray, labels: np.ndarray, centres: np.ndarray, epochs: int) -> Any:
    import torch

    torch.manual_seed(0)
    net = build_detector()()
    optimizer = torch.optim.Adam(net.parameters(), 2e-3)
    x_all, c_all = torch.from_numpy(images), torch.from_numpy(centres)
    cell_all = (c_all // STRIDE).long()
    index_all = cell_all[:, 1] * GRID + cell_all[:, 0]
    y_all = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(x_all), generator=generator).split(64):
            out = net(x_all[batch])
            rows = torch.arange(len(batch))
            cell = out[rows, index_all[batch]]  # the cell responsible for each digit
            objectness = torch.zeros(out.shape[:2])
            objectness[rows, index_all[batch]] = 1.0
            classes = torch.nn.functional.one_hot(y_all[batch], CLASSES).float()
            loss = (torch.nn.functional.binary_cross_entropy(out[..., 4].clamp(1e-6, 1 - 1e-6), objectness)
                    + torch.nn.functional.binary_cross_entropy(cell[:, 5:].clamp(1e-6, 1 - 1e-6), classes)
                    + (cell[:, :2] - c_all[batch]).abs().mean() / STRIDE
                    + (cell[:, 2:4] - DIGIT).abs().mean() / DIGIT)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def export(net: Any, path: Path) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, CANVAS, CANVAS),), str(path), input_names=["input"],
                          output_names=["detections"], dynamic_axes={"input": {0: "n"}, "detections": {0: "n"}},
                          opset_version=17, dynamo=False)


def onnxopt_quantize(source: Path, target: Path, calib_file: Path, fmt: str, placement: str,
                     guard: bool) -> list[str]:
    import onnx

    import onnxopt
    from onnxopt.passes.quantize import activation_guard

    ratio = activation_guard.CONCAT_RANGE_RATIO
    if not guard:
        activation_guard.CONCAT_RANGE_RATIO = float("inf")
    try:
        result = onnxopt.optimize(str(source), ["normalize", {"name": "quantize", "format": fmt,
                                                              "placement": placement}],
                                  calib=str(calib_file), measure_latency=False)
    finally:
        activation_guard.CONCAT_RANGE_RATIO = ratio
    onnx.save(result.model, str(target))
    notes = result.report.to_dict()["steps"][-1].get("notes", [])
    return [note for note in notes if "Concat" in note or note.startswith("verdict")]


def detections(path: Path, x: np.ndarray) -> np.ndarray:
    from onnxopt.runtime import make_session

    session = make_session(str(path), threads=1)
    return np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


def scores(out: np.ndarray, reference: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> dict[str, float]:
    rows = np.arange(len(out))
    best = out[..., 4].argmax(1)
    found = out[rows, best]
    hit = (found[:, 5:].argmax(1) == labels) & (np.linalg.norm(found[:, :2] - centres, axis=1) <= HIT_PX)
    reference_cell = reference[rows, reference[..., 4].argmax(1)]
    return {"accuracy": float(hit.mean()), "score_error": float(np.abs(out[..., 4:] - reference[..., 4:]).mean()),
            "centre_error_px": float(np.linalg.norm(out[rows, reference[..., 4].argmax(1), :2]
                                                    - reference_cell[:, :2], axis=1).mean()),
            "sqnr_db": sqnr_db(reference, out)}


def run(epochs: int, workdir: Path) -> dict[str, Any]:
    import onnx

    import onnxopt
    from onnxopt.datasets.digits import build_splits

    splits, _ = build_splits()
    train = scenes(*splits["train"], seed=0)
    calib_x = scenes(*splits["calib"], seed=1)[0][:CALIB]
    eval_x, eval_y, eval_c = scenes(*splits["eval"], seed=2)
    print("training the detector", flush=True)
    source = workdir / "detector.onnx"
    export(train_detector(*train, epochs=epochs), source)
    calib_file = workdir / "calib.npz"
    np.savez(calib_file, input=calib_x)
    fp32 = workdir / "fp32.onnx"
    onnx.save(onnxopt.optimize(str(source), ["normalize"], measure_latency=False).model, str(fp32))
    reference = detections(fp32, eval_x)
    rows = {"FP32 (normalized)": scores(reference, reference, eval_y, eval_c)}
    for index, (label, (quantizer, fmt, placement, guard)) in enumerate(VARIANTS.items()):
        print(label, flush=True)
        target = workdir / f"variant_{index}.onnx"
        started = time.perf_counter()
        notes: list[str] = []
        try:
            if quantizer == "onnxopt":
                notes = onnxopt_quantize(source, target, calib_file, fmt, placement, guard)
            else:
                ort_quantize(source if quantizer == "ort" else fp32, target, calib_x, fmt, best=quantizer == "ort_best")
            seconds = time.perf_counter() - started
            out = detections(target, eval_x)
        except Exception as exc:  # noqa: BLE001 - a quantizer that fails is a row with its error
            rows[label] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
            continue
        rows[label] = {**scores(out, reference, eval_y, eval_c), "seconds": round(seconds, 2), "notes": notes}
    return rows


def render(payload: dict) -> str:
    lines = ["# A YOLO-style detector whose int8 QOperator model loses its scores", "",
             f"Generated by `{payload['command']}` in {payload['minutes']:.1f} min. Do not edit by hand.", "",
             f"Host: {payload['host']}.", "",
             f"Data: each digit of scikit-learn's digits (onnxopt.datasets.digits splits) pasted at a random place on "
             f"a {CANVAS}x{CANVAS} canvas; the detector trained on the 1097 training scenes ({payload['epochs']} "
             f"epochs), {CALIB} calibration scenes, 400 held-out evaluation scenes. Columns: accuracy = the cell "
             f"with the highest objectness has the right class and a centre within {HIT_PX:g} px; score error = mean "
             "|score - FP32's| over every cell's objectness and class scores (in [0, 1]); centre error = mean "
             "distance to FP32's centre at FP32's detected cell; SQNR of the whole output against FP32; time = the "
             "quantizer's wall time (onnxopt: normalize + quantize through `onnxopt.optimize`, validation "
             "included).", "",
             "| variant | accuracy | score error | centre error | SQNR dB | time |", "|---|---|---|---|---|---|"]
    notes: set[str] = set()
    for label, row in payload["rows"].items():
        if "error" in row:
            lines.append(f"| {label} | failed: {row['error']} | | | | |")
            continue
        notes.update(f"{label}: {note}" for note in row.get("notes", []))
        lines.append(f"| {label} | {row['accuracy']:.2%} | {row['score_error']:.4f} | "
                     f"{row['centre_error_px']:.2f} px | {row['sqnr_db']:.1f} | "
                     + (f"{row['seconds']:.1f} s" if "seconds" in row else "-") + " |")
    lines += [""] + [f"- {note}" for note in sorted(notes)] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "detector_head.md")
    args = parser.parse_args()
    from onnxopt.hostinfo import host_info

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.epochs, Path(tmp))
    command = "nice -n 5 python benchmarks/detector_head.py" + (f" --epochs {args.epochs}" if args.epochs != 60
                                                                  else "")
    payload = {"command": command, "minutes": (time.perf_counter() - started) / 60, "host": host_info().describe(),
               "epochs": args.epochs, "rows": rows}
    write_report(args.out, payload, render)


if __name__ == "__main__":
    main()
