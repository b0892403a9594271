"""Build the example zoo (``onnxopt/zoo/models/``) reproducibly: five small classifiers in the style of common
vision networks, trained on scikit-learn's digits and exported to ONNX.

Run from the repository root (needs torch, scikit-learn, onnx, onnxruntime; a few CPU-minutes in all)::

    nice -n 5 python examples/build_zoo.py [--models mnasnet vgg] [--jobs 2]

For every net of :data:`ZOO` (architectures in ``onnxopt/zoo/nets.py``) it writes ``<name>.onnx`` (opset 13, input
``input`` ``[batch, 3, 32, 32]``, output ``logits`` ``[batch, 10]``, every BatchNormalization node kept, by
``onnxopt.zoo.nets.export_onnx``) and ``<name>.pt`` (the trained torch ``state_dict``, for tools that work on the torch
source model, e.g. Torch-Pruning; ``onnxopt.zoo.load_torch(name)`` rebuilds the module), then ``zoo.json``: per model
the constructor and its keywords, parameters, MACs per image, accuracy under torch and ONNX Runtime on the eval split,
and the SHA-256 of both files. No timings, so the JSON is reproducible too.

Data and recipe are the shipped example's (``examples/build_default_model.py``): the digits splits of
:mod:`onnxopt.datasets.digits` (train 1097 / calib 300 / eval 400, the calib and eval splits are
``onnxopt/examples/digits_calib.npz`` / ``digits_eval.npz``) and the training loop of :mod:`onnxopt.zoo.train`
(seeded, deterministic algorithms, one torch thread per model). Each model trains in its own process, so ``--jobs``
changes the wall time, never the weights. Two runs on the same machine and torch build give byte-identical files;
another CPU type may round differently in the last bits.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script, the package comes from this checkout
    sys.path.insert(0, str(REPO))

from onnxopt.datasets.digits import CHANNELS, IMAGE_SIZE, SEED, blank_value, build_splits  # noqa: E402
from onnxopt.zoo import INFO_FILE, MODELS_DIR  # noqa: E402
from onnxopt.zoo.train import EPOCHS, THREADS, evaluate, recipe, seed_everything, train  # noqa: E402

OPSET = 13
MIN_ACCURACY = 0.97
MAX_ONNX_BYTES = 1_500_000

#: zoo name -> (net in onnxopt.zoo.nets.NETS, constructor keywords). Widths are the nets' defaults: each model stays
#: under 1 MB of ONNX and trains in well under a CPU-minute.
ZOO: dict[str, tuple[str, dict[str, Any]]] = {
    "mobilenetv2": ("mobilenetv2", {}),
    "shufflenetv2": ("shufflenetv2", {}),
    "mnasnet": ("mnasnet", {}),
    "resnet": ("resnet", {}),
    "vgg": ("vgg", {}),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so an interrupted build leaves no half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def build_one(name: str, seed: int, epochs: int, threads: int) -> tuple[dict[str, Any], bytes, bytes]:
    """Train and export zoo model ``name``: (its zoo.json record, ONNX bytes, torch state_dict bytes)."""
    import torch

    from onnxopt.zoo import nets

    started = time.perf_counter()
    seed_everything(seed, threads)
    splits, norm = build_splits(seed)
    x_train, y_train = splits["train"]
    net_name, options = ZOO[name]
    net = nets.build(net_name, seed=seed, **options)
    params, macs = nets.count_params(net), nets.count_macs(net)
    train(net, x_train, y_train, seed=seed, epochs=epochs, fill=blank_value(norm), log=False)

    model_bytes = nets.export_onnx(net, opset=OPSET, example_shape=(1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE))
    accuracy, ref_logits, ort_logits = evaluate(net, model_bytes, splits)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    state_bytes = buffer.getvalue()
    record = {
        "onnx": f"{name}.onnx",
        "state_dict": f"{name}.pt",
        "net": type(net).__name__,
        "builder": net_name,
        "options": options,
        "params": params,
        "macs_per_image": macs,
        "accuracy": accuracy,
        "max_abs_logit_diff": float(np.abs(ref_logits - ort_logits).max()),
        "sha256": {f"{name}.onnx": sha256(model_bytes), f"{name}.pt": sha256(state_bytes)},
        "bytes": {f"{name}.onnx": len(model_bytes), f"{name}.pt": len(state_bytes)},
    }
    print(f"{name}: {type(net).__name__}, {params} parameters, {macs / 1e6:.2f} M MACs; eval accuracy torch "
          f"{accuracy['eval_torch']:.4f}, onnxruntime {accuracy['eval_onnxruntime']:.4f}; "
          f"{len(model_bytes) / 1e6:.2f} MB; "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return record, model_bytes, state_bytes


def check(name: str, record: dict[str, Any], model_bytes: bytes) -> list[str]:
    """The zoo's promises for one model; the problems found (empty when it keeps them)."""
    problems = []
    accuracy = record["accuracy"]
    if accuracy["eval_torch"] != accuracy["eval_onnxruntime"]:
        problems.append(f"{name}: torch and ONNX Runtime disagree on the eval accuracy")
    if accuracy["eval_onnxruntime"] < MIN_ACCURACY:
        problems.append(f"{name}: eval accuracy {accuracy['eval_onnxruntime']:.4f} is below {MIN_ACCURACY}")
    if len(model_bytes) > MAX_ONNX_BYTES:
        problems.append(f"{name}: {len(model_bytes)} bytes of ONNX, more than {MAX_ONNX_BYTES}")
    return problems


