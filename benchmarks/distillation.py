"""Distillation benchmark: every method vs the no-teacher baseline on teacher/student pairs of different families.

Run from the repository root (about 10-15 minutes on 2 busy CPU cores)::

    nice -n 5 python benchmarks/distillation.py            # writes reports/distillation.md and .json
    python benchmarks/distillation.py --quick               # a smoke run (1 seed, 2 epochs), report not written

Setting (why distillation matters here): a student is freshly initialized (onnxopt.zoo architectures, scaled down,
exported to ONNX with :func:`onnxopt.zoo.nets.export_onnx`) and trained through the torch bridge on a small labelled
subset plus a larger unlabelled pool that only the teacher can label. Pairs:

- digits (scikit-learn, 32x32): a ResNet-style teacher -> MobileNetV2-, ShuffleNetV2- and tiny-VGG-style students;
  150 labelled images (15 per class) + the other 947 training images unlabelled; test = the 400 held-out images.
- text orientation: the real PaddleOCR cls model (``ch_ppocr_mobile_v2.0_cls_infer.onnx``) -> a small CNN student on
  rendered text lines (onnxopt.datasets.textlines); 100 labelled + 900 unlabelled lines; test = 400 other lines.

Methods: ``none`` (the baseline: cross-entropy on the labelled subset only, the same number of optimizer steps and
batch size, so the same budget), kd, dkd, dist, ofa (logit losses) and fitnet, fsp, at (feature losses through
automatic layer matching, each with cross-entropy on the labelled samples). Every run keeps its final weights (no
selection on the test set), writes them back into the ONNX student with the bridge and is scored by ONNX Runtime.
Seeds change the student's initialization, the labelled subset and the batch order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("none", "kd", "dkd", "dist", "ofa", "fitnet", "fsp", "at")
SEEDS = (0, 1, 2)
DIGITS_LABELLED_PER_CLASS = 15
TEXT_LABELLED = 100
TEXT_TRAIN, TEXT_TEST = 1000, 400
TEXT_TRAIN_SEED, TEXT_TEST_SEED = 101, 202
CLASSES = {"mobilenetv2": 10, "shufflenetv2": 10, "vgg": 10, "resnet_pruned": 10, "textcnn": 2}
#: Fraction of each residual block's inner channels the pruned student keeps.
PRUNE_KEEP = 0.25


# ------------------------------------------------------------------------------------------------------------ data


def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train (1097) / test (400) digits as [N,3,32,32] float32 and labels: onnxopt.datasets.digits when present,
    else the split that builds the shipped example (examples/build_default_model.py: the same images)."""
    try:
        from onnxopt.datasets.digits import digits_splits as splits_fn  # type: ignore[import-not-found]

        splits = splits_fn()
        test = "eval" if "eval" in splits else "test"
        return {"train": tuple(splits["train"]), "test": tuple(splits[test])}  # type: ignore[dict-item]
    except (ImportError, KeyError, TypeError, ValueError):
        sys.path.insert(0, str(REPO / "examples"))
        from build_default_model import build_splits  # type: ignore[import-not-found]

        splits, _ = build_splits()
        return {"train": splits["train"], "test": splits["eval"]}


def text_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from onnxopt.datasets.textlines import render_textlines

    return {"train": render_textlines(TEXT_TRAIN, seed=TEXT_TRAIN_SEED),
            "test": render_textlines(TEXT_TEST, seed=TEXT_TEST_SEED)}


def labelled_subset(labels: np.ndarray, seed: int, per_class: int | None = None,
                    total: int | None = None) -> np.ndarray:
    """Indices of the labelled subset (stratified when ``per_class``), different for every seed."""
    rng = np.random.default_rng(1000 + seed)
    if per_class is not None:
        return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                       for c in np.unique(labels)]))
    return np.sort(rng.choice(len(labels), total, replace=False))


# ------------------------------------------------------------------------------------------------------ networks


