"""Which agreement measure tells a good int8 OCR model from a bad one: the PaddleOCR v4 detector and recognizer.

The quantize pass's placement search checks every candidate against FP32 before it may be chosen. It used to take
one arg-max over the whole first output, which on a detector's probability map ([N, 1, H, W]) or a recognizer's
sequence of class scores ([N, T, C]) flips on any change: every int8 candidate of both models was dropped at "top-1
agreement 0.000" (reports/corpus_placement.md, first run). The check now takes the measure the output supports
(``onnxopt/passes/quantize/agreement.py``): SQNR for an output without classes, top-1 per position along the class
axis of a sequence. This script measures, on rendered text, what each measure says about int8 forms of the two
models, next to what the OCR pipeline does with the output:

* detector: the pixels DB post-processing binarizes (probability > 0.3): share of pixels alike, IoU of the text
  pixels;
* recognizer: the greedy CTC decoding (arg-max per position, repeats collapsed, blanks dropped): share of lines
  decoded to the same string as FP32.

Data: text lines rendered by ``onnxopt.datasets.textlines`` (Debian's DejaVu fonts), upright only. Detector inputs:
320x320 canvases with lines pasted at seeded positions, ImageNet mean/std (RapidOCR's detector preprocessing);
recognizer inputs: each line resized to height 48, right-padded to width 320, scaled to [-1, 1] (RapidOCR's). The
models come from the ``rapidocr-onnxruntime`` wheel. Calibration and evaluation use different images.

The int8 forms are onnxopt's ``normalize`` + ``quantize`` with ``placement=all`` in three settings, and ONNX
Runtime's ``quantize_static`` with its defaults on the model as shipped (the peer); the last rows are the default pass
(the placement search) and the decision it takes, with and without its mixed-precision fallback
(``mixed_fallback``: when every int8 candidate faster than FP32 fails its check, the fewest most sensitive layers
are kept FP32 that let one pass, in two orders: the simulated sensitivity table's and the noise each layer adds in
the all-int8 model; the decision column lists the candidates it found as its race timed them). Speed: every form
and the normalized FP32 model timed round-robin in 3 independent runs (``onnxopt.bench``, batch 1, ORT's default
threads, random inputs), FP32 median / form median (and the same ratio of fastest runs), the median over the runs.

Usage: nice -n 5 python benchmarks/ocr_agreement.py [--calib 32] [--eval 32] [--out reports/ocr_agreement.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_files import write_report  # noqa: E402 - beside this script

MODELS = {"det": ("ch_PP-OCRv4_det_infer.onnx", (1, 3, 320, 320)),
          "rec": ("ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320))}
VARIANTS = {
    "int8 QDQ, per-channel weights (placement=all)": {"placement": "all"},
    "int8 QDQ, per-tensor weights (placement=all)": {"placement": "all", "per_channel": False},
    "int8 QOperator (placement=all)": {"placement": "all", "format": "qoperator"},
}
DB_THRESHOLD = 0.3  # RapidOCR's det_thresh: the pixels its DB post-processing keeps


def model_path(name: str) -> Path:
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).parent / "models" / MODELS[name][0]


def render_inputs(count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` detector canvases and recognizer lines from rendered upright text lines."""
    from PIL import Image

    from onnxopt.datasets.textlines import textline_images

    images, labels = textline_images(count * 8, seed=seed)
    lines = [image for image, label in zip(images, labels) if label == 0]
    rng = np.random.default_rng(seed)
    canvases = []
    for _ in range(count):
        canvas = Image.new("RGB", (320, 320), tuple(int(v) for v in rng.integers(180, 256, 3)))
        top = 5
        while True:
            line = lines[int(rng.integers(len(lines)))]
            width = min(310, line.width)
            if top + line.height > 318:
                break
            canvas.paste(line.crop((0, 0, width, line.height)), (int(rng.integers(0, 320 - width + 1)), top))
            top += line.height + int(rng.integers(2, 20))
        pixels = np.asarray(canvas, np.float32) / 255.0
        canvases.append(((pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1))
    rec = np.zeros((count, 3, 48, 320), np.float32)
    for index, line in enumerate(lines[:count]):
        width = min(320, int(round(line.width * 48 / line.height)))
        pixels = np.asarray(line.resize((width, 48)), np.float32) / 255.0
        rec[index, :, :, :width] = ((pixels - 0.5) / 0.5).transpose(2, 0, 1)
    return {"det": np.stack(canvases).astype(np.float32), "rec": rec}


def run(model: Any, x: np.ndarray) -> np.ndarray:
    from onnxopt.runtime import make_session

    session = make_session(model, threads=1)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def ctc_greedy(scores: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding per line: arg-max per position, repeats collapsed, blanks (class 0) dropped."""
    decoded = []
    for best in scores.argmax(-1):
        kept, previous = [], -1
        for cls in best:
            if cls != previous and cls != 0:
                kept.append(int(cls))
            previous = cls
        decoded.append(tuple(kept))
    return decoded


def measures(name: str, ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """What each check says (SQNR, one arg-max per sample, per position) and what OCR does with the output."""
    from onnxopt.passes.quantize.agreement import output_sqnr_db, top1_agreement

    row = {"sqnr_db": output_sqnr_db([ref], [out]), "top1_whole_output": top1_agreement([ref], [out])}
    if name == "rec":
        row["top1_per_position"] = top1_agreement([ref], [out], axis=2)
        row["same_string"] = float(np.mean([a == b for a, b in zip(ctc_greedy(ref), ctc_greedy(out))]))
    else:
        a, b = ref > DB_THRESHOLD, out > DB_THRESHOLD
        row["text_pixels_alike"] = float(np.mean(a == b))
        row["text_pixel_iou"] = float(np.sum(a & b) / max(1, np.sum(a | b)))
    return row


def quantize(name: str, params: dict[str, Any], calib: Path, budgets: list[str] | None = None) -> tuple[Any, dict]:
    import onnxopt

    started = time.perf_counter()
    result = onnxopt.optimize(str(model_path(name)), ["normalize", {"name": "quantize", **params}], calib=str(calib),
                              input_shapes={"x": list(MODELS[name][1])}, measure_latency=False, budgets=budgets)
    step = result.report.to_dict()["steps"][-1]
    placement = step.get("details", {}).get("placement", {})
    fallback = [{key: c.get(key) for key in ("label", "speedup", "best_run_speedup", "sqnr_db", "rejected")}
                for c in placement.get("candidates", []) if "_sensitive_" in c["label"] or "_noisiest_" in c["label"]]
    info = {"seconds": round(time.perf_counter() - started, 1), "chosen": placement.get("chosen"),
            "verdict": placement.get("verdict"), "measure": placement.get("agreement_measure"),
            "fallback_candidates": fallback}
    return result.model, info


ORT_PEER = "ORT quantize_static defaults (QDQ, per-tensor MinMax, model as shipped)"


def ort_quantize(name: str, calib: np.ndarray, out: Path) -> tuple[Any, dict]:
    """The peer: ONNX Runtime's ``quantize_static`` with its defaults, one calibration input per read."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter({"x": calib[i:i + 1]} for i in range(len(calib)))

        def get_next(self):  # noqa: ANN202 - ORT's interface
            return next(self.items, None)

    started = time.perf_counter()
    quantize_static(str(model_path(name)), str(out), Reader())
    return onnx.load(str(out)), {"seconds": round(time.perf_counter() - started, 1), "chosen": None,
                                 "verdict": None, "measure": None}


TIMING_RUNS = 3


def speeds(name: str, models: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """FP32 (normalized) and every int8 form of ``models`` timed round-robin, in ``TIMING_RUNS`` independent runs:
    label -> per run, (median-based, fastest-run-based) speed-up over FP32."""
    import onnxopt
    from onnxopt.bench import BenchConfig, benchmark

    fp32 = onnxopt.optimize(str(model_path(name)), ["normalize"], input_shapes={"x": list(MODELS[name][1])},
                            measure_latency=False).model
    labels = ["FP32", *models]
    config = BenchConfig(batch_sizes=(1,), threads=(None,), warmup=5, repeats=30,
                         input_shapes={"x": MODELS[name][1]})
    out: dict[str, list[tuple[float, float]]] = {label: [] for label in models}
    for _ in range(TIMING_RUNS):
        report = benchmark([fp32, *models.values()], config, labels=labels)
        by_label = {r.label: r for r in report.results}
        base = by_label["FP32"]
        for label in models:
            out[label].append((base.median_ms / by_label[label].median_ms, base.min_ms / by_label[label].min_ms))
    return out


def measure(calib_n: int, eval_n: int, workdir: Path) -> dict:
    calib, evaluation = render_inputs(calib_n, seed=11), render_inputs(eval_n, seed=12)
    rows = []
    for name in MODELS:
        calib_file = workdir / f"{name}_calib.npz"
        np.savez(calib_file, x=calib[name])
        x = evaluation[name]
        reference = run(str(model_path(name)), x)
        runs = [(label, params, None) for label, params in VARIANTS.items()]
        runs.append((ORT_PEER, None, None))
        runs.append(("default pass (placement search)", {}, None))
        runs.append(("default pass, mixed_fallback=false (the search before the fallback)", {"mixed_fallback": False},
                     None))
        if name == "det":
            runs.append(("default pass, --budget min_sqnr_db=12", {}, ["min_sqnr_db=12"]))
        models: dict[str, Any] = {}
        for label, params, budgets in runs:
            if params is None:
                model, info = ort_quantize(name, calib[name], workdir / f"{name}_ort.onnx")
            else:
                model, info = quantize(name, params, calib_file, budgets)
            row = {"model": name, "variant": label, **info, **measures(name, reference, run(model, x))}
            models[label] = model
            rows.append(row)
            print(f"  {name}: {label}: {row}", file=sys.stderr, flush=True)
        measured = speeds(name, models)
        for row in rows:
            if row["model"] == name:
                runs = measured[row["variant"]]
                row["speedup_runs"] = runs
                row["speedup"] = float(np.median([median for median, _ in runs]))
                row["best_run_speedup"] = float(np.median([fastest for _, fastest in runs]))
    return {"calib": calib_n, "eval": eval_n, "rows": rows}


def render(payload: dict) -> str:
    from onnxopt.passes.quantize import placement

    lines = [
        "# Agreement measures on the PaddleOCR v4 detector and recognizer", "",
        f"Generated by `nice -n 5 python benchmarks/ocr_agreement.py` ({payload['calib']} calibration / "
        f"{payload['eval']} evaluation inputs of rendered text; see the script's docstring). Do not edit by hand.",
        "",
        f"Columns: SQNR of the first output against FP32; 'whole-output top-1' = one arg-max over the whole output "
        f"per sample (the check the placement search used to take); the measure it takes now ('per position' for "
        f"the recognizer, SQNR for the detector, whose bar is {placement.MIN_SQNR_DB:g} dB unless the run has a "
        f"min_sqnr_db budget; {placement.MIN_AGREEMENT:.0%} per position, and >= {placement.SQNR_FLOOR_DB:g} dB "
        "for every candidate); and what the OCR pipeline does with the output: the detector's text pixels "
        f"(probability > {DB_THRESHOLD}, DB post-processing), the recognizer's greedy CTC strings; speed = the "
        "normalized FP32 model's latency / the form's, batch 1, ORT's default threads, every form of a model timed "
        f"round-robin in {TIMING_RUNS} independent runs of 30 rounds, the median over those runs of the per-run "
        "ratio of medians (in brackets: of fastest runs; every run's ratios are in the JSON); quantization time = "
        "wall time of the quantizer (onnxopt: normalize + quantize through `onnxopt.optimize`, its validation "
        "included; imports excluded).", "",
    ]
    for name, title in (("det", "Detector (probability map [N, 1, 320, 320])"),
                        ("rec", "Recognizer (class scores [N, 40, 6625])")):
        rows = [r for r in payload["rows"] if r["model"] == name]
        lines += [f"## {title}", ""]
        ocr_columns = ("text pixels alike | text-pixel IoU" if name == "det"
                       else "top-1 per position | same CTC string")
        lines += [f"| int8 form | SQNR dB | whole-output top-1 | {ocr_columns} | speed vs FP32 | quantization time | "
                  "placement decision |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            decision = r["verdict"] or "-"
            found = [c for c in r.get("fallback_candidates", []) if c["speedup"] is not None]
            if found:  # the mixed-precision fallback's candidates, as its race timed them against FP32
                decision += "; fallback candidates in one race: " + ", ".join(
                    f"{c['label']} {c['speedup']:.2f}x ({c['best_run_speedup']:.2f}x), SQNR {c['sqnr_db']:.1f} dB on "
                    "the check samples" for c in found)
            ocr = (f"{r['text_pixels_alike']:.4f} | {r['text_pixel_iou']:.3f}" if name == "det"
                   else f"{r['top1_per_position']:.3f} | {r['same_string']:.0%}")
            speed = f"{r['speedup']:.2f}x ({r['best_run_speedup']:.2f}x)" if "speedup" in r else "-"
            lines.append(f"| {r['variant']} | {r['sqnr_db']:.1f} | {r['top1_whole_output']:.2f} | {ocr} | {speed} | "
                         f"{r['seconds']:.1f} s | {decision[:600]} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=32)
    parser.add_argument("--out", default=str(REPO / "reports" / "ocr_agreement.md"))
    args = parser.parse_args()
    try:
        import rapidocr_onnxruntime  # noqa: F401 - the models' wheel
    except ImportError:
        sys.exit("rapidocr-onnxruntime is not installed (pip install -e '.[bench]')")
    with tempfile.TemporaryDirectory(prefix="onnxopt-ocr-") as tmp:
        payload = measure(args.calib, args.eval, Path(tmp))
    write_report(Path(args.out), payload, render)


if __name__ == "__main__":
    main()
