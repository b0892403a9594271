"""Train the example zoo's architectures on real MNIST (:mod:`onnxopt.datasets.mnist`: 3000 train / 2000 test) and
export them to ONNX, for benchmarks that need more held-out images than scikit-learn's digits have.

The recipe is the zoo's (``onnxopt.zoo.train``: seeded AdamW, one-cycle schedule, random shifts, one torch thread,
deterministic algorithms); each net trains in its own process. Models are cached in ``--out-dir`` with
``mnist_nets.json`` (accuracy on the test split, parameters, SHA-256): a second call with the same recipe reuses them.

Usage: nice -n 5 python benchmarks/mnist_nets.py [--out-dir DIR] [--models mobilenetv2 resnet] [--jobs 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from onnxopt.zoo.train import EPOCHS, THREADS, onnx_logits, recipe, seed_everything, train  # noqa: E402

NETS = ("mobilenetv2", "resnet", "shufflenetv2", "mnasnet")
DEFAULT_DIR = Path.home() / ".cache" / "onnxopt" / "mnist_nets"
INFO_FILE = "mnist_nets.json"
SEED = 0


def build_one(name: str, out_dir: Path, seed: int, epochs: int) -> dict[str, Any]:
    """Train and export ``name``; returns its record (the ONNX file is written atomically to ``out_dir``)."""
    from onnxopt.datasets.grey_splits import blank_value
    from onnxopt.datasets.mnist import CHANNELS, IMAGE_SIZE, build_splits
    from onnxopt.modelio import atomic_write_bytes
    from onnxopt.zoo import nets

    started = time.perf_counter()
    seed_everything(seed, THREADS)
    splits, norm = build_splits(seed)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    net = nets.build(name, seed=seed)
    train(net, x_train, y_train, seed=seed, epochs=epochs, fill=blank_value(norm), log=False)
    model_bytes = nets.export_onnx(net, opset=13, example_shape=(1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE))
    atomic_write_bytes(out_dir / f"{name}.onnx", model_bytes)
    accuracy = float(np.mean(onnx_logits(model_bytes, x_test).argmax(1) == y_test))
    print(f"{name}: test accuracy {accuracy:.4f} ({len(y_test)} images), {time.perf_counter() - started:.0f} s",
          flush=True)
    return {"onnx": f"{name}.onnx", "net": type(net).__name__, "params": nets.count_params(net),
            "test_accuracy": accuracy, "sha256": hashlib.sha256(model_bytes).hexdigest()}


def build(out_dir: Path = DEFAULT_DIR, names: tuple[str, ...] = NETS, *, seed: int = SEED, epochs: int = EPOCHS,
          jobs: int = 2) -> dict[str, Any]:
    """The nets ``names`` in ``out_dir``, trained now unless a previous call with the same recipe left them there."""
    import torch

    from onnxopt.modelio import atomic_write_text

    wanted_recipe = {**recipe(epochs, THREADS), "seed": seed, "data": "onnxopt.datasets.mnist", "torch":
                     torch.__version__}
    info_path = out_dir / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("recipe") != wanted_recipe:
        info = {"recipe": wanted_recipe, "models": {}}
    models = info["models"]
    missing = [n for n in names if n not in models or not (out_dir / models[n]["onnx"]).is_file()]
    if missing:
        out_dir.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {n: pool.submit(build_one, n, out_dir, seed, epochs) for n in missing}
            models.update({n: future.result() for n, future in futures.items()})
        atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--models", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    info = build(args.out_dir, tuple(args.models), epochs=args.epochs, jobs=args.jobs)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
