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
OUT_DIR = REPO / "onnxopt" / "examples"
MODEL_NAME = "digits_cnn.onnx"
CALIB_NAME = "digits_calib.npz"
EVAL_NAME = "digits_eval.npz"
INFO_NAME = "digits_cnn.json"

SEED = 0
CALIB_SIZE = 300
EVAL_SIZE = 400
SOURCE_SIZE = 8
IMAGE_SIZE = 32
CHANNELS = 3
PIXEL_MAX = 16.0  # load_digits pixels are integers 0..16
OPSET = 13
MIN_ACCURACY = 0.95

#: Training schedule: AdamW with a one-cycle learning rate, small random shifts as augmentation.
EPOCHS = 12
BATCH_SIZE = 64
LEARNING_RATE = 4e-3
WEIGHT_DECAY = 1e-4
MAX_SHIFT = 2  # pixels, in the 32x32 image
THREADS = 1  # a fixed thread count keeps CPU reductions in the same order from run to run


# ------------------------------------------------------------------------------------------------------------ data


def bilinear_matrix(src: int = SOURCE_SIZE, dst: int = IMAGE_SIZE) -> np.ndarray:
    """``[dst, src]`` weights of 1-D bilinear resampling with half-pixel centres and clamped edges.

    Every weight is a multiple of ``src / dst / 2`` (1/8 for 8 -> 32), so applying it to integers is exact.
    """
    scale = src / dst
    weights = np.zeros((dst, src), dtype=np.float64)
    for i in range(dst):
        position = max((i + 0.5) * scale - 0.5, 0.0)
        low = min(int(np.floor(position)), src - 1)
        high = min(low + 1, src - 1)
        frac = position - low
        weights[i, low] += 1.0 - frac
        weights[i, high] += frac
    return weights


def upsample(images: np.ndarray) -> np.ndarray:
    """``[N, 8, 8]`` pixel values -> ``[N, 32, 32]`` float64 (exact: dyadic weights, small integer pixels)."""
    rows = bilinear_matrix(images.shape[1])
    cols = bilinear_matrix(images.shape[2])
    return np.einsum("ih,nhw,jw->nij", rows, images.astype(np.float64), cols, optimize=False)


def split_indices(labels: np.ndarray, seed: int = SEED) -> dict[str, np.ndarray]:
    """Seeded, stratified, disjoint train / calib / eval indices (each sorted, so the files do not depend on the
    order the splitter returns)."""
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    rest, eval_idx = train_test_split(everything, test_size=EVAL_SIZE, stratify=labels, random_state=seed)
    train_idx, calib_idx = train_test_split(rest, test_size=CALIB_SIZE, stratify=labels[rest], random_state=seed + 1)
    return {"train": np.sort(train_idx), "calib": np.sort(calib_idx), "eval": np.sort(eval_idx)}


def build_splits(seed: int = SEED) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, float]]:
    """``{"train"|"calib"|"eval": (input float32 [N, 3, 32, 32], y int64 [N])}`` and the normalization constants.

    Needs only numpy and scikit-learn (the tests rebuild the shipped arrays with it).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    images = upsample(digits.images) / PIXEL_MAX  # [0, 1], float64
    indices = split_indices(labels, seed)
    train = images[indices["train"]]
    norm = {"mean": round(float(train.mean()), 4), "std": round(float(train.std()), 4)}
    splits = {}
    for name, idx in indices.items():
        x = ((images[idx] - norm["mean"]) / norm["std"]).astype(np.float32)
        x = np.ascontiguousarray(np.repeat(x[:, None], CHANNELS, axis=1))
        splits[name] = (x, labels[idx])
    return splits, norm


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


# ------------------------------------------------------------------------------------------------ train / evaluate


def seed_everything(seed: int, threads: int) -> None:
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def shift_batch(x: Any, generator: Any, max_shift: int, fill: float) -> Any:
    """Translate each image by up to ``max_shift`` pixels (background filled in), a cheap, seeded augmentation."""
    import torch
    from torch.nn import functional as F

    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def train(net: Any, x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int, fill: float, log: bool = True) -> None:
    """Train ``net`` in place on CPU: AdamW, one-cycle learning rate, seeded shuffling and shifts."""
    import torch
    from torch.nn import functional as F

    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    steps_per_epoch = (len(inputs) + BATCH_SIZE - 1) // BATCH_SIZE
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch)
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            images = shift_batch(inputs[batch], generator, MAX_SHIFT, fill)
            logits = net(images)
            loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
            correct += int((logits.argmax(1) == targets[batch]).sum())
        if log:
            print(f"  epoch {epoch + 1:2d}/{epochs}: loss {total_loss / len(inputs):.4f}, "
                  f"train accuracy {correct / len(inputs):.4f}", flush=True)
    net.eval()


def torch_logits(net: Any, x: np.ndarray) -> np.ndarray:
    import torch

    net.eval()
    with torch.no_grad():
        return torch.cat([net(torch.from_numpy(x[i:i + 200])) for i in range(0, len(x), 200)]).numpy()


def onnx_logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


# ------------------------------------------------------------------------------------------------------------ main


def build(out_dir: Path = OUT_DIR, *, seed: int = SEED, epochs: int = EPOCHS, threads: int = THREADS) -> dict:
    """Build every example file into ``out_dir`` and return the JSON record."""
    import onnx
    import onnxruntime
    import sklearn
    import torch

    if str(REPO) not in sys.path:  # run as a script, the package comes from this checkout
        sys.path.insert(0, str(REPO))
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
    fill = (0.0 - norm["mean"]) / norm["std"]  # a blank (zero-ink) pixel after normalization
    train(net, x_train, y_train, seed=seed, epochs=epochs, fill=fill)

    ref_logits = torch_logits(net, x_eval)
    model_bytes = nets.export_onnx(net, opset=OPSET, example_shape=(1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE))
    ort_logits = onnx_logits(model_bytes, x_eval)
    torch_accuracy = float(np.mean(ref_logits.argmax(1) == y_eval))
    ort_accuracy = float(np.mean(ort_logits.argmax(1) == y_eval))
    calib_accuracy = float(np.mean(onnx_logits(model_bytes, x_calib).argmax(1) == y_calib))
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
        "training": {"epochs": epochs, "batch_size": BATCH_SIZE, "optimizer": "AdamW", "lr": LEARNING_RATE,
                     "weight_decay": WEIGHT_DECAY, "schedule": "OneCycleLR", "augmentation":
                     f"random shift up to {MAX_SHIFT} px", "threads": threads},
        "accuracy": {"eval_torch": torch_accuracy, "eval_onnxruntime": ort_accuracy,
                     "calib_onnxruntime": calib_accuracy},
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
