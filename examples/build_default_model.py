"""Build the example model that ships with onnxopt (``onnxopt optimize --example``) and its data, reproducibly.

Run from the repository root (needs torch, scikit-learn, onnx, onnxruntime; about a minute on 2 CPU cores)::

    python examples/build_default_model.py

It writes, under ``onnxopt/examples/``:

- ``digits_cnn.onnx``: a MobileNetV2-style classifier (``onnxopt/zoo/nets.py``) trained on scikit-learn's digits,
  exported with opset 13, input ``input`` ``[batch, 3, 32, 32]`` float32, output ``logits`` ``[batch, 10]``. The
  exporter (``onnxopt.zoo.nets.export_onnx``) keeps every BatchNormalization node (in inference form) so that
  onnxopt's normalizer has folding to do.
- ``digits_calib.npz`` / ``digits_eval.npz``: 300 / 400 held-out images (``input`` float32 ``[N, 3, 32, 32]``,
  ``y`` int64 ``[N]``), disjoint from each other and from the training images.
- ``digits_cnn.json``: how it was made and how well it does (accuracy under torch and ONNX Runtime, which must agree),
  with the SHA-256 of the three files above. It holds no timings, so it is reproducible too.

Data: the 1797 8x8 images of ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download), split with a
seeded stratified shuffle into train (1097) / calib (300) / eval (400). Each image is upsampled to 32x32 with
bilinear interpolation (half-pixel centres, edge clamped: what ``torch.nn.functional.interpolate(...,
mode="bilinear", align_corners=False)`` and ONNX ``Resize`` with ``half_pixel`` do), scaled to [0, 1] and normalized
with the training set's mean and standard deviation (rounded to 4 decimals, recorded in the JSON). The grey channel
is repeated three times, so the model looks like the RGB image nets onnxopt is meant for (3-channel stem, the usual
``[N, 3, H, W]`` layout); the repeat costs little since the .npz files are compressed.

Reproducibility: the interpolation weights are multiples of 1/8, so upsampling the integer pixel values is exact in
float64 and the .npz files are byte-identical on every machine (the zip entries carry a fixed timestamp). Training
is seeded and runs with deterministic algorithms on a fixed number of CPU threads; two runs on the same machine and
torch build give the same weights, ONNX file and accuracy. Another CPU type may round differently in the last bits.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script, the package comes from this checkout
    sys.path.insert(0, str(REPO))

from onnxopt.datasets.digits import (  # noqa: E402  (re-exported: tests/test_examples.py uses them from here)
    CHANNELS,
    IMAGE_SIZE,
    PIXEL_MAX,
    SEED,
    bilinear_matrix,
    blank_value,
    build_splits,
    split_indices,
    upsample,
)
from onnxopt.zoo.train import EPOCHS, THREADS, evaluate, recipe, seed_everything, train  # noqa: E402

OUT_DIR = REPO / "onnxopt" / "examples"
MODEL_NAME = "digits_cnn.onnx"
CALIB_NAME = "digits_calib.npz"
EVAL_NAME = "digits_eval.npz"
INFO_NAME = "digits_cnn.json"

OPSET = 13
MIN_ACCURACY = 0.95

__all__ = ["bilinear_matrix", "build", "build_splits", "npz_bytes", "split_indices", "upsample"]


# ------------------------------------------------------------------------------------------------------------ files


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed .npz (what ``np.savez_compressed`` writes) with fixed zip metadata, so equal arrays give equal
    bytes (``np.savez_compressed`` stamps every entry with the current time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            payload = io.BytesIO()
            np.lib.format.write_array(payload, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            archive.writestr(info, payload.getvalue(), compresslevel=9)
    return buffer.getvalue()


def write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so an interrupted build leaves no half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------------------ main


def build(out_dir: Path = OUT_DIR, *, seed: int = SEED, epochs: int = EPOCHS, threads: int = THREADS) -> dict:
    """Build every example file into ``out_dir`` and return the JSON record."""
    import onnx
    import onnxruntime
    import sklearn
    import torch

    from onnxopt.zoo import nets

    started = time.perf_counter()
    seed_everything(seed, threads)
    splits, norm = build_splits(seed)
    (x_train, y_train), (x_calib, y_calib), (x_eval, y_eval) = splits["train"], splits["calib"], splits["eval"]
    print(f"data: train {len(y_train)}, calib {len(y_calib)}, eval {len(y_eval)}; "
          f"normalization mean {norm['mean']}, std {norm['std']}")

    net = nets.build("mobilenetv2", seed=seed)
    params, macs = nets.count_params(net), nets.count_macs(net)
    print(f"net: MobileNetV2Digits, {params} parameters, {macs / 1e6:.2f} M MACs per image; training {epochs} epochs "
          f"on {threads} thread(s)")
    fill = blank_value(norm)
    train(net, x_train, y_train, seed=seed, epochs=epochs, fill=fill)

    model_bytes = nets.export_onnx(net, opset=OPSET, example_shape=(1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE))
    accuracy, ref_logits, ort_logits = evaluate(net, model_bytes, splits)
    torch_accuracy, ort_accuracy = accuracy["eval_torch"], accuracy["eval_onnxruntime"]
    calib_accuracy = accuracy["calib_onnxruntime"]
    max_diff = float(np.abs(ref_logits - ort_logits).max())
    print(f"eval accuracy: torch {torch_accuracy:.4f}, onnxruntime {ort_accuracy:.4f} "
          f"(max |logit difference| {max_diff:.2e}); calib accuracy (onnxruntime) {calib_accuracy:.4f}")
    if torch_accuracy != ort_accuracy or not np.array_equal(ref_logits.argmax(1), ort_logits.argmax(1)):
        raise SystemExit("torch and ONNX Runtime disagree on the eval predictions")
    if ort_accuracy < MIN_ACCURACY:
        raise SystemExit(f"eval accuracy {ort_accuracy:.4f} is below {MIN_ACCURACY}")

    files = {
        MODEL_NAME: model_bytes,
        CALIB_NAME: npz_bytes({"input": x_calib, "y": y_calib}),
        EVAL_NAME: npz_bytes({"input": x_eval, "y": y_eval}),
    }
    batchnorms = sum(n.op_type == "BatchNormalization" for n in onnx.load_from_string(model_bytes).graph.node)
    info: dict[str, Any] = {
        "model": MODEL_NAME,
        "net": "MobileNetV2Digits (onnxopt/zoo/nets.py)",
        "params": params,
        "macs_per_image": macs,
        "batchnorm_nodes": batchnorms,
        "opset": OPSET,
        "input": {"name": "input", "shape": ["batch", CHANNELS, IMAGE_SIZE, IMAGE_SIZE], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
        "classes": list(range(10)),
        "data": {
            "source": "sklearn.datasets.load_digits (8x8 grayscale, 1797 images, pixels 0..16)",
            "preprocessing": (f"bilinear upsample 8x8 -> {IMAGE_SIZE}x{IMAGE_SIZE} (half-pixel centres, clamped "
                              f"edges), x / {PIXEL_MAX:g}, (x - mean) / std, grey repeated to {CHANNELS} channels"),
            "mean": norm["mean"],
            "std": norm["std"],
            "split": {"train": len(y_train), "calib": len(y_calib), "eval": len(y_eval),
                      "method": f"stratified train_test_split, random_state {seed} (eval) and {seed + 1} (calib)"},
            "calib_file": CALIB_NAME,
            "eval_file": EVAL_NAME,
        },
        "training": recipe(epochs, threads),
        "accuracy": accuracy,
        "seed": seed,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "scikit-learn": sklearn.__version__, "numpy": np.__version__},
        "sha256": {name: sha256(data) for name, data in files.items()},
        "bytes": {name: len(data) for name, data in files.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_bytes(out_dir / name, data)
    write_bytes(out_dir / INFO_NAME, (json.dumps(info, indent=2) + "\n").encode())
    total = sum(len(d) for d in files.values())
    print(f"wrote {', '.join(files)} and {INFO_NAME} to {out_dir} ({total / 1e6:.2f} MB); "
          f"{time.perf_counter() - started:.0f} s in all")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"where to write the files (default {OUT_DIR})")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (fixed for reproducibility)")
    args = parser.parse_args(argv)
    build(args.out_dir, seed=args.seed, epochs=args.epochs, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
