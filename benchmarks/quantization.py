"""Preliminary int8 benchmark (issue 3 is still open): onnxopt's quantize pass vs ONNX Runtime's quantize_static.

For each model: FP32 (normalized), onnxopt `quantize` (minmax and mse ranges, per-channel QDQ), ORT `quantize_static`
with its defaults on the model as exported, and ORT `quantize_static` with per-channel on onnxopt's normalized model.
Accuracy on labelled data, top-1 agreement with FP32, size, quantization wall time, and latency ratios vs FP32 at
batch 1 with 1 and 2 threads, every variant interleaved round-robin in one `onnxopt.bench` run.

Usage: python benchmarks/quantization.py [--out reports/quantization.md] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnxopt  # noqa: E402
from onnxopt.bench import BenchConfig, benchmark  # noqa: E402
from onnxopt.calib_data import open_data  # noqa: E402
from onnxopt.fidelity import top1  # noqa: E402
from onnxopt.hostinfo import host_info  # noqa: E402
from onnxopt.modelio import input_specs, load_model  # noqa: E402
from onnxopt.passes import NormalizePass  # noqa: E402
from onnxopt.pipeline import registry  # noqa: E402
from onnxopt.runtime import make_session  # noqa: E402


def cases(workdir: Path) -> list[dict]:
    from onnxopt import examples

    items = [{"name": "example digits_cnn (MobileNetV2-style)", "model": examples.default_model_path(),
              "calib": examples.default_calib_path(), "eval": examples.default_eval_path(), "shapes": {}}]
    try:
        import rapidocr_onnxruntime

        from onnxopt.datasets import render_textlines

        model = Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
        x, y = render_textlines(400, seed=0)
        np.savez(workdir / "text_eval.npz", x=x, y=y)
        cx, cy = render_textlines(200, seed=1)
        np.savez(workdir / "text_calib.npz", x=cx, y=cy)
        items.append({"name": "Paddle ch_ppocr_mobile_v2.0_cls", "model": model, "calib": workdir / "text_calib.npz",
                      "eval": workdir / "text_eval.npz", "shapes": {"x": (1, 3, 48, 192)}})
    except ImportError:
        print("rapidocr-onnxruntime not installed: Paddle model skipped", file=sys.stderr)
    return items


def accuracy(path: Path, eval_path: Path, reference: np.ndarray | None) -> tuple[float, float | None, np.ndarray]:
    model = load_model(path)
    session = make_session(model, threads=1)
    preds, labels = [], []
    for batch in open_data(eval_path).iter_batches(input_specs(model), batch_size=1):
        preds.append(top1(session.run(None, batch.inputs)[0]))
        labels.append(batch.labels)
    pred, label = np.concatenate(preds), np.concatenate(labels)
    agree = float(np.mean(pred == reference)) if reference is not None else None
    return float(np.mean(pred == label)), agree, pred


def ort_quantize(source: Path, out: Path, calib: Path, shapes: dict, per_channel: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    model = load_model(source)
    specs = input_specs(model)
    if shapes:
        specs = [type(s)(s.name, tuple(shapes.get(s.name, s.shape)), s.dtype) for s in specs]
    batches = [b.inputs for b in open_data(calib).iter_batches(specs, batch_size=1)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self):  # noqa: ANN202
            return next(self.items, None)

    quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    reduce_range=host_info().has_avx2 and not host_info().has_vnni)


def run_case(case: dict, workdir: Path, repeats: int) -> dict:
    stem = workdir / case["name"].split()[0].lower().replace(" ", "_")
    fp32 = Path(f"{stem}_fp32.onnx")
    onnxopt.optimize(case["model"], [NormalizePass()], calib=case["calib"], input_shapes=case["shapes"], output=fp32,
                     measure_latency=False)
    variants: dict[str, dict] = {"FP32 (normalized)": {"path": fp32, "seconds": 0.0}}
    for method in ("minmax", "mse"):
        out = Path(f"{stem}_onnxopt_{method}.onnx")
        start = time.perf_counter()
        onnxopt.optimize(case["model"], [NormalizePass(), registry.create("quantize", {"method": method})],
                         calib=case["calib"], input_shapes=case["shapes"], output=out, measure_latency=False)
        variants[f"onnxopt quantize ({method}, per-channel QDQ, placement auto)"] = {"path": out,
                                                                    "seconds": time.perf_counter() - start}
    for label, source, per_channel in (("ORT quantize_static defaults, raw export", case["model"], False),
                                       ("ORT quantize_static per-channel, on normalized", fp32, True)):
        out = Path(f"{stem}_ort_{'pc' if per_channel else 'default'}.onnx")
        start = time.perf_counter()
        try:
            ort_quantize(Path(source), out, case["calib"], case["shapes"], per_channel)
            variants[label] = {"path": out, "seconds": time.perf_counter() - start}
        except Exception as exc:  # noqa: BLE001 - a peer failing is a result
            variants[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    _, _, reference = accuracy(fp32, case["eval"], None)
    for item in variants.values():
        if "path" in item:
            try:
                item["accuracy"], item["agreement"], _ = accuracy(item["path"], case["eval"], reference)
                item["size"] = item["path"].stat().st_size
            except Exception as exc:  # noqa: BLE001
                item["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                del item["path"]
    runnable = [(label, item) for label, item in variants.items() if "path" in item]
    shapes = {k: v for k, v in case["shapes"].items()}
    for threads in (1, 2):
        report = benchmark([load_model(item["path"]) for _, item in runnable],
                           BenchConfig(batch_sizes=(1,), threads=(threads,), warmup=10, repeats=repeats,
                                       input_shapes=shapes), labels=[label for label, _ in runnable])
        base = report.results[0].median_ms
        for result in report.results:
            variants[result.label][f"speed_t{threads}"] = base / result.median_ms
            variants[result.label][f"ms_t{threads}"] = result.median_ms
    return {"name": case["name"], "variants": variants}


def render(rows: list[dict]) -> str:
    info = host_info()
    lines = ["# int8 quantization: preliminary benchmark (issue 3 open)", "",
             "Generated by `python benchmarks/quantization.py`. Speed = FP32 median latency / variant median latency "
             "(> 1 is faster), ONNX Runtime CPU, batch 1, all variants of a model interleaved round-robin in one run. "
             "Accuracy on labelled data: the example's 400 held-out digits; 400 rendered text lines for the Paddle "
             "model (200 other lines calibrate). Size ratio vs the normalized FP32 model.", "",
             f"Host: {info.describe()}.", ""]
    for row in rows:
        variants = row["variants"]
        fp32_size = variants["FP32 (normalized)"]["size"]
        lines += [f"## {row['name']}", "",
                  "| variant | accuracy | agreement with FP32 | size ratio | speed 1 thread | speed 2 threads | "
                  "quantization time |", "|---|---|---|---|---|---|---|"]
        for label, item in variants.items():
            if "error" in item:
                lines.append(f"| {label} | failed: {item['error']} | | | | | |")
                continue
            lines.append(f"| {label} | {item['accuracy']:.2%} | {item['agreement']:.2%} | "
                         f"{item['size'] / fp32_size:.3f} | {item.get('speed_t1', float('nan')):.2f}x | "
                         f"{item.get('speed_t2', float('nan')):.2f}x | {item['seconds']:.1f} s |")
        lines.append("")
    lines += ["onnxopt quantize with placement=auto times its int8 candidates against FP32 round-robin and keeps FP32 when no candidate is >= 2% faster (its row then shows the FP32 model). Not yet covered (issue 3): per-node placement search, sensitivity-driven mixed precision, CLE and bias "
              "correction, Neural Compressor's ONNX split and onnxsim's quantizer as peers, batch 8, peak memory.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "reports" / "quantization.md"))
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(Path(tmp)):
            row = run_case(case, Path(tmp), args.repeats)
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    Path(args.out).write_text(render(rows))
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"host": host_info().to_dict(), "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
