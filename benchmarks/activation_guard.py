"""Quantized models that keep their Relu/Clip and their attention masks, where ORT's quantizer gets them wrong.

ONNX Runtime's quantizer removes a Relu/Clip behind a quantized tensor and lets int8 saturation clip instead. In
QOperator form that holds only where the tensor is read by the activation alone and comes straight from its
producer; in both forms it cannot hold for a Clip whose interval excludes zero (every int8 range includes zero)
(``onnxopt/passes/quantize/activation_guard.py``). And an activation that holds -inf on the calibration data (a
causal attention mask added to the scores) has no int8 range: onnxopt refused such a model with ``format=qoperator``
(whose op types include the Add); it now keeps the nodes reading or writing it float. Seven nets, trained here on
scikit-learn's digits (train split, ``onnxopt.zoo.train``'s recipe) and exported with torch's TorchScript exporter,
have the patterns:

* ``transformer``: a small ViT-style encoder (4x4 patches, 2 ``nn.TransformerEncoderLayer``s): each feed-forward
  block, normalized, is ``Gemm -> Reshape -> Relu``;
* ``preact``: pre-activation residual blocks, ``x + Conv(Relu(Conv(Relu(x))))``: the first Relu's input is read by
  the residual Add too;
* ``pool_relu``: the Caffe-era order ``Conv -> MaxPool -> Relu``;
* ``floor_gate``: gates with a floor, ``y * clamp(Conv(y), 0.1, 1)``;
* ``causal_transformer``: the ``transformer`` with a causal mask (-inf above the diagonal, as
  ``nn.Transformer.generate_square_subsequent_mask`` makes it), classifying from its last token;
* ``causal_transformer_lowest_fill``: the same with float32's lowest value as the mask's fill (as Hugging Face
  transformers builds its masks): finite, but a Softmax input spanning 3.4e38 leaves the real scores no int8 step,
  so onnxopt keeps the nodes reading or writing such a Softmax input float (``collect.mask_filled_softmax_inputs``);
* ``padded_transformer``: the ``transformer`` with a key padding mask (``src_key_padding_mask``) over the empty
  patches, computed in the graph as BERT-style models compute theirs from an input: its -inf reaches tensors that
  the QDQ op types calibrate too (Where, Reshape, Expand), so the code before refused it in both formats.

Each model is quantized by ORT's ``quantize_static`` (QOperator with its defaults on the export as it is; QOperator
and QDQ per-channel with uint8 activations on onnxopt's normalized model) and by onnxopt's ``quantize`` pass with
``placement=all`` in both formats, as it was before (the guard replaced by a no-op and the calibrator's handling of
-inf by the plain update, which refuses it, in this process) and as it is; a quantizer that fails shows its
error. Columns: accuracy on the 400 held-out images, top-1 agreement and SQNR of the logits against FP32, the
Relu/Clip nodes the model still runs, and speed vs the normalized FP32 model (batch 1, 1 thread, every variant of a
model interleaved round-robin by ``onnxopt.bench``, median of the per-run ratio of medians over 3 runs).

With ``--tf-python`` (a venv with tensorflow and tf2onnx), a seventh: a Keras causal transformer (MultiHeadAttention
with ``use_causal_mask``, which masks with a finite fill through SelectV2), trained in TensorFlow on the same split
and exported by tf2onnx.

Usage: nice -n 5 python benchmarks/activation_guard.py [--epochs 12] [--tf-python PY] [--out FILE.md]
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

from report_files import write_report  # noqa: E402 - beside this script

REPO = Path(__file__).resolve().parents[1]
CALIB = 200
TIMING_RUNS = 3
#: label -> (quantizer, format, guard): "ort" on the export as it is, "ort_best" on the normalized model
VARIANTS = {
    "ORT quantize_static QOperator (defaults, export as it is)": ("ort", "qoperator", False),
    "ORT quantize_static QOperator (normalized, per-channel, uint8 activations)": ("ort_best", "qoperator", False),
    "ORT quantize_static QDQ (normalized, per-channel, uint8 activations)": ("ort_best", "qdq", False),
    "onnxopt quantize qoperator, placement=all, without the guard (the code before)": ("onnxopt", "qoperator", False),
    "onnxopt quantize qoperator, placement=all": ("onnxopt", "qoperator", True),
    "onnxopt quantize qdq, placement=all, without the guard (the code before)": ("onnxopt", "qdq", False),
    "onnxopt quantize qdq, placement=all": ("onnxopt", "qdq", True),
}


def build_nets() -> dict[str, Any]:
    import torch
    from torch import nn

    class Transformer(nn.Module):
        def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 4, 4)
            self.position = nn.Parameter(torch.zeros(1, 64, dim))
            layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.head = nn.Linear(dim, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
            return self.head(self.encoder(tokens).mean(1))

    class CausalTransformer(Transformer):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", torch.triu(torch.full((64, 64), float("-inf")), diagonal=1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
            return self.head(self.encoder(tokens, mask=self.mask)[:, -1])

    class PreActBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
            self.shortcut = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shortcut(x) + self.conv2(torch.relu(self.conv1(torch.relu(x))))

    class PreAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, 1, 1)
            self.blocks = nn.Sequential(PreActBlock(16, 16, 1), PreActBlock(16, 32, 2), PreActBlock(32, 32, 1),
                                        PreActBlock(32, 64, 2))
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.blocks(self.stem(x))).mean((2, 3)))

    class PoolRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, 1, 1), nn.Conv2d(16, 32, 3, 1, 1),
                                        nn.Conv2d(32, 64, 3, 1, 1)])
            self.head = nn.Linear(64 * 4 * 4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for conv in self.convs:
                x = torch.relu(nn.functional.max_pool2d(conv(x), 2))
            return self.head(x.flatten(1))

    class FloorGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1),
                                        nn.Conv2d(32, 64, 3, 2, 1)])
            self.gates = nn.ModuleList([nn.Conv2d(c, c, 1) for c in (16, 32, 64)])
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for conv, gate in zip(self.convs, self.gates):
                x = torch.relu(conv(x))
                x = x * torch.clamp(gate(x), 0.1, 1.0)
            return self.head(x.mean((2, 3)))

    class CausalTransformerLowestFill(CausalTransformer):
        def __init__(self) -> None:
            super().__init__()
            self.mask = torch.triu(torch.full((64, 64), torch.finfo(torch.float32).min), diagonal=1)

    class PaddedTransformer(Transformer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
            background = x[:, :1].amin((2, 3), keepdim=True)
            empty = nn.functional.avg_pool2d((x[:, :1] - background).abs(), 4).flatten(1) < 1e-3
            return self.head(self.encoder(tokens, src_key_padding_mask=empty).mean(1))

    return {"transformer": Transformer, "preact": PreAct, "pool_relu": PoolRelu, "floor_gate": FloorGate,
            "causal_transformer": CausalTransformer, "causal_transformer_lowest_fill": CausalTransformerLowestFill,
            "padded_transformer": PaddedTransformer}


def train_and_export(name: str, net_class: Any, splits: dict, epochs: int, workdir: Path) -> Path:
    import warnings

    import torch

    from onnxopt.zoo.train import seed_everything, train

    seed_everything(0, 1)
    net = net_class()
    x, y = splits["train"]
    train(net, x, y, seed=0, epochs=epochs, fill=float(x.min()), log=False)
    path = workdir / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
                          opset_version=17, dynamo=False)
    return path


def ort_quantize(source: Path, target: Path, calib: np.ndarray, fmt: str, best: bool) -> None:
    """ORT's defaults (int8 activations), or its best settings for x86 (per-channel, uint8 activations)."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):  # noqa: ANN202 - ORT's interface
            item = next(self.items, None)
            return None if item is None else {"input": item}

    logging.disable(logging.WARNING)
    try:
        options = {"per_channel": True, "activation_type": QuantType.QUInt8} if best else {}
        quant_format = QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ
        quantize_static(str(source), str(target), Reader(), quant_format=quant_format, **options)
    finally:
        logging.disable(logging.NOTSET)