def build(out_dir: Path = MODELS_DIR, names: list[str] | None = None, *, seed: int = SEED, epochs: int = EPOCHS,
          threads: int = THREADS, jobs: int = 1) -> dict[str, Any]:
    """Build the zoo models ``names`` (all by default) into ``out_dir``; returns the zoo.json record, which keeps
    the entries of models not rebuilt."""
    import onnx
    import onnxruntime
    import sklearn
    import torch

    names = names or list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise SystemExit(f"unknown zoo model(s) {', '.join(unknown)} (known: {', '.join(ZOO)})")
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {name: pool.submit(build_one, name, seed, epochs, threads) for name in names}
        results = {name: future.result() for name, future in futures.items()}
    problems = [p for name, (record, model, _) in results.items() for p in check(name, record, model)]
    if problems:
        raise SystemExit("; ".join(problems))

    _, norm = build_splits(seed)
    info_path = out_dir / INFO_FILE
    previous = json.loads(info_path.read_text())["models"] if info_path.is_file() else {}
    models = {name: previous[name] for name in ZOO if name in previous}
    models.update({name: record for name, (record, _, _) in results.items()})
    info: dict[str, Any] = {
        "built_by": "examples/build_zoo.py",
        "opset": OPSET,
        "input": {"name": "input", "shape": ["batch", CHANNELS, IMAGE_SIZE, IMAGE_SIZE], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
        "data": {"module": "onnxopt.datasets.digits", "seed": seed, "mean": norm["mean"], "std": norm["std"],
                 "calib_file": "onnxopt/examples/digits_calib.npz", "eval_file": "onnxopt/examples/digits_eval.npz"},
        "training": recipe(epochs, threads),
        "seed": seed,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "scikit-learn": sklearn.__version__, "numpy": np.__version__},
        "models": {name: models[name] for name in ZOO if name in models},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (_, model_bytes, state_bytes) in results.items():
        write_bytes(out_dir / f"{name}.onnx", model_bytes)
        write_bytes(out_dir / f"{name}.pt", state_bytes)
    write_bytes(info_path, (json.dumps(info, indent=2) + "\n").encode())
    print(f"wrote {len(results)} model(s) and {INFO_FILE} to {out_dir}; {time.perf_counter() - started:.0f} s in all")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=MODELS_DIR, help=f"where to write (default {MODELS_DIR})")
    parser.add_argument("--models", nargs="+", choices=list(ZOO), help="rebuild only these (default: all)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads per model (fixed)")
    parser.add_argument("--jobs", type=int, default=1, help="models trained in parallel processes")
    args = parser.parse_args(argv)
    build(args.out_dir, args.models, seed=args.seed, epochs=args.epochs, threads=args.threads, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