def student_net(kind: str, seed: int) -> Any:
    """Scaled-down zoo architectures (a few 10k parameters) so that ~100 training runs fit in minutes on a CPU."""
    import torch
    from torch import nn

    from onnxopt.zoo import nets

    torch.manual_seed(seed)
    if kind == "mobilenetv2":
        return nets.MobileNetV2Digits(stem=8, stages=((1, 8, 1, 2), (4, 16, 2, 2), (4, 32, 2, 2)), head=128)
    if kind == "shufflenetv2":
        return nets.ShuffleNetV2Digits(widths=(24, 48, 96), repeats=(1, 1, 1), head=128)
    if kind == "vgg":
        return nets.VGGDigits(stages=((8,), (16,), (32,)), hidden=64)
    if kind == "textcnn":
        # A plain CNN for 48x192 text lines that downsamples like the Paddle model (height by 2, width once).
        layers = [nets.conv_bn(3, 8, 3, 2)]
        cin = 8
        for cout in (12, 16, 16):
            layers += [nn.Conv2d(cin, cout, 3, (2, 1), 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout

        class TextCNN(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.features = nn.Sequential(*layers)
                self.fc = nn.Linear(cin, 2)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.fc(self.features(x).mean(dim=(2, 3)))

        return TextCNN()
    raise KeyError(kind)


def export(net: Any, shape: tuple[int, ...]) -> bytes:
    from onnxopt.zoo.nets import export_onnx

    return export_onnx(net, example_shape=shape)


def resnet_teacher(workdir: Path, train: tuple[np.ndarray, np.ndarray], epochs: int) -> tuple[Path, str]:
    """The digits teacher: the one cached in ``workdir``, else onnxopt/zoo/models' trained ResNet when it exists, else
    a ResNetDigits trained here on all 1097 labelled training images (plain torch, shift augmentation)."""
    path = workdir / "resnet_teacher.onnx"
    if path.is_file():  # a --workdir keeps its teacher, so that runs reused from it stay comparable
        return path, f"ResNetDigits trained by this script ({epochs} epochs on the 1097 labelled training images)"
    shipped = sorted((REPO / "onnxopt" / "zoo" / "models").glob("resnet*.onnx"))
    if shipped:
        return shipped[0], f"shipped {shipped[0].relative_to(REPO)}"
    import torch
    from torch.nn import functional as F

    from onnxopt.passes.distill.data import random_shift
    from onnxopt.zoo import nets

    torch.set_num_threads(2)
    net = nets.build("resnet", seed=0)
    x, y = train
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * int(np.ceil(len(x) / 64))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    shift = random_shift(2)
    rng = np.random.default_rng(0)
    net.train()
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(x)), int(np.ceil(len(x) / 64))):
            xb = torch.from_numpy(shift({"input": x[idx]}, rng)["input"])
            loss = F.cross_entropy(net(xb), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    nets.export_onnx(net, path)
    return path, f"ResNetDigits trained by this script ({epochs} epochs on the 1097 labelled training images)"


def prune_inner_channels(model: Any, keep: float) -> Any:
    """L1 filter pruning (Li et al. 2017) of the channels *inside* residual blocks: every Conv -> BN -> Relu -> Conv
    chain whose intermediate values have one consumer each keeps the ``keep`` fraction of the first Conv's filters
    with the largest L1 norm; the BN and the second Conv's input channels follow. Channels on the residual stream
    are left alone, so no Add has to agree on an index set. Works on the ONNX graph (Identity-tied BN vectors get
    their own pruned copies)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[alias.get(name, name)])

    def put(name: str, value: np.ndarray) -> None:
        if name in inits:
            graph.initializer.remove(inits[name])
        tensor = numpy_helper.from_array(value.astype(np.float32), name)
        graph.initializer.append(tensor)
        inits[name] = tensor

    for conv in list(graph.node):
        if conv.op_type != "Conv" or len(consumers.get(conv.output[0], [])) != 1:
            continue
        bn = consumers[conv.output[0]][0]
        if bn.op_type != "BatchNormalization" or len(consumers.get(bn.output[0], [])) != 1:
            continue
        relu = consumers[bn.output[0]][0]
        if relu.op_type != "Relu" or len(consumers.get(relu.output[0], [])) != 1:
            continue
        nxt = consumers[relu.output[0]][0]
        if nxt.op_type != "Conv" or any(a.name == "group" and a.i != 1 for a in nxt.attribute):
            continue
        w1 = array(conv.input[1])
        kept = np.sort(np.argsort(-np.abs(w1).sum(axis=(1, 2, 3)))[:max(1, round(keep * len(w1)))])
        put(conv.input[1], w1[kept])
        for slot in range(1, 5):
            new_name = f"{bn.name or bn.output[0]}.pruned{slot}"
            put(new_name, array(bn.input[slot])[kept])
            bn.input[slot] = new_name
        put(nxt.input[1], array(nxt.input[1])[:, kept])
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    onnx.checker.check_model(model)
    return model


def _macs(model: Any) -> int:
    from onnxopt.stats import model_stats

    return model_stats(model).macs


def _params(model: Any) -> int:
    from onnxopt.stats import model_stats

    return model_stats(model).params


def paddle_cls_path() -> Path:
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def ort_accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    from onnxopt.passes.distill.teacher import OrtTeacher

    teacher = OrtTeacher(model)
    logits = np.concatenate([teacher.run({"input": x[s:s + 200]})[0] for s in range(0, len(x), 200)])
    return float((logits.argmax(1) == y).mean())


# ----------------------------------------------------------------------------------------------------------- runs


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process (1 torch thread, 1 ORT thread)."""
    import onnx
    import torch

    torch.set_num_threads(1)
    from onnxopt.bridge import to_torch, write_back
    from onnxopt.passes.distill.data import TrainData, make_augment
    from onnxopt.passes.distill.teacher import OrtTeacher
    from onnxopt.passes.distill.trainer import DistillConfig, train

    data = np.load(job["data"])
    x, y, x_test, y_test = data["x"], data["y"], data["x_test"], data["y_test"]
    labelled = data[f"labelled_{job['seed']}"]
    if job.get("student_path"):  # a pruned teacher: the same weights for every seed
        student_proto = onnx.load(job["student_path"])
    else:
        student_proto = onnx.load_from_string(export(student_net(job["student"], job["seed"]), job["shape"]))
    input_name = student_proto.graph.input[0].name
    epochs = job["epochs"]
    if job["method"] == "none":  # baseline: labelled subset only, same optimizer steps and batch size
        train_data = TrainData({input_name: x[labelled]}, y[labelled])
        steps = epochs * int(np.ceil(len(x) / job["batch"]))
        epochs = max(1, round(steps / int(np.ceil(len(labelled) / job["batch"]))))
        teacher = None
    else:
        labels = np.full(len(x), -1, np.int64)
        labels[labelled] = y[labelled]
        train_data = TrainData({input_name: x}, labels)
        teacher = OrtTeacher(onnx.load(job["teacher"]), threads=1)
    cfg = DistillConfig(method=job["method"], epochs=epochs, lr=job["lr"], batch_size=job["batch"], seed=job["seed"],
                        temperature=job["temperature"], alpha=job["alpha"], threads=1,
                        augment=make_augment(job["augment"]))
    module = to_torch(student_proto)
    start = time.perf_counter()
    error = None
    try:
        result = train(module, teacher, train_data, None, cfg, input_names=[input_name])
        pairs = result.pairs
    except Exception as exc:  # noqa: BLE001 - a method that cannot run on a pair is reported, not fatal
        error, pairs = f"{type(exc).__name__}: {exc}"[:300], []
    seconds = time.perf_counter() - start
    accuracy = None
    if error is None:
        trained = write_back(module, student_proto)
        accuracy = ort_accuracy(trained, x_test, y_test)
    return {**{k: job[k] for k in ("pair", "student", "method", "seed")}, "epochs": epochs, "accuracy": accuracy,
            "train_seconds": round(seconds, 2), "error": error, "pairs": pairs}


def prepare_pairs(workdir: Path, quick: bool, teacher_epochs: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    digits = digits_splits()
    x, y = digits["train"]
    xt, yt = digits["test"]
    teacher_path, teacher_note = resnet_teacher(workdir, (x, y), teacher_epochs)
    import onnx

    digits_file = workdir / "digits.npz"
    np.savez(digits_file, x=x, y=y, x_test=xt, y_test=yt,
             **{f"labelled_{s}": labelled_subset(y, s, per_class=DIGITS_LABELLED_PER_CLASS) for s in SEEDS})
    text = text_splits()
    tx, ty = text["train"]
    txt, tyt = text["test"]
    text_file = workdir / "text.npz"
    np.savez(text_file, x=tx, y=ty, x_test=txt, y_test=tyt,
             **{f"labelled_{s}": labelled_subset(ty, s, total=TEXT_LABELLED) for s in SEEDS})
    pruned = prune_inner_channels(onnx.load(teacher_path), PRUNE_KEEP)
    pruned_path = workdir / "resnet_pruned.onnx"
    onnx.save(pruned, pruned_path)
    paddle = paddle_cls_path()
    paddle_model = onnx.load(paddle)
    from onnxopt.passes.distill.teacher import OrtTeacher

    paddle_logits = np.concatenate([OrtTeacher(paddle_model).run({"x": txt[s:s + 100]})[0]
                                    for s in range(0, len(txt), 100)])
    info = {
        "digits_teacher": {"source": teacher_note, "test_accuracy": ort_accuracy(onnx.load(teacher_path), xt, yt)},
        "paddle_teacher": {"source": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                           "test_accuracy": float((paddle_logits.argmax(1) == tyt).mean())},
        "pruned": {"keep": PRUNE_KEEP, "test_accuracy_before_finetuning": ort_accuracy(pruned, xt, yt),
                   "macs_teacher": _macs(onnx.load(teacher_path)), "macs_pruned": _macs(pruned),
                   "params_teacher": _params(onnx.load(teacher_path)), "params_pruned": _params(pruned)},
        "digits": {"train": len(x), "labelled": DIGITS_LABELLED_PER_CLASS * 10, "test": len(xt)},
        "text": {"train": len(tx), "labelled": TEXT_LABELLED, "test": len(txt)},
    }
    common = {"lr": 0.05, "batch": 64, "temperature": 4.0, "alpha": 0.9}
    pairs = [
        {"pair": "ResNet -> MobileNetV2", "student": "mobilenetv2", "teacher": str(teacher_path),
         "data": str(digits_file), "shape": (1, 3, 32, 32), "epochs": 2 if quick else 10, "augment": "shift:2",
         **common},
        {"pair": "ResNet -> ShuffleNetV2", "student": "shufflenetv2", "teacher": str(teacher_path),
         "data": str(digits_file), "shape": (1, 3, 32, 32), "epochs": 2 if quick else 10, "augment": "shift:2",
         **common},
        {"pair": "ResNet -> tiny VGG", "student": "vgg", "teacher": str(teacher_path), "data": str(digits_file),
         "shape": (1, 3, 32, 32), "epochs": 2 if quick else 10, "augment": "shift:2", **common},
        {"pair": "ResNet -> pruned ResNet", "student": "resnet_pruned", "student_path": str(pruned_path),
         "teacher": str(teacher_path), "data": str(digits_file), "shape": (1, 3, 32, 32),
         "epochs": 2 if quick else 10, "augment": "shift:2", **{**common, "lr": 0.01}},
        {"pair": "Paddle cls -> small CNN", "student": "textcnn", "teacher": str(paddle), "data": str(text_file),
         "shape": (1, 3, 48, 192), "epochs": 2 if quick else 6, "augment": "none", **common},
    ]
    return pairs, info


_LOG_LINE = re.compile(r"^\[\d+/\d+\] (?P<pair>.+?)\s+(?P<method>[\w+]+)\s+seed (?P<seed>\d+): "
                       r"(?P<acc>[\d.]+)% \((?P<secs>[\d.]+) s\)")


def reused_runs(paths: list[str]) -> list[dict[str, Any]]:
    """Runs of earlier invocations: a report JSON (``runs``) or this script's console log (one line per run, for an
    invocation stopped before it wrote its JSON). The first source that has a (pair, method, seed) wins."""
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in paths:
        if path.endswith(".json"):
            found = json.loads(Path(path).read_text())["runs"]
        else:
            found = [{"pair": m["pair"].strip(), "method": m["method"], "seed": int(m["seed"]),
                      "accuracy": float(m["acc"]) / 100, "train_seconds": float(m["secs"]), "error": None,
                      "pairs": []} for m in map(_LOG_LINE.match, Path(path).read_text().splitlines()) if m]
        for run in found:
            runs.setdefault((run["pair"], run["method"], int(run["seed"])), {**run, "source": path})
    return list(runs.values())


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        cell = table.setdefault(run["pair"], {}).setdefault(run["method"], {"accuracies": [], "errors": []})
        if run["accuracy"] is None:
            cell["errors"].append(run["error"])
        else:
            cell["accuracies"].append(run["accuracy"])
    for methods in table.values():
        for cell in methods.values():
            acc = cell["accuracies"]
            cell["mean"] = statistics.fmean(acc) if acc else None
            cell["std"] = statistics.stdev(acc) if len(acc) > 1 else 0.0 if acc else None
    return table


def render(table: dict[str, Any], info: dict[str, Any], runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    methods = [m for m in METHODS if any(m in row for row in table.values())]
    lines = ["# Distillation benchmark", "",
             f"Generated by `benchmarks/distillation.py` ({meta['when']}, {meta['host']}, {meta['wall_s']:.0f} s wall "
             f"on {meta['workers']} worker processes). Test accuracy (%) of the student written back to ONNX and run "
             f"by ONNX Runtime, mean +- standard deviation over seeds {', '.join(map(str, SEEDS))}; **bold** = best "
             "method of the row; Δ = best method minus the no-teacher baseline.", "",
             *([f"Runs reused from earlier invocations of this script (same code and seeds; `--reuse`): "
                + ", ".join(f"{n} from `{Path(src).name}`" for src, n in meta["reused"].items())
                + f"; the wall time above is this invocation's. Total training time of all runs: "
                f"{sum(r['train_seconds'] for r in runs) / 60:.1f} min (1 thread each).", ""]
              if any(meta.get("reused", {}).values()) else []),
             f"- digits teacher: {info['digits_teacher']['source']}, test accuracy "
             f"{info['digits_teacher']['test_accuracy']:.2%}; students see {info['digits']['labelled']} labelled "
             f"+ {info['digits']['train'] - info['digits']['labelled']} unlabelled training images, test "
             f"{info['digits']['test']} images.",
             f"- text teacher: PaddleOCR `ch_ppocr_mobile_v2.0_cls_infer.onnx`, test accuracy "
             f"{info['paddle_teacher']['test_accuracy']:.2%} on {info['text']['test']} rendered lines; the student "
             f"sees {info['text']['labelled']} labelled + {info['text']['train'] - info['text']['labelled']} "
             "unlabelled lines.",
             *([f"- pruned student: the digits teacher with {100 * info['pruned']['keep']:.0f}% of each residual "
                f"block's inner channels kept (L1 filter norm; {info['pruned']['params_pruned']:,} vs "
                f"{info['pruned']['params_teacher']:,} parameters, {info['pruned']['macs_pruned'] / 1e6:.2f} vs "
                f"{info['pruned']['macs_teacher'] / 1e6:.2f} M MACs), test accuracy "
                f"{info['pruned']['test_accuracy_before_finetuning']:.2%} right after pruning, before "
                "fine-tuning (lr 0.01 instead of 0.05: it starts from trained weights)."] if "pruned" in info else []),
             "- baseline `none`: the same student, cross-entropy on the labelled subset only, the same number of "
             "optimizer steps and batch size (no teacher).", "",
             "| pair | " + " | ".join(methods) + " | best | Δ vs none |",
             "|---|" + "---|" * (len(methods) + 2)]
    for pair, row in table.items():
        means = {m: row[m]["mean"] for m in methods if m in row and row[m]["mean"] is not None}
        best = max((m for m in means if m != "none"), key=lambda m: means[m], default=None)
        cells = []
        for m in methods:
            cell = row.get(m)
            if cell is None or cell["mean"] is None:
                cells.append("n/a" if cell is None else "failed")
                continue
            text = f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"
            cells.append(f"**{text}**" if m == best else text)
        delta = (f"{100 * (means[best] - means['none']):+.1f}" if best and "none" in means else "n/a")
        lines.append(f"| {pair} | " + " | ".join(cells) + f" | {best or 'n/a'} | {delta} |")
    lines += ["", "## Recommendations", ""]
    lines += recommendations(table, methods)
    collapsed = [r for r in runs if r["accuracy"] is not None
                 and r["accuracy"] <= 1.0 / CLASSES[r["student"]] + 0.05 and r["method"] != "none"]
    if collapsed:
        lines += ["", "## Runs at chance level", "",
                  "These distillation runs ended within 5 points of chance accuracy (1 / classes): "
                  + "; ".join(f"{r['pair']} / {r['method']} / seed {r['seed']} ({100 * r['accuracy']:.1f}%)"
                              for r in collapsed) + "."]
    failures = [r for r in runs if r["error"]]
    if failures:
        lines += ["", "## Runs that failed", ""]
        lines += [f"- {r['pair']} / {r['method']} / seed {r['seed']}: {r['error']}" for r in failures]
    pairs_seen = {(r["pair"], json.dumps(r["pairs"])) for r in runs if r.get("pairs") and r["seed"] == SEEDS[0]
                  and r["method"] == "fitnet"}
    if pairs_seen:
        lines += ["", "## Layer pairs found by resolution matching (fitnet/fsp/at)", ""]
        for pair, text in sorted(pairs_seen):
            for p in json.loads(text):
                lines.append(f"- {pair}: {p['resolution'][0]}x{p['resolution'][1]}: student `{p['student'][1]}` "
                             f"({p['channels'][0]} ch) -> teacher `{p['teacher'][1]}` ({p['channels'][1]} ch)")
    lines += ["", "## Setting", "",
              f"SGD (Nesterov, momentum 0.9, weight decay 5e-4), lr {meta['lr']}, cosine schedule, batch "
              f"{meta['batch']}, temperature {meta['temperature']}, alpha {meta['alpha']} ((1-alpha) CE + alpha "
              "distillation on the labelled samples, distillation alone on the unlabelled ones); feature losses use "
              "their default weights (onnxopt.passes.distill.losses.FEATURE_WEIGHTS) added to CE; digits students "
              "train with random shifts of up to 2 pixels (the baseline too). Epochs per pair: "
              + ", ".join(f"{p['pair']} {p['epochs']}" for p in meta["pairs"]) + ". Training time per run: "
              + ", ".join(f"{pair} {statistics.fmean(r['train_seconds'] for r in runs if r['pair'] == pair):.1f} s"
                          for pair in table) + " (mean, 1 thread)."]
    return "\n".join(lines) + "\n"


def recommendations(table: dict[str, Any], methods: list[str]) -> list[str]:
    """Statements the table supports, computed from it (nothing hard-coded)."""
    out = []
    logit = [m for m in ("kd", "dkd", "dist", "ofa") if m in methods]
    feature = [m for m in ("fitnet", "fsp", "at") if m in methods]
    wins = {m: 0 for m in methods if m != "none"}
    beats_baseline = {m: 0 for m in methods if m != "none"}
    for row in table.values():
        means = {m: c["mean"] for m, c in row.items() if c["mean"] is not None}
        if "none" not in means:
            continue
        ranked = sorted((m for m in means if m != "none"), key=lambda m: -means[m])
        if ranked:
            wins[ranked[0]] += 1
        for m in ranked:
            beats_baseline[m] += means[m] > means["none"]
    n = len(table)
    best_every = [m for m, k in beats_baseline.items() if k == n]
    out.append(f"- Methods above the no-teacher baseline on every one of the {n} pairs: "
               f"{', '.join(best_every) or 'none'}.")
    out.append("- Best method per pair: " + "; ".join(
        f"{pair}: {max((m for m in row if m != 'none' and row[m]['mean'] is not None), key=lambda m: row[m]['mean'])}"
        for pair, row in table.items()) + ".")

    def mean_gain(ms: list[str]) -> float | None:
        gains = [row[m]["mean"] - row["none"]["mean"] for row in table.values() for m in ms
                 if m in row and row[m]["mean"] is not None and row.get("none", {}).get("mean") is not None]
        return statistics.fmean(gains) if gains else None

    lg, fg = mean_gain(logit), mean_gain(feature)
    if lg is not None and fg is not None:
        out.append(f"- Mean gain over the baseline: logit losses ({', '.join(logit)}) {100 * lg:+.1f} points, feature "
                   f"losses ({', '.join(feature)}) {100 * fg:+.1f} points.")
    below = sorted({m for row in table.values() for m in feature if m in row and row[m]["mean"] is not None
                    and row.get("none", {}).get("mean") is not None and row[m]["mean"] < row["none"]["mean"]})
    if below:
        out.append(f"- Feature losses below the baseline on at least one pair: {', '.join(below)} (as published for "
                   "cross-architecture pairs); keep the logit-based default.")
    default_rank = sorted(logit, key=lambda m: -(mean_gain([m]) or -1e9))
    if default_rank:
        ranking = ", ".join(f"{m} ({100 * (mean_gain([m]) or 0):+.1f})" for m in default_rank)
        out.append(f"- Logit losses ranked by mean gain: {ranking}.")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, no report written")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pairs", default="", help="comma-separated student kinds to run (default all)")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--workdir", default=None, help="where teachers and data are cached (default: a temp dir)")
    parser.add_argument("--output", default=str(REPO / "reports" / "distillation"))
    parser.add_argument("--reuse", action="append", default=[],
                        help="runs of an earlier invocation (report JSON or console log) to reuse instead of rerunning")
    parser.add_argument("--render-only", action="store_true", help="rewrite OUTPUT.md from OUTPUT.json (no training)")
    args = parser.parse_args(argv)
    if args.render_only:
        from onnxopt.modelio import atomic_write_text

        saved = json.loads(Path(f"{args.output}.json").read_text())
        text = render(summarize(saved["runs"]), saved["info"], saved["runs"], saved["meta"])
        atomic_write_text(f"{args.output}.md", text)
        print(text)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="onnxopt-distill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pairs, info = prepare_pairs(workdir, args.quick, args.teacher_epochs)
    if args.pairs:
        pairs = [p for p in pairs if p["student"] in args.pairs.split(",")]
    seeds = SEEDS[:1] if args.quick else SEEDS
    methods = args.methods.split(",")
    jobs = [{**pair, "method": m, "seed": s} for pair in pairs for s in seeds for m in methods]
    print(f"{len(jobs)} runs; teachers: digits {info['digits_teacher']['test_accuracy']:.2%}, "
          f"paddle {info['paddle_teacher']['test_accuracy']:.2%}", flush=True)
    wanted = {(j["pair"], j["method"], j["seed"]) for j in jobs}
    runs = [r for r in reused_runs(args.reuse) if (r["pair"], r["method"], r["seed"]) in wanted]
    student_of = {p["pair"]: p["student"] for p in pairs}
    for run in runs:
        run.setdefault("student", student_of[run["pair"]])
    done = {(r["pair"], r["method"], r["seed"]) for r in runs}
    jobs = [j for j in jobs if (j["pair"], j["method"], j["seed"]) not in done]
    if runs:
        print(f"reusing {len(runs)} runs from {', '.join(args.reuse)}; {len(jobs)} to run", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for run in pool.map(run_one, jobs):
            runs.append(run)
            acc = "failed" if run["accuracy"] is None else f"{run['accuracy']:.2%}"
            print(f"[{len(runs)}/{len(jobs) + len(done)}] {run['pair']:26s} {run['method']:7s} seed {run['seed']}: "
                  f"{acc} "
                  f"({run['train_seconds']:.1f} s){' ' + run['error'] if run['error'] else ''}", flush=True)
    wall = time.perf_counter() - start
    order = {(p["pair"], m, sd): i for i, (p, sd, m) in enumerate((p, sd, m) for p in pairs for sd in seeds
                                                                   for m in methods)}
    runs.sort(key=lambda r: order[(r["pair"], r["method"], r["seed"])])
    table = summarize(runs)
    import onnxruntime
    import torch

    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": wall, "workers": args.workers,
            "host": f"{platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
                    f"onnxruntime {onnxruntime.__version__}",
            "lr": pairs[0]["lr"], "batch": pairs[0]["batch"], "temperature": pairs[0]["temperature"],
            "alpha": pairs[0]["alpha"], "pairs": [{"pair": p["pair"], "epochs": p["epochs"]} for p in pairs],
            "reused": {src: sum(r.get("source") == src for r in runs) for src in args.reuse}}
    text = render(table, info, runs, meta)
    print(text)
    if not args.quick:
        from onnxopt.modelio import atomic_write_text

        atomic_write_text(f"{args.output}.md", text)
        atomic_write_text(f"{args.output}.json", json.dumps(
            {"meta": meta, "info": info, "table": table, "runs": runs}, indent=1, default=str) + "\n")
        print(f"wrote {args.output}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