def onnxopt_quantize(source: Path, target: Path, calib_file: Path, fmt: str, guard: bool) -> dict[str, Any]:
    import onnx

    import onnxopt
    from onnxopt.passes.quantize import activation_guard
    from onnxopt.passes.quantize import pass_ as quantize_pass
    from onnxopt.passes.quantize.calibrators import Calibrator

    original = (activation_guard.guard_activation_removal, Calibrator.update_activations,
                quantize_pass.mask_filled_softmax_inputs)
    if not guard:  # the code before: ORT's writer gets the ranges and exclusions as they are, -inf is refused
        activation_guard.guard_activation_removal = lambda _model, ranges, *_args, **_kw: activation_guard.Guard(ranges)
        Calibrator.update_activations = Calibrator.update_many
        quantize_pass.mask_filled_softmax_inputs = lambda *_args: {}
    try:
        result = onnxopt.optimize(str(source), ["normalize", {"name": "quantize", "format": fmt, "placement": "all"}],
                                  calib=str(calib_file), measure_latency=False)
    finally:
        (activation_guard.guard_activation_removal, Calibrator.update_activations,
         quantize_pass.mask_filled_softmax_inputs) = original
    onnx.save(result.model, str(target))
    notes = result.report.to_dict()["steps"][-1].get("notes", [])
    return {"guard_notes": [note for note in notes
                            if "kept float" in note or "moved up" in note or "no int8 range serves" in note]}


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    from onnxopt.runtime import make_session

    session = make_session(str(path), threads=1)
    return np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


