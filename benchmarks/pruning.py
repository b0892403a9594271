"""Structured pruning benchmark: onnxopt prune (4 criteria x 3 MACs targets) vs onnxsim 0.8.1 and Torch-Pruning.

For each model: MACs, params, top-1 accuracy and ORT latency (batch 1, one thread, every variant of a model timed
round-robin in ONE run, so load from other processes hits all alike), at 30/50/70% fewer MACs; then, at 2x fewer
MACs, recovery by the distill pass (KD on the train split) for each of ``--distill-methods`` (onnxsim included: its
sparsity bisected to 2x fewer MACs), with the issue's targets checked by :func:`target_rows`. Peers:
``onnxsim.apply_structured_pruning`` on the BN-folded ONNX model (its docstring says MatMul/Gemm only; on the
digits nets it cut Conv channels too, but none followed by BatchNormalization), and Torch-Pruning
(DepGraph; L1 magnitude, channel ratio bisected to the same MACs target, multiples of 8) on the torch source model
where one exists.

Models: the digits zoo (``onnxopt.zoo.model_path``: MobileNetV2, ShuffleNetV2, ResNet, VGG with their ``.pt``
state dicts) when built, else the shipped example ``digits_cnn.onnx`` (MobileNetV2-style, no torch source); and the
PaddleOCR text-orientation classifier on rendered text lines.

Every onnxopt variant is pruned with BatchNorm KEPT (``normalize`` with ``fold_batchnorm=False`` first, for every
criterion), fine-tuned with BatchNorm kept, and only then BN-folded (``normalize``) for accuracy and latency: the
columns describe the deployable model. Pruning a BN-folded model and fine-tuning the BN-free result recovered the
digits MobileNetV2 to only 16% (an earlier run); with BN kept it recovers to within a point.
``--recovery-only`` writes one JSON per model and method set to ``--parts-dir``; ``--render`` merges them into the
sweep's ``pruning.json`` (the report says which run each table comes from).

    nice -n 5 python benchmarks/pruning.py            # writes reports/pruning.md and reports/pruning.json
    nice -n 5 python benchmarks/pruning.py --recovery-only --models resnet vgg   # recovery rows of some models
    python benchmarks/pruning.py --render              # report from reports/pruning.json + recovery parts

The per-criterion recovery table (30/50/70% fewer MACs, every criterion) came from these ``--recovery-only`` runs:

    nice -n 5 python benchmarks/pruning.py --recovery-only --models mobilenetv2 shufflenetv2 resnet vgg \
        --recovery-targets 0.3 0.7 --distill-methods onnxopt-l1 onnxopt-l2 onnxopt-bn_scale onnxopt-taylor
    nice -n 5 python benchmarks/pruning.py --recovery-only --models mobilenetv2 shufflenetv2 resnet vgg \
        --recovery-targets 0.5 --distill-methods onnxopt-l2 onnxopt-bn_scale onnxopt-taylor
    nice -n 5 python benchmarks/pruning.py --recovery-only --models paddle_cls --paddle-train 3000 --paddle-epochs 8 \
        --recovery-targets 0.3 0.5 0.7 --distill-methods onnxopt-l1 onnxopt-l2 onnxopt-bn_scale onnxopt-taylor
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt.bench import BenchConfig, benchmark  # noqa: E402
from onnxopt.calib_data import open_data  # noqa: E402
from onnxopt.hostinfo import host_info  # noqa: E402
from onnxopt.modelio import as_ir_model, atomic_write_text  # noqa: E402
from onnxopt.passes.normalize import NormalizePass  # noqa: E402
from onnxopt.passes.prune.pass_ import PrunePass  # noqa: E402
from onnxopt.pipeline.context import PassContext  # noqa: E402
from onnxopt.stats import model_stats  # noqa: E402

TARGETS = (0.3, 0.5, 0.7)
CRITERIA = ("l1", "l2", "bn_scale", "taylor")
ZOO = ("mobilenetv2", "shufflenetv2", "resnet", "vgg")
EXAMPLES = ROOT / "onnxopt" / "examples"


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, name: str) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    preds = []
    for i in range(0, len(x), 100):
        out = session.run(None, {name: x[i:i + 100]})[0]
        preds.append(out.reshape(out.shape[0], -1).argmax(1))
    return float((np.concatenate(preds) == y).mean())


def normalized(model: onnx.ModelProto, fold: bool) -> onnx.ModelProto:
    return NormalizePass(fold_batchnorm=fold).apply(model)


def prune_bn_kept(base_bn: onnx.ModelProto, criterion: str, target: float,
                  context: PassContext, depth: float = 0.0) -> tuple[onnx.ModelProto, PrunePass]:
    """Prune the BN-kept model (so that fine-tuning still has BatchNorm); the caller folds BN before measuring."""
    step = PrunePass(macs_ratio=target, criterion=criterion, taylor_samples=64, depth=depth).bind(context)
    return step.apply(base_bn), step


# ---------------------------------------------------------------------------------------------------------- models
#: Rendered text lines the Paddle model is fine-tuned on (``--paddle-train``), and for how many epochs
#: (``--paddle-epochs``). On 1000 lines the 2x-MACs cut recovered to 94-95.75% (20-60 epochs, earlier runs), on 3000
#: lines to 97.25%: more data, not more epochs, is what recovery needs here; rendering is free.
PADDLE_TRAIN = 6000
PADDLE_EPOCHS = 15
#: torch intra-op threads for recovery training (``--torch-threads``).
TORCH_THREADS = 1


def models_to_run(only: list[str] | None, need_train: bool = True) -> list[dict[str, Any]]:
    from onnxopt import zoo

    found = []
    model_path = getattr(zoo, "model_path", None)
    from onnxopt.datasets.digits import digits_splits

    splits = digits_splits()  # train (1097) / calib (300) / eval (400), disjoint; eval = the shipped digits_eval.npz
    digits = {"calib": splits["calib"], "eval": splits["eval"], "train": splits["train"], "input": "input"}
    for name in ZOO:
        try:
            path = Path(model_path(name)) if model_path else None
        except Exception:  # noqa: BLE001 - the zoo is being built by another helper
            path = None
        if path is not None and path.exists():
            pt = path.with_suffix(".pt")  # the trained state dict (zoo.state_dict_path)
            found.append({"name": name, "path": path, "torch": name if pt.exists() else None, **digits})
    if not found:
        found.append({"name": "digits_cnn (example)", "path": EXAMPLES / "digits_cnn.onnx", "torch": None, **digits})
    if only and "paddle_cls" not in only:
        return [m for m in found if m["name"].split(" ")[0] in only]
    from onnxopt.datasets.textlines import render_textlines
    import rapidocr_onnxruntime

    paddle = Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    x_cal, y_cal = render_textlines(200, seed=11)
    x_ev, y_ev = render_textlines(400, seed=12)
    train = render_textlines(PADDLE_TRAIN, seed=13) if need_train else None
    found.append({"name": "paddle_cls", "path": paddle, "torch": None, "calib": (x_cal, y_cal),
                  "eval": (x_ev, y_ev), "train": train, "input": "x"})
    return [m for m in found if not only or m["name"].split(" ")[0] in only]


# ----------------------------------------------------------------------------------------------------------- peers
def onnxsim_prune(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    from onnxopt.passes.normalize import _import_onnxsim

    onnxsim = _import_onnxsim()
    return onnxsim.apply_structured_pruning(model, sparsity=sparsity)


def onnxsim_at_macs(base: onnx.ModelProto, macs_ratio: float, shapes: dict[str, Any]) -> tuple[onnx.ModelProto, bool]:
    """onnxsim's pruning at the smallest sparsity (bisected) that reaches ``macs_ratio``, and True; when 95% does not
    reach it, the 95% model (its most-pruned: fewer MACs removed than ours, in its favour) and False."""
    base_macs = model_stats(base, input_shapes=shapes).macs

    def ratio(model: onnx.ModelProto) -> float:
        return base_macs / model_stats(normalized(model, True), input_shapes=shapes).macs

    best = onnxsim_prune(base, 0.95)
    if ratio(best) < macs_ratio:
        return best, False
    lo, hi = 0.0, 0.95
    for _ in range(7):
        mid = (lo + hi) / 2
        model = onnxsim_prune(base, mid)
        if ratio(model) >= macs_ratio:
            hi, best = mid, model
        else:
            lo = mid
    return best, True


def torch_pruning(spec: dict[str, Any], target: float, example_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Torch-Pruning (MetaPruner, L1 magnitude, round_to 8) on the torch source, channel ratio bisected so that
    MACs fall by ``target``; exported with BN kept (the caller normalizes it, BN folded or not)."""
    import torch
    import torch_pruning as tp

    from onnxopt.zoo import nets

    from onnxopt import zoo

    def build() -> Any:
        return zoo.load_torch(spec["torch"])

    example = torch.zeros(*example_shape)
    base_macs, _ = tp.utils.count_ops_and_params(build(), example)

    def prune(ratio: float) -> tuple[Any, float]:
        net = build()
        last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1:]
        pruner = tp.pruner.MetaPruner(net, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=last, round_to=8)
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(net, example)
        return net, 1.0 - macs / base_macs

    lo, hi, best = 0.0, 0.9, None
    for _ in range(8):
        mid = (lo + hi) / 2
        net, removed = prune(mid)
        if removed >= target:
            hi, best = mid, net
        else:
            lo = mid
    net = best if best is not None else prune(0.9)[0]
    data = nets.export_onnx(net)
    return onnx.load_from_string(data)


