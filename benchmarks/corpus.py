"""Reliability sweep: every registered pass and the default `optimize` recipe over a corpus of foreign exports.

Corpus (what this machine has): the Caffe2-era models of onnx's `backend/test/data/light`, onnx's
`pytorch-converted` / `pytorch-operator` test models that contain Conv/ConvTranspose/Gemm/MatMul/BatchNormalization
(the others have no weights for a pass to work on), the PaddlePaddle OCR models of `rapidocr-onnxruntime` (cls,
det with dynamic H/W, rec), torch exports of the zoo nets (legacy exporter at opsets 11/13/17, dynamo exporter when
`onnxscript` imports), Keras models through tf2onnx when `--tf-python` names a Python with tensorflow + tf2onnx,
and the embedded example.

Every (model, recipe) runs in a worker subprocess with a time limit (a worker past it is killed and replaced). Outcomes:

* ok: an output that passes the full ONNX checker and loads in ONNX Runtime, compared on data against its input by
  this script (independently of the report): exact recipes within 1e-3 relative error, lossy recipes within their
  budget (quantize: ``min_sqnr_db``) unless the run itself said the budget was missed (exit 1, "budget missed");
* refused: an ``OnnxoptError`` (exit 2), with its class and message;
* CRASH: any other exception, exit 3, a dead worker, a checker/ORT failure of an output or a silent fidelity loss;
* timeout: the time limit ran out (a bound of this sweep, not a verdict on the model).

Usage: nice -n 5 python benchmarks/corpus.py [--out reports/corpus.md] [--subset small] [--timeout 120]
One pass with other parameters, e.g. the quantize pass with its latency-aware placement search (the sweep's own
parameters use placement=all): ``--recipes quantize --pass-params '{"quantize": {"calib_samples": 16,
"eval_samples": 16}}' --out reports/corpus_placement.md``.
(reports/foundation.md, the default recipe with latency, stays with benchmarks/foundation_corpus.py.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import queue
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ocr_agreement

from onnxopt.hostinfo import host_info  # noqa: E402

ONNX_DATA = Path(onnx.__file__).parent / "backend/test/data"
WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"}
#: Recipe parameters per pass: small enough for a sweep, the rest at their defaults. A pass registered later and
#: not named here runs with its defaults (and the corpus data as calibration data).
PASS_PARAMS: dict[str, dict[str, Any]] = {
    "quantize": {"calib_samples": 16, "placement": "all", "eval_samples": 16},
    "prune": {"ratio": 0.25},
    "distill": {"epochs": 1, "max_samples": 16, "batch_size": 8, "torch_threads": 1},
}
#: Budgets per pass: a lossy output beyond them must come with exit 1 (budget missed), never silently.
PASS_BUDGETS: dict[str, dict[str, float]] = {name: {"min_sqnr_db": 10.0} for name in ("quantize", "prune", "distill")}
#: Samples of the eval data the run judges its budgets on, and this script compares on (the same ones).
EVAL_SAMPLES = 16
EXACT_TOLERANCE = 1e-3
#: Light models whose folded weights pass 200 MB run only the default recipe (vgg19: 575 MB folded).
HEAVY_LIGHT = ("bvlc_alexnet", "vgg19", "zfnet512")


@dataclass
class Case:
    label: str
    path: str
    source: str
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    data: str | None = None  # npz used as calib and eval data
    labelled: bool = False
    heavy: bool = False
    note: str = ""


# ------------------------------------------------------------------------------------------------------- the corpus
def build_corpus(workdir: Path, subset: str = "all", tf_python: str | None = None,
                 only: list[str] | None = None) -> tuple[list[Case], list[str]]:
    """Every corpus model available here, with fixed input shapes and a data file; plus notes on what was left out.
    ``only``: label fragments; families none of them can match are not built."""
    cases: list[Case] = []
    notes: list[str] = []
    small = subset == "small"

    def family(prefix: str) -> bool:
        return not only or any(prefix in o or o in prefix for o in only)

    if not small and family("caffe2/"):
        for path in sorted((ONNX_DATA / "light").glob("*.onnx")):
            cases.append(_with_data(Case(f"caffe2/{path.stem.removeprefix('light_')}", str(path), "onnx light"),
                                    workdir, samples=4))
    for folder in ("pytorch-converted", "pytorch-operator"):
        if not family(folder + "/"):
            continue
        for test_dir in sorted((ONNX_DATA / folder).iterdir()):
            model_file = test_dir / "model.onnx"
            if not model_file.exists():
                continue
            ops = {n.op_type for n in onnx.load(str(model_file), load_external_data=False).graph.node}
            if not ops & WEIGHT_OPS:
                notes.append(f"{folder}/{test_dir.name}: left out (no Conv/Gemm/MatMul/BN: {', '.join(sorted(ops))})")
                continue
            if small and test_dir.name not in ("test_Conv2d_depthwise", "test_Linear", "test_ConvTranspose2d",
                                               "test_BatchNorm2d_eval"):
                continue
            cases.append(_with_data(Case(f"{folder}/{test_dir.name.removeprefix('test_')}", str(model_file), folder,
                                         note="ops: " + ", ".join(sorted(ops & WEIGHT_OPS))), workdir, samples=8))
    cases += _paddle(workdir, notes, small) if family("paddle/") else []
    cases += _torch_exports(workdir, notes, small) if family("torch/") else []
    if tf_python and not small and family("keras/"):
        cases += _tf_exports(workdir, notes, tf_python)
    elif not small:
        notes.append("Keras/TensorFlow via tf2onnx: not run (no --tf-python given)")
    from onnxopt import examples

    cases.append(Case("example/digits_cnn", str(examples.default_model_path()), "onnxopt example",
                      data=str(examples.default_eval_path()), labelled=True))
    return cases, notes


def _with_data(case: Case, workdir: Path, samples: int, seed: int = 0) -> Case:
    """Fix every symbolic dim to 1 and write ``samples`` random-normal inputs (the model's own test input first)."""
    from onnxopt.modelio import input_specs, load_model

    model = load_model(case.path)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    specs = input_specs(model)
    for spec in specs:
        case.input_shapes.setdefault(spec.name, [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape])
    leading = {case.input_shapes[spec.name][0] for spec in specs if case.input_shapes[spec.name]}
    for spec in specs:
        shape = case.input_shapes[spec.name]
        if len(leading) > 1 and shape:  # no batch axis the inputs share (torch.mm's [2, 3] by [3, 4]): whole feeds
            arrays[spec.name] = rng.standard_normal((samples, *shape)).astype(spec.dtype)  # stacked on a new axis
        elif len(shape) == 0 or shape[0] == 1:
            base = shape[1:] if shape else []
            arrays[spec.name] = rng.standard_normal((samples, *base)).astype(spec.dtype)
        else:  # a fixed batch > 1 (onnx's torch tests): one batch of that many samples
            arrays[spec.name] = rng.standard_normal(tuple(shape)).astype(spec.dtype)
    reference = Path(case.path).parent / "test_data_set_0" / "input_0.pb"
    if reference.exists() and len(arrays) == 1:
        name = next(iter(arrays))
        tensor = onnx.numpy_helper.to_array(onnx.load_tensor(str(reference)))
        if tensor.shape[1:] == arrays[name].shape[1:] and tensor.shape[0] <= arrays[name].shape[0]:
            arrays[name][: tensor.shape[0]] = tensor
    path = workdir / (case.label.replace("/", "_") + ".npz")
    np.savez(path, **arrays)
    case.data = str(path)
    return case


def _paddle(workdir: Path, notes: list[str], small: bool) -> list[Case]:
    try:
        import rapidocr_onnxruntime
    except ImportError:
        notes.append("rapidocr-onnxruntime not installed: Paddle models left out")
        return []
    from onnxopt.datasets import render_textlines

    models = Path(rapidocr_onnxruntime.__file__).parent / "models"
    x, y = render_textlines(64 if small else 200, seed=0)
    np.savez(workdir / "textlines.npz", x=x, y=y)
    cases = [Case("paddle/ppocr_cls", str(models / "ch_ppocr_mobile_v2.0_cls_infer.onnx"), "rapidocr-onnxruntime",
                  {"x": [1, 3, 48, 192]}, str(workdir / "textlines.npz"), labelled=True,
                  note="rendered text lines, labelled 0/180 degrees")]
    if not small:
        # Rendered text, as RapidOCR preprocesses it (benchmarks/ocr_agreement.py): on random inputs the detector's
        # probability map is ~0 everywhere (std 2e-4), so an SQNR measured there compares noise with noise.
        from ocr_agreement import render_inputs  # beside this script

        text = render_inputs(4, seed=0)
        for key, file, shape, note in (
                ("det", "ch_PP-OCRv4_det_infer.onnx", [1, 3, 320, 320],
                 "dynamic H/W fixed to 320x320; 4 rendered text pages (ImageNet mean/std)"),
                ("rec", "ch_PP-OCRv4_rec_infer.onnx", [1, 3, 48, 320],
                 "dynamic W fixed to 320; 4 rendered text lines, right-padded, scaled to [-1, 1]")):
            path = workdir / f"ppocrv4_{key}.npz"
            np.savez(path, x=text[key])
            cases.append(Case(f"paddle/ppocrv4_{key}", str(models / file), "rapidocr-onnxruntime", {"x": shape},
                              str(path), note=note))
    return cases


def _torch_exports(workdir: Path, notes: list[str], small: bool) -> list[Case]:
    try:
        import torch

        from onnxopt.zoo import nets
    except ImportError as exc:
        notes.append(f"torch exports left out: {exc}")
        return []
    torch.set_num_threads(1)
    cases = []
    names = sorted(nets.NETS)
    for index, name in enumerate(names):
        for opset in ((11, 13, 17) if not small else ((11, 13, 17)[index % 3],)):
            path = workdir / f"{name}_legacy_op{opset}.onnx"
            nets.export_onnx(nets.build(name, seed=0), path, opset=opset)
            cases.append(_with_data(Case(f"torch/{name}_legacy_op{opset}", str(path), "torch.onnx.export legacy"),
                                    workdir, samples=16))
    if small:
        return cases
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        notes.append("torch dynamo exporter: left out (onnxscript not installed)")
        return cases
    for name in names:
        for opset in (18,):  # its native opset (each export takes about a minute here)
            path = workdir / f"{name}_dynamo_op{opset}.onnx"
            try:
                _dynamo_export(nets.build(name, seed=0), path, opset)
            except Exception as exc:  # noqa: BLE001 - an exporter failure is the exporter's, not ours
                notes.append(f"torch/{name}_dynamo_op{opset}: the dynamo exporter failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}")
                continue
            cases.append(_with_data(Case(f"torch/{name}_dynamo_op{opset}", str(path), "torch.onnx.export dynamo"),
                                    workdir, samples=16))
    return cases


def _dynamo_export(net: Any, path: Path, opset: int) -> None:
    import warnings

    import torch

    example = torch.zeros(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net.eval(), (example,), dynamo=True, opset_version=opset,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("N", min=1, max=1024)},), verbose=False)
        program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)


