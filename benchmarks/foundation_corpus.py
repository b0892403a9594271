"""Run `onnxopt optimize` (default recipe: normalize + validation + benchmark) over the foundation corpus.

Corpus: the Caffe2-era models the `onnx` package ships (backend/test/data/light), the PaddlePaddle OCR models that
`rapidocr-onnxruntime` ships, torch exports of the example architectures (legacy exporter, opsets 11/13/17), and the
embedded example model. For each: did it produce a checker-valid, ORT-loadable model; size, node count and latency
before/after (measured round-robin in one run by `onnxopt.bench`); fidelity against the input.

Usage: python benchmarks/foundation_corpus.py [--out reports/foundation.md] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnxopt  # noqa: E402
from onnxopt.bench import BenchConfig, benchmark  # noqa: E402
from onnxopt.errors import OnnxoptError  # noqa: E402
from onnxopt.hostinfo import host_info  # noqa: E402
from onnxopt.modelio import load_model  # noqa: E402


def corpus(workdir: Path) -> list[tuple[str, Path, dict]]:
    """(label, path, optimize kwargs) for every corpus model available on this machine."""
    items: list[tuple[str, Path, dict]] = []
    light = Path(onnx.__file__).parent / "backend/test/data/light"
    for path in sorted(light.glob("*.onnx")):
        items.append((f"caffe2/{path.stem}", path, {}))
    try:
        import rapidocr_onnxruntime

        models = Path(rapidocr_onnxruntime.__file__).parent / "models"
        import numpy as np

        from onnxopt.datasets import render_textlines

        x, y = render_textlines(400, seed=0)  # real labelled text lines: accuracy before/after, not just fidelity
        np.savez(workdir / "textlines.npz", x=x, y=y)
        items.append(("paddle/ppocr_cls", models / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
                      {"input_shapes": {"x": (1, 3, 48, 192)}, "eval": workdir / "textlines.npz"}))
        items.append(("paddle/ppocrv4_det", models / "ch_PP-OCRv4_det_infer.onnx",
                      {"input_shapes": {"x": (1, 3, 320, 320)}}))
        items.append(("paddle/ppocrv4_rec", models / "ch_PP-OCRv4_rec_infer.onnx",
                      {"input_shapes": {"x": (1, 3, 48, 320)}}))
    except ImportError:
        print("rapidocr-onnxruntime not installed: Paddle models skipped", file=sys.stderr)
    items += torch_exports(workdir)
    from onnxopt import examples

    items.append(("example/digits_cnn", examples.default_model_path(),
                  {"calib": examples.default_calib_path(), "eval": examples.default_eval_path()}))
    return items


def torch_exports(workdir: Path) -> list[tuple[str, Path, dict]]:
    """The example zoo's nets (seeded, untrained), exported with opsets 11, 13 and 17 in turn, BatchNorm kept."""
    try:
        from onnxopt.zoo import nets
    except ImportError as exc:
        print(f"torch exports skipped: {exc}", file=sys.stderr)
        return []
    items = []
    for index, name in enumerate(sorted(nets.NETS)):
        opset = (11, 13, 17)[index % 3]
        path = workdir / f"{name}_op{opset}.onnx"
        nets.export_onnx(nets.build(name, seed=0), path, opset=opset)
        items.append((f"torch/{name}_op{opset}", path, {}))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "reports" / "foundation.md"))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for label, path, kwargs in corpus(workdir):
            out = workdir / (label.replace("/", "_") + ".opt.onnx")
            start = time.perf_counter()
            row = {"label": label, "source": path.name}
            try:
                result = onnxopt.optimize(path, output=out, measure_latency=False, **kwargs)
                steps = result.report.to_dict()["steps"]
                shapes = kwargs.get("input_shapes") or {}
                bench = benchmark([load_model(path), load_model(out)], BenchConfig(
                    batch_sizes=(1,), threads=(1,), warmup=5, repeats=args.repeats, input_shapes=shapes),
                    labels=["input", "output"])
                before, after = (bench.results[0], bench.results[1])
                fidelity = steps[-1]["fidelity_vs_original"]
                row.update(
                    status="ok", valid=_valid(out), size_in=steps[0]["metrics"]["size_bytes"],
                    size_out=steps[-1]["metrics"]["size_bytes"], nodes_in=steps[0]["metrics"]["num_nodes"],
                    nodes_out=steps[-1]["metrics"]["num_nodes"], latency_in=before.median_ms,
                    latency_out=after.median_ms, speedup=before.median_ms / after.median_ms,
                    max_rel_error=fidelity["max_rel_error"], top1=fidelity["top1_agreement"],
                    accuracy_in=steps[0]["metrics"]["accuracy"], accuracy_out=steps[-1]["metrics"]["accuracy"],
                    synthetic=result.report.data["eval"]["synthetic"], notes=steps[-1]["notes"],
                )
            except OnnxoptError as exc:
                row.update(status="refused", reason=str(exc))
            except Exception as exc:  # noqa: BLE001 - a crash is what this sweep exists to find
                failures += 1
                row.update(status="CRASH", reason=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
    Path(args.out).write_text(render(rows))
    Path(args.out).with_suffix(".json").write_text(json.dumps({"host": host_info().to_dict(), "rows": rows},
                                                              indent=2, default=str) + "\n")
    sys.exit(1 if failures else 0)


def _valid(path: Path) -> bool:
    onnx.checker.check_model(str(path))
    import onnxruntime as ort

    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return True


def render(rows: list[dict]) -> str:
    info = host_info().to_dict()
    flags = ", ".join(k for k, v in info["flags"].items() if v)
    lines = [
        "# Foundation corpus: `onnxopt optimize` with the default recipe", "",
        "Generated by `python benchmarks/foundation_corpus.py`. Default recipe = `normalize` (Constant weights lifted, "
        "initializers removed from inputs, opset >= 13, BatchNormalization folded, onnxsim, shapes fixed), with the "
        "checker, an ORT load and a numerical comparison after the pass. Latency: ONNX Runtime CPU, batch 1, 1 thread, "
        "input and output interleaved round-robin in one run (`onnxopt.bench`). Fidelity is measured on the "
        "evaluation data (random inputs where the model has none: a structural check).", "",
        f"Host: {info['cpu_model']}, {info['logical_cores']} logical cores, flags: {flags}; "
        f"onnxruntime {info['onnxruntime_version']}.", "",
        "| model | status | valid | size in -> out (KB) | nodes in -> out | latency in -> out (ms) | speed-up | "
        "max rel err | top-1 agree | accuracy in -> out | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']}: {r['reason'][:160]} | | | | | | | | | {r['wall_s']:.1f} |")
            continue
        acc = (f"{r['accuracy_in']:.2%} -> {r['accuracy_out']:.2%}" if r["accuracy_in"] is not None else "n/a (no labels)")
        top1 = "n/a" if r["top1"] is None else f"{r['top1']:.0%}"
        rel = r["max_rel_error"] if isinstance(r["max_rel_error"], str) else f"{r['max_rel_error']:.1e}"
        lines.append(
            f"| {r['label']} | ok | {'yes' if r['valid'] else 'NO'} | {r['size_in'] / 1e3:.0f} -> {r['size_out'] / 1e3:.0f} "
            f"| {r['nodes_in']} -> {r['nodes_out']} | {r['latency_in']:.3f} -> {r['latency_out']:.3f} | "
            f"{r['speedup']:.2f}x | {rel} | {top1} | {acc} | {r['wall_s']:.1f} |")
    ok = sum(r["status"] == "ok" for r in rows)
    lines += ["", f"{ok}/{len(rows)} models optimized to valid models; "
              f"{sum(r['status'] == 'refused' for r in rows)} refused with a message; "
              f"{sum(r['status'] == 'CRASH' for r in rows)} crashes.", "", "## What normalize did", ""]
    for r in rows:
        if r.get("notes"):
            lines.append(f"- **{r['label']}**: " + "; ".join(r["notes"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