def distill_recover(student_bn: onnx.ModelProto, teacher: onnx.ModelProto, spec: dict[str, Any],
                    epochs: int, both_lrs: bool = False) -> tuple[onnx.ModelProto, float]:
    """KD (the distill pass default) of the BN-kept pruned model on the TRAIN split; the calibration split (disjoint
    from train and eval) picks the kept epoch, so the reported eval accuracy is untouched. Returns it BN-folded, and
    the learning rate used: 0.01, or 0.001 for every method whose training diverged at 0.01 (a BN-free student such
    as onnxsim's can), so that no method is judged on a run that blew up. With ``both_lrs`` (onnxsim's BN-free
    students: at 0.01 one recovered to 33%, at 0.001 its 2x cut to the unpruned accuracy), both rates run and the
    one better on the calibration split is kept: the peer gets the better of the two."""
    from onnxopt.passes.distill.api import distill
    from onnxopt.passes.distill.trainer import TrainingDivergedError

    name = spec["input"]
    train, val = spec["train"], spec["calib"]
    best: tuple[float, onnx.ModelProto, float] | None = None
    for lr in (0.01, 0.001):
        try:
            result = distill(student_bn, teacher, {name: train[0], "y": train[1]}, {name: val[0], "y": val[1]},
                             epochs=epochs, lr=lr, measure_latency=False, quiet=True, seed=0,
                             torch_threads=TORCH_THREADS)
        except TrainingDivergedError:
            if lr == 0.001 and best is None:
                raise
            print(f"  diverged at lr {lr}", flush=True)
            continue
        metric = next((s.details.get("best_metric") for s in result.report.steps if s.name == "distill"), None)
        if best is None or (metric is not None and metric > best[0]):
            best = (metric if metric is not None else -1.0, result.model, lr)
        if not both_lrs:
            break
    assert best is not None
    return normalized(best[1], True), best[2]  # result.model is a ModelProto