TF_SCRIPT = r"""
import sys, numpy as np, tensorflow as tf, tf2onnx
tf.random.set_seed(0)
L = tf.keras.layers
def small_cnn():
    x = inp = tf.keras.Input((32, 32, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False)(x); x = L.BatchNormalization()(x); x = L.ReLU()(x)
    y = L.DepthwiseConv2D(3, padding="same")(x); y = L.BatchNormalization()(y); y = L.ReLU()(y)
    y = L.Conv2D(16, 1)(y); x = L.Add()([x, y])
    x = L.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x); x = L.Dense(10)(x)
    return tf.keras.Model(inp, x)
def mobilenet():
    return tf.keras.applications.MobileNetV2((96, 96, 3), alpha=0.35, weights=None, classes=10)
for name, build, shape in (("keras_small_cnn", small_cnn, (1, 32, 32, 3)),
                           ("keras_mobilenetv2", mobilenet, (1, 96, 96, 3))):
    model = build()
    spec = (tf.TensorSpec((None,) + shape[1:], tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=13, output_path=sys.argv[1] + "/" + name + ".onnx")
    print(name)
"""


def _tf_exports(workdir: Path, notes: list[str], tf_python: str) -> list[Case]:
    """Keras models exported by tf2onnx in another Python (its own venv: tensorflow pins numpy/protobuf)."""
    try:
        result = subprocess.run([tf_python, "-c", TF_SCRIPT, str(workdir)], capture_output=True, text=True,
                                timeout=600,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    except (OSError, subprocess.TimeoutExpired) as exc:
        notes.append(f"Keras/TensorFlow via tf2onnx: export failed ({type(exc).__name__}: {exc})")
        return []
    if result.returncode != 0:
        notes.append("Keras/TensorFlow via tf2onnx: export failed: " + result.stderr.strip().splitlines()[-1][:300])
        return []
    cases = []
    for name in result.stdout.split():
        cases.append(_with_data(Case(f"keras/{name}", str(workdir / f"{name}.onnx"), "keras + tf2onnx (NHWC)"),
                                workdir, samples=8))
    return cases


# ------------------------------------------------------------------------------------------------------ the recipes
def recipes(wanted: list[str] | None = None) -> dict[str, list[Any] | None]:
    """Recipe label -> passes: each registered pass alone with its sweep parameters, and the default recipe (those
    named in ``wanted`` only, when given)."""
    from onnxopt.pipeline import registry

    plans: dict[str, list[Any] | None] = {"optimize(default)": None}
    for name in registry.available():
        plans[name] = [{"name": name, "params": PASS_PARAMS.get(name, {})}]
    if wanted:
        unknown = sorted(set(wanted) - set(plans))
        if unknown:
            raise SystemExit(f"--recipes: unknown {', '.join(unknown)} (known: {', '.join(plans)})")
        plans = {label: plan for label, plan in plans.items() if label in wanted}
    return plans


def classify_params(cases: list[Case]) -> None:
    """Mark the light models whose folded weights exceed HEAVY_BYTES (their weights are computed at run time, so
    the file says nothing: the figures are normalize's, reports/foundation.md: alexnet 244, zfnet512 349, vgg19
    575 MB); they run only the default recipe within the sweep's time bound."""
    for case in cases:
        case.heavy = case.source == "onnx light" and case.label.split("/")[-1] in HEAVY_LIGHT


# ------------------------------------------------------------------------------------------------------- one run
def run_one(case: Case, recipe_label: str, recipe: list[Any] | None, workdir: Path) -> dict[str, Any]:
    """Optimize in this process and check the output; called in a worker subprocess."""
    import onnxopt
    from onnxopt.errors import OnnxoptError

    out = workdir / f"{case.label.replace('/', '_')}.{recipe_label.replace('(', '_').replace(')', '')}.onnx"
    exact = recipe is None or recipe_label == "normalize"
    budgets = {} if exact else PASS_BUDGETS.get(recipe[0]["name"], {"min_sqnr_db": 10.0})
    row: dict[str, Any] = {"model": case.label, "recipe": recipe_label}
    try:
        result = onnxopt.optimize(case.path, recipe=recipe, calib=case.data, eval=case.data,
                                  input_shapes=case.input_shapes or None, budgets=budgets or None, seed=0,
                                  output=out, measure_latency=False, max_eval_samples=EVAL_SAMPLES)
    except OnnxoptError as exc:
        row.update(status="refused", error_class=type(exc).__name__, exit_code=exc.exit_code,
                   message=str(exc).splitlines()[0][:400])
        if out.exists():
            row.update(status="CRASH", message=f"refused but left an output file: {row['message']}")
        return row
    except Exception as exc:  # noqa: BLE001 - a crash is what this sweep exists to find
        traceback.print_exc()
        return {**row, "status": "CRASH", "error_class": type(exc).__name__, "message": str(exc)[:400]}
    steps = result.report.to_dict()["steps"]
    fid = steps[-1].get("fidelity_vs_original") or {}
    row.update(passed=result.passed, verdict=result.report.verdict.get("summary", ""),
               nodes=f"{steps[0]['metrics']['num_nodes']} -> {steps[-1]['metrics']['num_nodes']}",
               size_kb=f"{steps[0]['metrics']['size_bytes'] / 1e3:.0f} -> "
                       f"{steps[-1]['metrics']['size_bytes'] / 1e3:.0f}",
               accuracy=[steps[0]["metrics"]["accuracy"], steps[-1]["metrics"]["accuracy"]],
               report_sqnr=fid.get("sqnr_db"), report_top1=fid.get("top1_agreement"),
               notes=[n for s in steps[1:] for n in s.get("notes", [])][:6])
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": "CRASH", "message": f"output fails the ONNX checker: {exc}"[:400]}
    try:
        measured = compare_on_data(case, out)
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": "CRASH", "message": f"output does not load or run in ORT: {exc}"[:400]}
    row.update(measured)
    if exact and not measured["max_rel_error"] <= EXACT_TOLERANCE:
        return {**row, "status": "CRASH", "message": f"silent fidelity loss: rel err {measured['max_rel_error']:.2e}"}
    sqnr_budget = None if exact else budgets.get("min_sqnr_db", PASS_BUDGETS.get(recipe_label, {}).get("min_sqnr_db"))
    if sqnr_budget is not None and result.passed and not measured["sqnr_db"] >= sqnr_budget - 0.5:
        return {**row, "status": "CRASH", "message": f"silent fidelity loss: SQNR {measured['sqnr_db']:.1f} dB < "
                                                      f"budget {sqnr_budget} dB but the run said it passed"}
    row["status"] = "ok" if result.passed else "budget missed"
    return row


def compare_on_data(case: Case, output: Path) -> dict[str, Any]:
    """Run input and output side by side on the case's data (this script's own check, not the report's)."""
    from onnxopt.fidelity import FidelityAccumulator
    from onnxopt.modelio import load_model
    from onnxopt.runtime import make_session

    reference = make_session(_runnable_reference(case.path, load_model), threads=1)
    candidate = make_session(str(output), threads=1)
    names = [o.name for o in reference.get_outputs()]
    accumulator = FidelityAccumulator(names)
    feeds = sample_feeds(case, reference.get_inputs(), dict(np.load(case.data)), EVAL_SAMPLES)
    for feed in feeds:
        accumulator.update(reference.run(None, feed), candidate.run(None, feed))
    fid = accumulator.result()
    constant = _constant_outputs(reference, feeds[:4])
    return {"max_rel_error": fid.max_rel_error, "sqnr_db": fid.sqnr_db, "top1_agreement": fid.top1_agreement,
            "compared_samples": fid.samples, "constant_reference": constant}


def sample_feeds(case: Case, inputs: list[Any], data: dict[str, np.ndarray], limit: int) -> list[dict[str, Any]]:
    """The case's samples as ONNX Runtime feeds (up to ``limit``): whole feeds stacked one rank above the inputs
    (a model without a batch axis), the one batch of a model that fixes a batch above 1, or one row each."""
    names = [i.name for i in inputs]
    count = min(len(data[names[0]]), limit)
    if all(data[i.name].ndim == len(i.shape) + 1 for i in inputs):
        return [{n: data[n][k] for n in names} for k in range(count)]
    if any(case.input_shapes.get(n) and case.input_shapes[n][0] != 1 for n in names):
        return [{n: data[n] for n in names}]
    return [{n: data[n][k:k + 1] for n in names} for k in range(count)]


def _runnable_reference(path: str, load: Any) -> Any:
    """The input as ORT can run it: below opset 7 (ORT's range) onnx's own version converter's opset-13 conversion,
    made here, independently of the pipeline's conversion of the same model."""
    proto = onnx.load(path, load_external_data=False)
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None or version >= 7:
        return load(path)
    return onnx.version_converter.convert_version(onnx.load(path), 13)


def _constant_outputs(session: Any, feeds: list[dict[str, Any]]) -> bool:
    """True when the input model gives the same outputs for every one of ``feeds`` (then a comparison proves
    little); False for a single feed."""
    runs = [session.run(None, feed) for feed in feeds]
    return len(runs) > 1 and all(np.array_equal(runs[0][k], r[k]) for r in runs[1:] for k in range(len(runs[0])))


class Worker:
    """A persistent worker subprocess (imports paid once) that runs one job per stdin line, one JSON row per job.

    A job past its time limit kills the worker; the next job starts a fresh one."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> subprocess.Popen[str]:
        self.lines = queue.Queue()
        proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=None, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = self.lines

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        return proc

    def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any] | str:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                return "timeout"
            if line is None:
                code = self.proc.wait()
                self.proc = None
                return f"worker died (exit {code})"
            if line.startswith('{"model"'):
                return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def run_job(worker: Worker, case: Case, label: str, recipe: list[Any] | None, workdir: Path, timeout: float) -> dict:
    start = time.perf_counter()
    job = {"case": asdict(case), "label": label, "recipe": recipe, "workdir": str(workdir),
           "pass_budgets": PASS_BUDGETS}  # the worker's own copy has not seen --pass-budgets
    outcome = worker.run(job, timeout)
    if outcome == "timeout":
        row = {"model": case.label, "recipe": label, "status": "timeout", "message": f"over {timeout:.0f} s"}
    elif isinstance(outcome, str):
        row = {"model": case.label, "recipe": label, "status": "CRASH", "message": outcome}
    else:
        row = outcome
    row["wall_s"] = round(time.perf_counter() - start, 1)
    for leftover in workdir.glob(f"{case.label.replace('/', '_')}.*.onnx*"):
        leftover.unlink()
    return row


def _worker() -> None:
    import torch  # the torch-based passes: bounded threads

    torch.set_num_threads(1)
    for line in sys.stdin:
        job = json.loads(line)
        PASS_BUDGETS.clear()
        PASS_BUDGETS.update(job.get("pass_budgets", {}))
        try:
            row = run_one(Case(**job["case"]), job["label"], job["recipe"], Path(job["workdir"]))
        except BaseException as exc:  # noqa: BLE001 - reported as a crash by the parent
            row = {"model": job["case"]["label"], "recipe": job["label"], "status": "CRASH",
                   "message": f"{type(exc).__name__}: {exc}"[:400]}
        print(json.dumps(row, default=_json_default), flush=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def sweep(subset: str = "all", timeout: float = 120.0, tf_python: str | None = None,
          only: list[str] | None = None, heavy: bool = False, wanted: list[str] | None = None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxopt-corpus-") as tmp:
        workdir = Path(tmp)
        cases, notes = build_corpus(workdir, subset, tf_python, only)
        classify_params(cases)
        plans = recipes(wanted)
        worker = Worker()
        for case in cases:
            if only and not any(o in case.label for o in only):
                continue
            for label, recipe in plans.items():
                if case.heavy and recipe is not None and not heavy:
                    rows.append({"model": case.label, "recipe": label, "status": "skipped",
                                 "message": "heavy model: only the default recipe runs within the sweep's time bound"})
                    continue
                row = run_job(worker, case, label, recipe, workdir, timeout)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "notes"}, default=_json_default), flush=True)
        worker.close()
    return {"host": host_info().to_dict(), "command": "nice -n 5 python benchmarks/corpus.py " + " ".join(
                sys.argv[1:]), "subset": subset, "timeout_s": timeout, "passes": list(plans),
            "pass_params": PASS_PARAMS, "pass_budgets": PASS_BUDGETS, "notes": notes,
            "cases": [asdict(c) | {"data": None} for c in cases], "rows": rows,
            "wall_s": round(time.perf_counter() - start, 1)}


def merge(paths: list[str]) -> dict[str, Any]:
    """One result from several partial sweeps (later files win for the same model and recipe)."""
    parts = []
    for path in paths:  # a sweep's JSON, or the JSON lines it printed (a sweep stopped early)
        text = Path(path).read_text()
        if text.startswith("{\n"):
            parts.append(json.loads(text))
        else:
            lines = [json.loads(ln) for ln in text.splitlines() if ln.startswith('{"model"')]
            parts.append({"rows": lines, "notes": [], "cases": [], "wall_s": 0.0})
    parts.sort(key=lambda p: "host" not in p)
    result = dict(parts[0])
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for part in parts:
        for row in part["rows"]:
            rows[(row["model"], row["recipe"])] = row
    labels = [c["label"] for c in parts[0]["cases"]]
    result["rows"] = sorted(rows.values(), key=lambda r: (labels.index(r["model"]) if r["model"] in labels else 1e9,
                                                          r["recipe"]))
    result["wall_s"] = max(p["wall_s"] for p in parts)
    result["merged"] = [sweep for part in parts for sweep in _sweeps(part)]
    result["merged_wall_s"] = [sweep["wall_s"] for sweep in result["merged"]]
    result["notes"] = sorted({n for p in parts for n in p["notes"] if not _covered(n, result["rows"])})
    result["cases"] = [c for c in max(parts, key=lambda p: len(p["cases"]))["cases"]]
    return result


def _sweeps(part: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweeps (command, wall time) a result came from: itself, or those it was merged from (an older merge kept
    only their times, and the first one's command)."""
    if part.get("merged"):
        return list(part["merged"])
    times = part.get("merged_wall_s") or [part["wall_s"]]
    return [{"command": part.get("command") if index == 0 else None, "wall_s": wall} for index, wall in
            enumerate(times)]


#: (fragment of a "left out" note, fragment of the model labels it is about): a partial sweep that did not build a
#: family says so, and that note is stale once another merged sweep has rows of the family.
_FAMILY_NOTES = (("Keras/TensorFlow via tf2onnx: not run", "keras/"), ("dynamo exporter: left out", "_dynamo_"),
                 ("Paddle models left out", "paddle/"), ("torch exports left out", "torch/"))


def _covered(note: str, rows: list[dict[str, Any]]) -> bool:
    return any(fragment in note and any(label in r["model"] for r in rows) for fragment, label in _FAMILY_NOTES)


# ------------------------------------------------------------------------------------------------------- the report
def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


#: The command of the sweeps recorded before the report named its own.
_FIRST_COMMAND = "nice -n 5 python benchmarks/corpus.py --tf-python /work/venvs/tf/bin/python"


def _merged_lines(result: dict[str, Any]) -> list[str]:
    if not result.get("merged"):
        return []
    return ["", "Sweeps merged, in order (a later one's rows replace an earlier one's): " + "; ".join(
        f"`{sweep['command']}` ({sweep['wall_s']:.0f} s)" if sweep.get("command")
        else f"one of {sweep['wall_s']:.0f} s whose command was not recorded" for sweep in result["merged"]) + "."]


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    info = result["host"]
    lines = [
        "# Corpus sweep: every pass and the default recipe over foreign exports", "",
        f"Generated by `{result.get('command', _FIRST_COMMAND)}` (runs in a worker subprocess, "
        f"time limit {result['timeout_s']:.0f} s). Host: {info['cpu_model']}, {info['logical_cores']} logical cores; "
        f"onnxruntime {info['onnxruntime_version']}. Sweep wall time {result['wall_s']:.0f} s" + (
            f" (merged from sweeps of {', '.join(f'{w:.0f}' for w in result['merged_wall_s'])} s with `--merge`; "
            "later sweeps replace the rows they re-ran)" if result.get("merged_wall_s") else "") + ".",
        *_merged_lines(result), "",
        "Each pass runs alone on the model as exported, with the parameters "
        f"`{json.dumps(result['pass_params'])}` and budgets `{json.dumps(result['pass_budgets'])}`; "
        "`optimize(default)` is the default recipe. Data: random normal inputs at the fixed shapes (the onnx test "
        "models' own `test_data_set_0` input as the first sample), rendered labelled text lines for the Paddle "
        "classifier, rendered text pages and lines for the PaddleOCR v4 detector and recognizer (preprocessed as "
        "RapidOCR does), the shipped digits data for the example. Every output is checked by the full ONNX checker, "
        f"loaded in ONNX Runtime and run against its input by this script on the same (up to {EVAL_SAMPLES}) samples "
        "the run judged its budgets on; exact recipes must "
        f"agree within {EXACT_TOLERANCE:g} relative error; lossy passes (every pass but normalize) within their SQNR "
        "budget (0.5 dB slack) unless the run itself reported the budget missed (exit 1: not silent).", "",
        "**Totals: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in
                                  ("ok", "budget missed", "refused", "CRASH", "timeout", "skipped")) +
        f" ({len(rows)} runs, {len({r['model'] for r in rows})} models).**", "",
        "| model | recipe | status | nodes | size KB | max rel err | SQNR dB | top-1 agree | accuracy in -> out | "
        "time s | refusal / note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = r.get("accuracy") or [None, None]
        accuracy = "-" if acc[0] is None else f"{acc[0]:.1%} -> {acc[1]:.1%}"
        message = r.get("message", "")
        if r.get("error_class"):
            message = f"{r['error_class']}: {message}"
        if r["status"] == "budget missed":
            message = r.get("verdict", "")
        if r["status"] == "ok" and r.get("notes") and r["recipe"] not in ("normalize", "optimize(default)"):
            # the pass's verdict (quantize's placement search), else what it said last: e.g. that it left the
            # model unchanged, and why
            message = next((n for n in r["notes"] if n.startswith("verdict:")), r["notes"][-1])
        if r.get("constant_reference"):
            message = (message + "; " if message else "") + "the input's outputs are the same for every sample: " \
                "the comparison proves little"
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['status']} | {r.get('nodes', '')} | {r.get('size_kb', '')} | "
            f"{_fmt(r.get('max_rel_error'), '.1e')} | {_fmt(r.get('sqnr_db'), '.1f')} | "
            f"{_fmt(r.get('top1_agreement'), '.0%')} | {accuracy} | {r.get('wall_s', '')} | "
            f"{message.replace('|', '/')[:220]} |")
    lines += ["", "## Corpus", ""]
    for case in result["cases"]:
        lines.append(f"- `{case['label']}` ({case['source']}; shapes {case['input_shapes']})"
                     + (f": {case['note']}" if case["note"] else "") + (" **heavy**" if case["heavy"] else ""))
    lines += ["", "## Left out", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "reports" / "corpus.md"))
    parser.add_argument("--subset", choices=("all", "small"), default="all")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--only", action="append", help="models whose label contains this (repeatable)")
    parser.add_argument("--tf-python", default=os.environ.get("ONNXOPT_TF_PYTHON"),
                        help="a Python with tensorflow + tf2onnx (e.g. /work/venvs/tf/bin/python)")
    parser.add_argument("--heavy", action="store_true",
                        help="run every recipe on the heavy light models too (alexnet, vgg19, zfnet512; slow)")
    parser.add_argument("--merge", nargs="+", help="combine the JSON results of sweeps run side by side (--only)")
    parser.add_argument("--render", metavar="JSON", help="only write the Markdown report again from a sweep's JSON")
    parser.add_argument("--recipes", help="comma list of the recipes to run (pass names, 'optimize(default)')")
    parser.add_argument("--pass-params", metavar="JSON",
                        help='replace passes\' sweep parameters, e.g. \'{"quantize": {"placement": "auto"}}\'')
    parser.add_argument("--pass-budgets", metavar="JSON",
                        help='replace passes\' budgets, e.g. \'{"quantize": {}}\': none, so the pass keeps its own '
                             'bars and this script checks validity only, not an SQNR')
    args = parser.parse_args()
    if args.pass_params:
        PASS_PARAMS.update(json.loads(args.pass_params))
    if args.pass_budgets:
        PASS_BUDGETS.update(json.loads(args.pass_budgets))
    if args.worker:
        _worker()
        return
    if args.render:
        Path(args.out).write_text(render(json.loads(Path(args.render).read_text())))
        return
    wanted = args.recipes.split(",") if args.recipes else None
    result = merge(args.merge) if args.merge else sweep(args.subset, args.timeout, args.tf_python, args.only,
                                                          args.heavy, wanted)
    Path(args.out).write_text(render(result))
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    bad = sum(r["status"] == "CRASH" for r in result["rows"])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