def sqnr_db(reference: np.ndarray, noisy: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - noisy) ** 2))
    return float("inf") if noise == 0 else 10 * float(np.log10(np.sum(reference.astype(np.float64) ** 2) / noise))


def calibration_and_fp32(name: str, path: Path, splits: dict, workdir: Path) -> tuple[np.ndarray, Path, Path]:
    """The calibration images (as an array and as an .npz file for onnxopt) and the normalized FP32 model's file."""
    import onnx

    import onnxopt

    calib_x = splits["calib"][0][:CALIB]
    calib_file = workdir / f"{name}_calib.npz"
    np.savez(calib_file, input=calib_x)
    fp32 = workdir / f"{name}_fp32.onnx"
    onnx.save(onnxopt.optimize(str(path), ["normalize"], measure_latency=False).model, str(fp32))
    return calib_x, calib_file, fp32


def measure_model(name: str, path: Path, splits: dict, workdir: Path) -> dict[str, Any]:
    import onnx

    from onnxopt.bench import BenchConfig, benchmark

    calib_x, calib_file, fp32 = calibration_and_fp32(name, path, splits, workdir)
    x_eval, y_eval = splits["eval"]
    files = {"FP32 (normalized)": fp32}
    extra: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for index, (label, (quantizer, fmt, guard)) in enumerate(VARIANTS.items()):
        target = workdir / f"{name}_{index}.onnx"
        started = time.perf_counter()
        try:
            if quantizer == "onnxopt":
                extra[label] = onnxopt_quantize(path, target, calib_file, fmt, guard)
            else:
                ort_quantize(path if quantizer == "ort" else fp32, target, calib_x, fmt, best=quantizer == "ort_best")
            out = logits(target, x_eval[:1])
            if not np.isfinite(out).all():
                raise ValueError("its output is not finite")
        except Exception as exc:  # noqa: BLE001 - a quantizer that fails is a row with its error
            from onnxopt.errors import DataError

            kind = "DataError (exit 2 from the CLI)" if isinstance(exc, DataError) else type(exc).__name__
            errors[label] = f"{kind}: {exc}".splitlines()[0][:200]
            continue
        extra.setdefault(label, {})["seconds"] = round(time.perf_counter() - started, 2)
        files[label] = target
    reference = logits(fp32, x_eval)
    rows: dict[str, dict[str, Any]] = {}
    for label, file in files.items():
        out = logits(file, x_eval)
        graph = onnx.load(str(file)).graph
        rows[label] = {"accuracy": float(np.mean(out.argmax(1) == y_eval)),
                       "agreement": float(np.mean(out.argmax(1) == reference.argmax(1))),
                       "sqnr_db": sqnr_db(reference, out),
                       "activations": sum(node.op_type in ("Relu", "Clip") for node in graph.node),
                       "speed_runs": [], **extra.get(label, {})}
    labels = list(files)
    config = BenchConfig(batch_sizes=(1,), threads=(1,), warmup=20, repeats=200)
    for _ in range(TIMING_RUNS):
        report = benchmark([str(files[label]) for label in labels], config, labels=labels)
        base = report.result(labels[0], 1, 1).median_ms
        for label in labels:
            rows[label]["speed_runs"].append(base / report.result(label, 1, 1).median_ms)
    for row in rows.values():
        row["speed"] = float(np.median(row["speed_runs"]))
    rows.update({label: {"error": error} for label, error in errors.items()})
    return {"model": name, "rows": {label: rows[label] for label in ["FP32 (normalized)", *VARIANTS] if label in rows}}


def render(payload: dict) -> str:
    lines = ["# Quantized models that keep their Relu/Clip and attention masks where ORT's quantizer gets them wrong",
             "",
             f"Generated by `{payload['command']}` in {payload['minutes']:.1f} min. Do not edit by hand.", "",
             f"Host: {payload['host']}.", "",
             "Data: scikit-learn digits (onnxopt.datasets.digits): nets trained on the 1097 training images "
             f"({payload['epochs']} epochs, onnxopt.zoo.train's recipe), {CALIB} calibration images, 400 held-out "
             "evaluation images. Columns: accuracy on the evaluation images; top-1 agreement and SQNR of the logits "
             "against the normalized FP32 model; Relu/Clip = activation nodes the model still runs (the writers fold "
             "the others into their producers' saturation); speed = FP32 / variant latency, batch 1, 1 "
             f"thread, round-robin, median over {TIMING_RUNS} runs; time = the quantizer's wall time (onnxopt: "
             "normalize + quantize through `onnxopt.optimize`, validation included).", ""]
    for result in payload["results"]:
        lines += [f"## {result['model']}", "",
                  "| variant | accuracy | agreement | SQNR dB | Relu/Clip | speed | time |",
                  "|---|---|---|---|---|---|---|"]
        for label, row in result["rows"].items():
            if "error" in row:
                lines.append(f"| {label} | failed: {row['error']} | | | | | |")
                continue
            lines.append(f"| {label} | {row['accuracy']:.2%} | {row['agreement']:.2%} | {row['sqnr_db']:.1f} | "
                         f"{row['activations']} | {row['speed']:.2f}x | "
                         + (f"{row['seconds']:.1f} s" if "seconds" in row else "-") + " |")
        notes = {note for row in result["rows"].values() for note in row.get("guard_notes", [])}
        lines += [""] + [f"- onnxopt's note: {note}" for note in sorted(notes)] + [""]
    return "\n".join(lines)


