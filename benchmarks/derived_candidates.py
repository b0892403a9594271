"""Placement candidates derived from the QDQ model (float_nodes.keep_float) vs built by ORT's quantizer. One run.

The quantize pass with ``placement_search=full`` (every region candidate built) on the five digits nets and the
Paddle cls model, with ``derive_candidates`` on (used) and off (before), alternated, 3 runs each:

* the pass's wall time (fastest of 3; ``measure_latency=False``, so only the pass's own search is timed) and the
  search's time spent building candidates (from the pass's placement details);
* for every candidate, whether the derived model equals ORT's build: same op-type counts, and the largest absolute
  difference of their outputs on 16 calibration samples (0 = bit-identical).

Timings of the placement race itself are noisy on a shared machine, so the two settings may pick different winners;
the candidates they time are the same models.

Usage: nice -n 5 python benchmarks/derived_candidates.py [--out reports/derived_candidates.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report_files import write_report  # noqa: E402 - beside this script

NETS = ("example", "mobilenetv2", "shufflenetv2", "mnasnet", "resnet", "vgg", "paddle")
REPEATS = 3


def _case(name: str, workdir: Path) -> tuple[str, str, dict]:
    """(model path, calibration data path, input shapes)."""
    from onnxopt import examples, zoo

    if name != "paddle":
        calib = np.load(examples.default_calib_path())
        path = workdir / "digits200.npz"
        np.savez(path, input=calib["input"][:200], y=calib["y"][:200])
        model = examples.default_model_path() if name == "example" else zoo.model_path(name)
        return str(model), str(path), {}
    import rapidocr_onnxruntime

    from onnxopt.datasets import render_textlines

    x, y = render_textlines(200, seed=1)
    path = workdir / "text200.npz"
    np.savez(path, x=x, y=y)
    model = Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    return str(model), str(path), {"x": (1, 3, 48, 192)}


def _run(model: str, calib: str, shapes: dict, derive: bool) -> tuple[float, dict, dict]:
    """(pass seconds, placement details, label -> candidate model) of one quantize run."""
    import onnxopt
    from onnxopt.passes.quantize import placement

    seen: dict = {}
    original = placement.Trial.time

    def keep(self, candidates):  # noqa: ANN001, ANN202 - the candidates as timed (the chosen one is compacted later)
        seen.update({c.label: copy.deepcopy(c.model) for c in candidates if c.model is not None})
        return original(self, candidates)

    placement.Trial.time = keep
    try:
        result = onnxopt.optimize(model, ["normalize", {"name": "quantize", "placement_search": "full",
                                                        "derive_candidates": derive}],
                                  calib=calib, input_shapes=shapes, measure_latency=False)
    finally:
        placement.Trial.time = original
    step = result.report.to_dict()["steps"][-1]
    return step["wall_s"], step["details"]["placement"], seen


def _outputs(model, feeds: list[dict]) -> np.ndarray:  # noqa: ANN001
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def measure(name: str, workdir: Path) -> dict:
    model, calib, shapes = _case(name, workdir)
    data = np.load(calib)
    key = "x" if name == "paddle" else "input"
    feeds = [{key: data[key][i:i + 1]} for i in range(16)]
    _run(model, calib, shapes, True)  # warm-up: imports, first sessions
    runs: dict[bool, list[tuple[float, dict]]] = {True: [], False: []}
    models: dict[bool, dict] = {}
    for _ in range(REPEATS):
        for derive in (True, False):
            seconds, details, seen = _run(model, calib, shapes, derive)
            runs[derive].append((seconds, details))
            models[derive] = seen
    rows = []
    for label, derived in models[True].items():
        built = models[False].get(label)
        if built is None:
            rows.append({"label": label, "note": "not built with derive_candidates=false"})
            continue
        same_ops = Counter(n.op_type for n in derived.graph.node) == Counter(n.op_type for n in built.graph.node)
        diff = float(np.max(np.abs(_outputs(derived, feeds) - _outputs(built, feeds))))
        rows.append({"label": label, "derived": label in runs[True][-1][1].get("derived", []),
                     "same_op_counts": same_ops, "max_abs_diff": diff})
    out = {"net": name}
    for derive, tag in ((True, "derived"), (False, "built")):
        best = min(runs[derive], key=lambda r: r[0])
        out[tag] = {"seconds": best[0], "runs": [r[0] for r in runs[derive]],
                    "build_seconds": best[1]["seconds"]["build"], "measure_seconds": best[1]["seconds"]["measure"],
                    "chosen": best[1]["chosen"], "candidates": len(best[1]["candidates"])}
    out["candidates"] = rows
    return out


def render(payload: dict) -> str:
    lines = ["# Placement candidates derived from the QDQ model vs built by ORT's quantizer", "",
             f"Generated by `{payload['command']}` in {payload['seconds'] / 60:.1f} min. Do not edit by hand.", "",
             "The quantize pass with `placement_search=full` (every region candidate built: the worst case for the "
             "search), `derive_candidates` on (default) and off, alternated, " f"{REPEATS} runs each, fastest kept. "
             "*pass* = the quantize step's wall time (calibration, candidates, timing race, confirmations; the "
             "race's own length varies with the machine's load); *build* = the part spent building candidates. "
             "*identical* = derived candidates with the same op-type counts as ORT's build and bit-identical "
             "outputs on 16 calibration samples (largest absolute difference over all of them in brackets).", "",
             "| net | pass, derived | pass, ORT builds all | build, derived | build, ORT | candidates derived | "
             "identical | chosen (derived / built) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in payload["nets"]:
        d, b = row["derived"], row["built"]
        derived = [c for c in row["candidates"] if c.get("derived")]
        same = [c for c in derived if c["same_op_counts"] and c["max_abs_diff"] == 0.0]
        worst = max((c["max_abs_diff"] for c in derived), default=0.0)
        lines.append(f"| {row['net']} | {d['seconds']:.2f} s | {b['seconds']:.2f} s | {d['build_seconds']:.2f} s | "
                     f"{b['build_seconds']:.2f} s | {len(derived)} of {d['candidates']} | {len(same)} of "
                     f"{len(derived)} ({worst:.3g}) | {d['chosen']} / {b['chosen']} |")
    lines += ["", f"Host: {payload['host'].get('cpu_model')}; the full host record is in "
              "`reports/derived_candidates.json` (`host`).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "reports" / "derived_candidates.md"))
    parser.add_argument("--nets", default=",".join(NETS))
    args = parser.parse_args()
    from onnxopt.hostinfo import host_info

    start = time.time()
    nets = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.nets.split(","):
            nets.append(measure(name, Path(tmp)))
            print(json.dumps({k: v for k, v in nets[-1].items() if k != "candidates"}), flush=True)
    info = host_info()
    payload = {"nets": nets, "seconds": time.time() - start, "host": info.to_dict(),
               "command": "nice -n 5 python benchmarks/derived_candidates.py"}
    write_report(Path(args.out), payload, render)


if __name__ == "__main__":
    main()