# ------------------------------------------------------------------------------------------------------------- run
def run_model(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    name, input_name = spec["name"], spec["input"]
    x_ev, y_ev = spec["eval"]
    raw = onnx.load(str(spec["path"]))
    base = normalized(raw, True)
    base_bn = normalized(raw, False)
    shape = (1, *x_ev.shape[1:])
    shapes = {input_name: shape}
    context = PassContext(calib=open_data({input_name: spec["calib"][0], "y": spec["calib"][1]}),
                          input_shapes=shapes, seed=0)
    base_stats = model_stats(base, input_shapes=shapes)
    rows: list[dict[str, Any]] = [{"variant": "original", "method": "-", "target": 0.0,
                                   "macs": base_stats.macs, "params": base_stats.params,
                                   "accuracy": accuracy(base, x_ev, y_ev, input_name)}]
    models: list[onnx.ModelProto] = [base]
    notes: list[str] = []

    def add(variant: str, method: str, target: float, model: onnx.ModelProto, extra: dict[str, Any]) -> None:
        stats = model_stats(model, input_shapes=shapes)
        row = {"variant": variant, "method": method, "target": target, "macs": stats.macs, "params": stats.params,
               "accuracy": accuracy(model, x_ev, y_ev, input_name), **extra}
        rows.append(row)
        models.append(model)
        print(f"  {variant}: MACs {stats.macs / base_stats.macs:.2f}x acc {row['accuracy']:.3f}", flush=True)

    for criterion in args.criteria:
        for target in TARGETS:
            started = time.perf_counter()
            try:
                pruned_bn, step = prune_bn_kept(base_bn, criterion, target, context)
            except Exception as exc:  # noqa: BLE001 - recorded in the report
                notes.append(f"onnxopt {criterion} at {target:.0%}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            pruned = normalized(pruned_bn, True)  # measured BN-folded, like the original (ORT fuses BN anyway)
            add(f"onnxopt {criterion} -{target:.0%} MACs", f"onnxopt-{criterion}", target, pruned,
                {"prune_s": round(time.perf_counter() - started, 2),
                 "blocked_groups": len(step.details.get("blocked", [])),
                 "groups": step.details.get("groups")})
    for sparsity in TARGETS:
        try:
            add(f"onnxsim structured sparsity {sparsity:.0%}", "onnxsim", sparsity, onnxsim_prune(base, sparsity), {})
        except Exception as exc:  # noqa: BLE001
            notes.append(f"onnxsim at {sparsity:.0%}: {type(exc).__name__}: {str(exc)[:200]}")
    if spec.get("torch"):
        for target in TARGETS:
            try:
                tp_model = normalized(torch_pruning(spec, target, shape), True)
                add(f"Torch-Pruning L1 -{target:.0%} MACs", "torch-pruning", target, tp_model, {})
            except Exception as exc:  # noqa: BLE001
                notes.append(f"Torch-Pruning at {target:.0%}: {type(exc).__name__}: {str(exc)[:200]}")
    else:
        notes.append("Torch-Pruning: no torch source model for this ONNX model")

    labels = [f"v{i}" for i in range(len(models))]
    config = BenchConfig(batch_sizes=(1,), threads=(1,), warmup=10, repeats=args.repeats,
                         input_shapes={input_name: shape})
    report = benchmark([as_ir_model(m) for m in models], config, labels=labels)
    base_ms = report.result("v0", 1, 1).median_ms  # type: ignore[union-attr]
    for row, label in zip(rows, labels):
        result = report.result(label, 1, 1)
        row["median_ms"] = round(result.median_ms, 4) if result else None
        row["speedup"] = round(base_ms / result.median_ms, 3) if result else None
        row["macs_ratio"] = round(rows[0]["macs"] / row["macs"], 3) if row["macs"] else None
    return {"model": name, "path": str(spec["path"].name), "rows": rows, "notes": notes,
            "eval_samples": int(len(y_ev)), "calib_samples": int(len(spec["calib"][1]))}


def recover_model(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """For each of ``args.recovery_targets`` (fractions of MACs removed; default 0.5, i.e. 2x fewer) and each of
    ``args.distill_methods``: prune with BN kept, distill on the train split (teacher = the original), fold BN;
    accuracy before/after and ORT latency of the original, the pruned and the recovered model timed round-robin in
    one run (batch 1, 1 thread)."""
    name, input_name = spec["name"], spec["input"]
    x_ev, y_ev = spec["eval"]
    raw = onnx.load(str(spec["path"]))
    base, base_bn = normalized(raw, True), normalized(raw, False)
    shape = (1, *x_ev.shape[1:])
    shapes = {input_name: shape}
    context = PassContext(calib=open_data({input_name: spec["calib"][0], "y": spec["calib"][1]}),
                          input_shapes=shapes, seed=0)
    base_stats = model_stats(base, input_shapes=shapes)
    base_acc = accuracy(base, x_ev, y_ev, input_name)
    epochs = args.paddle_epochs if name == "paddle_cls" else args.distill_epochs
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for target, method in [(t, m) for t in args.recovery_targets for m in args.distill_methods]:
        started = time.perf_counter()
        try:
            if method == "torch-pruning":
                if not spec.get("torch"):
                    notes.append("Torch-Pruning: no torch source model for this ONNX model")
                    continue
                pruned_bn = normalized(torch_pruning(spec, target, shape), False)
            elif method.startswith("onnxsim"):  # onnxsim, or onnxsim@R: bisected to R times fewer MACs (default 2)
                times = float(method.partition("@")[2] or 1.0 / (1.0 - target))
                pruned_bn, reached = onnxsim_at_macs(base, times, shapes)  # BN-free: it cuts no Conv followed by BN
                if not reached:
                    notes.append(f"onnxsim: no sparsity up to 95% reaches {times:.2f}x fewer MACs; its 95% model is "
                                 "recovered (fewer MACs removed than ours: the comparison favours it)")
            else:
                criterion, _, depth = method.removeprefix("onnxopt-").partition("+depth")
                pruned_bn = prune_bn_kept(base_bn, criterion, target, context, float(depth or 0.0))[0]
            prune_s = time.perf_counter() - started
            pruned = normalized(pruned_bn, True)
            recovered, lr = distill_recover(pruned_bn, base, spec, epochs, both_lrs=method.startswith("onnxsim"))
        except Exception as exc:  # noqa: BLE001 - recorded in the report
            notes.append(f"recovery {method} at -{target:.0%} MACs: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        stats = model_stats(pruned, input_shapes=shapes)
        config = BenchConfig(batch_sizes=(1,), threads=(1,), warmup=10, repeats=args.repeats,
                             input_shapes=shapes)
        report = benchmark([as_ir_model(m) for m in (base, pruned, recovered)], config, labels=["o", "p", "r"])
        ms = {k: report.result(k, 1, 1).median_ms for k in "opr"}  # type: ignore[union-attr]
        row = {"method": method, "target": target, "epochs": epochs, "lr": lr,
               "train_samples": int(len(spec["train"][1])),
               "macs": stats.macs, "params": stats.params,
               "macs_ratio": round(base_stats.macs / stats.macs, 3),
               "accuracy_original": base_acc, "accuracy_pruned": accuracy(pruned, x_ev, y_ev, input_name),
               "accuracy_recovered": accuracy(recovered, x_ev, y_ev, input_name),
               "median_ms_original": round(ms["o"], 4), "median_ms_pruned": round(ms["p"], 4),
               "median_ms_recovered": round(ms["r"], 4), "speedup_pruned": round(ms["o"] / ms["p"], 3),
               "speedup_recovered": round(ms["o"] / ms["r"], 3), "prune_s": round(prune_s, 1),
               "total_s": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(f"  {name} {method} -{target:.0%} MACs: {row}", flush=True)
    return {"model": name, "rows": rows, "notes": notes, "epochs": epochs,
            "train_samples": int(len(spec["train"][1])), "eval_samples": int(len(y_ev))}


def onnxsim_accuracy_at(result: dict[str, Any], macs_ratio: float) -> tuple[float | None, str]:
    """onnxsim's accuracy at ``macs_ratio`` (linear between its measured points and the original at 1x); when it
    never pruned that far, its most-pruned point (fewer MACs removed: in onnxsim's favour)."""
    pts = sorted((r["macs_ratio"], r["accuracy"]) for r in result.get("rows", [])
                 if r["method"] in ("onnxsim", "-") and r.get("macs_ratio"))
    if len(pts) < 2:
        return None, "no onnxsim figures"
    for (x0, a0), (x1, a1) in zip(pts, pts[1:]):
        if x0 <= macs_ratio <= x1:
            return a0 + (a1 - a0) * (macs_ratio - x0) / (x1 - x0), f"interpolated at {macs_ratio:.2f}x"
    return pts[-1][1], f"onnxsim reached only {pts[-1][0]:.2f}x: its most-pruned point"


def _recovery_target(row: dict[str, Any]) -> float:
    """The fraction of MACs a recovery row's prune removed (rows from before ``--recovery-targets``: 0.5)."""
    return float(row.get("target", 0.5))


def target_rows(results: list[dict[str, Any]], recoveries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets at 2x fewer MACs, per model and recovered method, computed (not typed in)."""
    out = []
    for res in results:
        rec = recoveries.get(res["model"])
        at_half = [r for r in (rec or {}).get("rows", []) if _recovery_target(r) == 0.5]
        sims = [r for r in at_half if r["method"].startswith("onnxsim")]
        for row in at_half:
            if row["method"].startswith("onnxsim"):
                continue
            # onnxsim recovered at the MACs ratio nearest ours: "at equal MACs" (onnxsim@R rows add ratios)
            sim_rec = min(sims, key=lambda r: abs(r["macs_ratio"] - row["macs_ratio"]), default=None)
            sim, how = onnxsim_accuracy_at(res, row["macs_ratio"])
            beats = None if sim_rec is None else (
                "pass" if row["accuracy_recovered"] > sim_rec["accuracy_recovered"] else
                "tie" if row["accuracy_recovered"] == sim_rec["accuracy_recovered"] else "FAIL")
            same = next((r for r in res.get("rows", []) if r["method"] == row["method"] and r["target"] == 0.5
                         and r["macs"] == row["macs"]), None)  # the identical model, timed again by the sweep
            out.append({"model": res["model"], **row, "speedup_sweep": None if same is None else same["speedup"],
                        "onnxsim_recovered": None if sim_rec is None else sim_rec["accuracy_recovered"],
                        "onnxsim_recovered_macs_ratio": None if sim_rec is None else sim_rec["macs_ratio"],
                        "beats_onnxsim_recovered": beats,
                        "pass_macs": row["macs_ratio"] >= 2.0 - 1e-9,
                        "pass_speedup": row["speedup_pruned"] >= 1.6,
                        "pass_accuracy": row["accuracy_recovered"] >= row["accuracy_original"] - 0.01 - 1e-9,
                        "onnxsim_accuracy": sim, "onnxsim_how": how,
                        "pass_vs_onnxsim": None if sim is None else row["accuracy_pruned"] > sim})
    return out


# ---------------------------------------------------------------------------------------------------------- report
def _train_note(row: dict[str, Any]) -> str:
    """' (N lines)' for the Paddle rows: how many rendered lines they were fine-tuned on."""
    n = row.get("train_samples")
    return f" ({n} lines)" if row.get("model") == "paddle_cls" and n else ""


def _lr_note(row: dict[str, Any]) -> str:
    """', lr 0.001' where the recovery had to lower the learning rate (see distill_recover)."""
    return f", lr {row['lr']:g}" if row.get("lr", 0.01) != 0.01 else ""


def _pf(ok: bool | None) -> str:
    return "-" if ok is None else ("**pass**" if ok else "FAIL")


def markdown(doc: dict[str, Any]) -> str:
    host, args, results = doc["host"], doc["args"], doc["results"]
    recoveries = doc.get("recovery", {})
    lines = ["# Structured pruning: onnxopt prune vs onnxsim 0.8.1 and Torch-Pruning", "",
             f"Generated by `benchmarks/pruning.py` on {host['cpu_model']} ({host['logical_cores']} logical cores, "
             f"shared with other processes, load varied); onnxruntime {host['onnxruntime_version']}. Latency: batch 1, "
             "1 thread, median of round-robin runs (every model compared is timed in one run); speed-up = original "
             "median / variant median. Every latency, MACs and params figure is of the BN-FOLDED model (the "
             "original is folded too; ORT fuses BN anyway). Accuracy: top-1 on the eval set (digits: the shipped "
             "400-image eval split; Paddle: 400 rendered text lines, seed 12).", "",
             *doc.get("provenance", []), ""]
    targets = target_rows(results, recoveries)
    if targets:
        lines += ["## Targets at 2x fewer MACs (after distillation recovery)", "",
                  "Recipe: `normalize` (fold_batchnorm=False) -> `prune` (macs_ratio=0.5) -> `distill` (KD, the pass "
                  "default; teacher = the original; epochs as listed, lr 0.01 (0.001 where marked: training diverged at 0.01; onnxsim's BN-free students train at both and keep the better on the calibration split), SGD; train split: 1097 digits / "
                  f"rendered lines (seed 13; {PADDLE_TRAIN} unless the epochs column says otherwise), kept epoch chosen on "
                  "the calibration split, never on the eval set) -> `normalize` (BN folded). Targets from the issue: "
                  "MACs ratio >= 2; ORT speed-up of the pruned model >= 1.6x at batch 1; accuracy after recovery "
                  "within 1 point of the unpruned model; better accuracy than onnxsim's pruning at equal MACs. "
                  "onnxsim is compared after the same recovery (sparsity bisected to 2x fewer MACs; where 95% sparsity does not "
                  "get there, its 95% model, which keeps more MACs than ours: in its favour; it cuts no Conv followed "
                  "by BatchNormalization, so it prunes the BN-folded model and is distilled BN-free; 'tie' = same "
                  "accuracy, not better); before recovery (its sweep points interpolated to our MACs ratio) only where "
                  "no onnxsim recovery ran.", "",
                  "| model | method | epochs | MACs ratio | speed-up (pruned / recovered; sweep run) | original acc | "
                  "pruned acc | "
                  "recovered acc | onnxsim: no recovery @ same MACs | onnxsim: recovered (its MACs ratio) | "
                  "speed-up >= 1.6x | acc within 1 pt | beats onnxsim | recovery time |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|"]
        for t in targets:
            sim = "-" if t["onnxsim_accuracy"] is None else f"{t['onnxsim_accuracy']:.1%} ({t['onnxsim_how']})"
            sim_rec = ("-" if t["onnxsim_recovered"] is None else
                       f"{t['onnxsim_recovered']:.2%} ({t['onnxsim_recovered_macs_ratio']:.2f}x)")
            sweep = "-" if t["speedup_sweep"] is None else f"{t['speedup_sweep']:.2f}x"
            beats = t["beats_onnxsim_recovered"]
            beats = _pf(t["pass_vs_onnxsim"]) + " (before recovery)" if beats is None else (
                "**pass**" if beats == "pass" else beats)
            lines.append(
                f"| {t['model']} | {t['method']} | {t['epochs']}{_train_note(t)}{_lr_note(t)} | {t['macs_ratio']:.2f}x | "
                f"{t['speedup_pruned']:.2f}x / "
                f"{t['speedup_recovered']:.2f}x; {sweep} | {t['accuracy_original']:.2%} | {t['accuracy_pruned']:.2%} | "
                f"{t['accuracy_recovered']:.2%} | {sim} | {sim_rec} | {_pf(t['pass_speedup'])} | "
                f"{_pf(t['pass_accuracy'])} | {beats} | {t['total_s']:.0f} s |")
        lines.append("")
        for model in dict.fromkeys(t["model"] for t in targets):
            ok = [f"{t['method']} ({t['epochs']} epochs)" for t in targets if t["model"] == model
                  and t["pass_macs"] and t["pass_speedup"] and t["pass_accuracy"]
                  and (t["beats_onnxsim_recovered"] == "pass" if t["beats_onnxsim_recovered"] is not None
                       else t["pass_vs_onnxsim"])]
            # A tie with onnxsim at the unpruned model's accuracy cannot be beaten on accuracy; said apart, with
            # the MACs each removed, never counted as a pass.
            ties = [f"{t['method']} ({t['macs_ratio']:.2f}x fewer MACs vs onnxsim's "
                    f"{t['onnxsim_recovered_macs_ratio']:.2f}x, both at {t['accuracy_recovered']:.2%}, the unpruned "
                    f"model's {t['accuracy_original']:.2%})" for t in targets if t["model"] == model
                    and t["pass_macs"] and t["pass_speedup"] and t["pass_accuracy"]
                    and t["beats_onnxsim_recovered"] == "tie" and t["accuracy_recovered"] >= t["accuracy_original"]
                    and t["macs_ratio"] >= t["onnxsim_recovered_macs_ratio"]]
            lines.append(f"- **{model}**: all targets met by " + ", ".join(ok) if ok else
                         f"- **{model}**: every target met but 'better than onnxsim', a tie at the ceiling: "
                         + "; ".join(ties) if ties else f"- **{model}**: no method meets all targets")
        sims = [r for rec in recoveries.values() for r in rec.get("rows", []) if r["method"].startswith("onnxsim")]
        if sims:
            lines += ["", "onnxsim rows (recovered the same way, BN-free): " + "; ".join(
                f"{m}: {r['macs_ratio']:.2f}x MACs, {r['speedup_pruned']:.2f}x faster, {r['accuracy_pruned']:.1%} -> "
                f"{r['accuracy_recovered']:.2%}{_lr_note(r)}" for m, rec in recoveries.items() for r in rec.get("rows", [])
                if r["method"].startswith("onnxsim")), ""]
        for model, rec in recoveries.items():
            lines += [f"- {model}: {n}" for n in rec.get("notes", [])]
        lines.append("")
    lines += criterion_table(recoveries)
    for res in results:
        lines += [f"## {res['model']}: sweep without recovery", "",
                  "| variant | MACs | MACs ratio | params | latency ms | speed-up | accuracy |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in res["rows"]:
            lines.append(
                f"| {row['variant']} | {row['macs'] / 1e6:.2f}M | {row['macs_ratio']:.2f}x | {row['params']:,} | "
                f"{row['median_ms'] if row['median_ms'] is not None else '-'} | "
                f"{row['speedup'] if row['speedup'] is not None else '-'}x | {row['accuracy']:.1%} |")
        if res["notes"]:
            lines += ["", *[f"- {n}" for n in res["notes"]]]
        lines.append("")
    return "\n".join(lines)


def criterion_table(recoveries: dict[str, dict[str, Any]]) -> list[str]:
    """Accuracy before -> after recovery at every MACs cut that was recovered, one line per model, onnxopt method
    and training setting (epochs, training samples), so rows trained differently are never mixed."""
    settings: dict[tuple[str, str, int, int], dict[float, dict[str, Any]]] = {}
    for model, rec in recoveries.items():
        for row in rec.get("rows", []):
            if row["method"].startswith("onnxopt-"):
                key = (model, row["method"], row["epochs"], row.get("train_samples", 0))
                settings.setdefault(key, {})[_recovery_target(row)] = row
    cuts = sorted({t for by_cut in settings.values() for t in by_cut})
    if len(cuts) < 2:
        return []
    lines = ["## Accuracy before -> after recovery at each MACs cut, per criterion", "",
             "Each cell: accuracy of the pruned model (BN folded) -> after KD recovery, and its measured ORT speed-up "
             "(batch 1, 1 thread, timed round-robin with the original in the same recovery run). Same recipe as "
             "the targets table; a row's epochs and training samples apply to all its cuts.", "",
             "| model | method | epochs (train samples) | original acc | "
             + " | ".join(f"-{c:.0%} MACs" for c in cuts) + " |",
             "|---|---|---:|---:|" + "---:|" * len(cuts)]
    order = {c: i for i, c in enumerate(CRITERIA)}

    def sort_key(key: tuple[str, str, int, int]) -> tuple[Any, ...]:
        criterion, _, depth = key[1].removeprefix("onnxopt-").partition("+depth")
        return (list(recoveries).index(key[0]), depth != "", order.get(criterion, 99), depth, -len(settings[key]))

    for key in sorted(settings, key=sort_key):
        by_cut = settings[key]
        first = next(iter(by_cut.values()))
        cells = [("-" if c not in by_cut else
                  f"{by_cut[c]['accuracy_pruned']:.1%} -> **{by_cut[c]['accuracy_recovered']:.2%}** "
                  f"({by_cut[c]['speedup_pruned']:.2f}x{_lr_note(by_cut[c])})") for c in cuts]
        lines.append(f"| {key[0]} | {key[1].removeprefix('onnxopt-')} | {key[2]} ({key[3]}) | "
                     f"{first['accuracy_original']:.2%} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="model names (default: all found)")
    parser.add_argument("--criteria", nargs="*", default=list(CRITERIA))
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--distill-epochs", type=int, default=30)
    parser.add_argument("--distill-methods", nargs="*",
                        default=["onnxopt-l1", "onnxopt-l1+depth0.5", "onnxopt-l1+depth1.0", "onnxopt-taylor+depth0.5",
                                 "torch-pruning", "onnxsim"],
                        help="onnxopt-CRITERION[+depthD] (prune with depth=D), torch-pruning, onnxsim")
    parser.add_argument("--recovery-only", action="store_true",
                        help="only the recovery rows (at --recovery-targets); written to --parts-dir, merged by "
                             "--render")
    parser.add_argument("--recovery-targets", type=float, nargs="*", default=[0.5],
                        help="fractions of MACs removed before recovery (default 0.5: 2x fewer MACs); the targets "
                             "table uses 0.5, the per-criterion table every fraction")
    parser.add_argument("--render", action="store_true",
                        help="merge --parts-dir into <out>.json (sweep figures kept from it) and rewrite <out>.md")
    parser.add_argument("--parts-dir", default="/tmp/onnxopt_pruning_parts",
                        help="where --recovery-only writes one JSON per model (merged into <out>.json by --render)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "pruning"))
    parser.add_argument("--paddle-epochs", type=int, default=PADDLE_EPOCHS,
                        help="recovery epochs of the Paddle model (the digits nets use --distill-epochs)")
    parser.add_argument("--paddle-train", type=int, default=PADDLE_TRAIN,
                        help="rendered text lines in the Paddle model's training split (seed 13)")
    parser.add_argument("--torch-threads", type=int, default=TORCH_THREADS,
                        help="torch intra-op threads for recovery training (latency is always timed on 1 thread)")
    args = parser.parse_args()
    globals()["PADDLE_TRAIN"] = args.paddle_train
    globals()["TORCH_THREADS"] = args.torch_threads
    out, parts = Path(args.out), Path(args.parts_dir)
    started = time.perf_counter()
    if args.recovery_only:
        parts.mkdir(parents=True, exist_ok=True)
        for spec in models_to_run(args.models):
            print(f"{spec['name']}:", flush=True)
            rec = recover_model(spec, args)
            rec.update(host=dataclasses.asdict(host_info()),
                       finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            targets = "" if args.recovery_targets == [0.5] else ".t" + "_".join(f"{t:g}" for t in args.recovery_targets)
            part = (f"{spec['name'].split(' ')[0]}.{'_'.join(args.distill_methods)}.e{args.distill_epochs}"
                    f"{targets}.json")
            atomic_write_text(parts / part, json.dumps(rec, indent=1, default=str))
        print(f"recovery done in {(time.perf_counter() - started) / 60:.1f} min")
        return
    if args.render:
        doc = json.loads(out.with_suffix(".json").read_text())
        found = sorted(parts.glob("*.json"))
        # merged into the full run's rows: a part's row replaces the row of the same method and epochs, so a
        # re-render does not double count
        for part in found:
            rec = json.loads(part.read_text())
            have = doc["recovery"].setdefault(rec["model"], {**rec, "rows": [], "notes": [], "finished": []})
            have["finished"] = sorted({*have.get("finished", []), rec["finished"]})
            keys = {(r["method"], r.get("epochs"), _recovery_target(r)) for r in rec["rows"]}
            have["rows"] = [r for r in have["rows"]
                            if (r["method"], r.get("epochs"), _recovery_target(r)) not in keys] + rec["rows"]
            have["notes"] = list(dict.fromkeys(have["notes"] + rec["notes"]))
        base = [line for line in doc.get("provenance", []) if not line.startswith("Added by --recovery-only")]
        added = [f"{part.stem}" for part in found]
        doc["provenance"] = base + ([
            "Added by --recovery-only runs (rows replace the full run's of the same method, epochs and MACs cut; each "
            "run re-prunes, distils and times the original, pruned and recovered models round-robin itself), finished "
            f"{', '.join(sorted({f for r in doc['recovery'].values() for f in r.get('finished', [])}))}: "
            + "; ".join(added) + "."] if found else [])
    else:
        results = []
        recovery = {}
        for spec in models_to_run(args.models):
            print(f"{spec['name']}:", flush=True)
            try:
                results.append(run_model(spec, args))
                if args.distill_epochs > 0:
                    recovery[spec["name"]] = recover_model(spec, args)
            except Exception as exc:  # noqa: BLE001 - one model failing must not lose the others
                traceback.print_exc()
                results.append({"model": spec["name"], "path": str(spec["path"]), "rows": [],
                                "notes": [f"failed: {type(exc).__name__}: {exc}"]})
        seconds = time.perf_counter() - started
        doc = {"host": dataclasses.asdict(host_info()), "args": vars(args), "seconds": round(seconds, 1),
               "results": results, "recovery": recovery,
               "sweep_caveats": ["Sweep: every onnxopt criterion pruned the BN-kept model; measured BN-folded."],
               "provenance": [f"One run of {seconds / 60:.1f} min: sweep and recovery rows alike."]}
    doc["targets"] = target_rows(doc["results"], doc.get("recovery", {}))
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1, default=str))
    atomic_write_text(out.with_suffix(".md"), markdown(doc))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