#: Run in the TensorFlow venv (``--tf-python``): a Keras causal transformer trained on the digits split the main
#: process wrote, exported by tf2onnx. Keras's MultiHeadAttention masks with a finite fill (SelectV2 -> Where).
KERAS_SCRIPT = r"""
import sys
import numpy as np, tensorflow as tf, tf2onnx
workdir, epochs = sys.argv[1], int(sys.argv[2])
tf.keras.utils.set_random_seed(0)
data = np.load(workdir + "/train.npz")
inp = tf.keras.Input((3, 32, 32), batch_size=None, name="input")
x = tf.keras.layers.Reshape((3, 8, 4, 8, 4))(inp)
x = tf.keras.layers.Permute((2, 4, 1, 3, 5))(x)
h = tf.keras.layers.Dense(64)(tf.keras.layers.Reshape((64, 48))(x))
for _ in range(2):
    a = tf.keras.layers.MultiHeadAttention(4, 16)(h, h, use_causal_mask=True)
    h = tf.keras.layers.LayerNormalization()(h + a)
    f = tf.keras.layers.Dense(128, activation="relu")(h)
    h = tf.keras.layers.LayerNormalization()(h + tf.keras.layers.Dense(64)(f))
out = tf.keras.layers.Dense(10)(h[:, -1])
model = tf.keras.Model(inp, out)
model.compile(tf.keras.optimizers.Adam(2e-3), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(data["x"], data["y"], batch_size=64, epochs=epochs, verbose=0)
spec = (tf.TensorSpec((1, 3, 32, 32), tf.float32, name="input"),)
tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=workdir + "/keras_causal.onnx")
"""


def keras_model(tf_python: str, splits: dict, epochs: int, workdir: Path) -> Path:
    import subprocess

    x, y = splits["train"]
    np.savez(workdir / "train.npz", x=x, y=y)
    done = subprocess.run([tf_python, "-c", KERAS_SCRIPT, str(workdir), str(epochs)], capture_output=True, text=True,
                          timeout=1800)
    path = workdir / "keras_causal.onnx"
    if done.returncode or not path.exists():
        raise RuntimeError(f"the Keras model could not be made: {done.stderr.strip().splitlines()[-1:]}")
    return path


def measure_trained_nets(nets: dict[str, Any], measure: Any, splits: dict, epochs: int, workdir: Path) -> list:
    """``measure(name, exported_path, splits, workdir)`` for each of ``nets`` trained on the digits split."""
    results = []
    for name, net_class in nets.items():
        print(f"{name}: training", flush=True)
        path = train_and_export(name, net_class, splits, epochs, workdir)
        print(f"{name}: quantizing", flush=True)
        results.append(measure(name, path, splits, workdir))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "activation_guard.md")
    parser.add_argument("--tf-python", default=None,
                        help="python of a venv with tensorflow and tf2onnx: adds a Keras causal transformer")
    args = parser.parse_args()
    from onnxopt.datasets.digits import build_splits
    from onnxopt.hostinfo import host_info

    started = time.perf_counter()
    splits, _ = build_splits()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results = measure_trained_nets(build_nets(), measure_model, splits, args.epochs, workdir)
        if args.tf_python:
            print("keras_causal_transformer: training in TensorFlow", flush=True)
            path = keras_model(args.tf_python, splits, args.epochs, workdir)
            results.append(measure_model("keras_causal_transformer (tf2onnx)", path, splits, workdir))
    command = "nice -n 5 python benchmarks/activation_guard.py" + (
        f" --epochs {args.epochs}" if args.epochs != 12 else "") + (
        f" --tf-python {args.tf_python}" if args.tf_python else "")
    payload = {"command": command, "minutes": (time.perf_counter() - started) / 60, "host": host_info().describe(),
               "epochs": args.epochs, "results": results}
    write_report(args.out, payload, render)


if __name__ == "__main__":
    main()
