"""The sensitivity table's SQNR summed one sample at a time (this code) vs joined outputs (the code of ``--before``).

Each probe of the per-layer sensitivity table (``onnxopt/passes/quantize/sensitivity.py``) runs its model on every
sample and compares the graph's output and its layer's output with the FP32 reference. The code before joined
each probe's outputs over the samples and took the SQNR of the joined arrays, converting both to float64 (on the
PaddleOCR v4 detector, a 640x640 map per sample); this code sums each sample's signal and noise as it comes
(float32 differences, float64 sums, the reference's signal once per tensor), holds no probe output past its
sample, and joins nothing. The figures are the same to float rounding; the time and the memory are not.

For each model: the table with this code's ``layer_sensitivity`` and with ``--before``'s (its ``sensitivity.py``
read from git and loaded beside this code's; everything else shared), alternated, the fastest of ``--rounds``
runs each; then one more run of each under ``tracemalloc`` for the peak of what Python and numpy allocate (not
ONNX Runtime's own memory), untimed. The same models and samples as ``benchmarks/sensitivity_levels.py``.

Usage: nice -n 5 python benchmarks/sensitivity_sums.py --before REF [--rounds 3] [--out reports/sensitivity_sums.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_files import write_report  # noqa: E402 - beside this script
from search_checks import report_header, run_facts  # noqa: E402
from sensitivity_levels import SAMPLES, compare, difference_cells, each_case  # noqa: E402

THIS, BEFORE = "this code", "before"


def code_before(ref: str, folder: Path) -> Callable[..., list[Any]]:
    """``layer_sensitivity`` of ``ref``'s ``sensitivity.py``, loaded as a module of its own."""
    source = subprocess.run(["git", "show", f"{ref}:onnxopt/passes/quantize/sensitivity.py"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
    path = folder / "sensitivity_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sensitivity_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.layer_sensitivity


def traced_peak_mb(function: Callable[..., list[Any]], prepared: dict[str, Any]) -> float:
    """Peak MB that Python and numpy allocate while ``function`` makes the table (tracemalloc; untimed)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        function(prepared["proto"], prepared["layers"], prepared["ranges"], prepared["quantize_weight"],
                 prepared["feeds"], None, False, False)
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def measure(before: str, rounds: int) -> list[dict[str, Any]]:
    from onnxopt.passes.quantize.sensitivity import layer_sensitivity

    with tempfile.TemporaryDirectory(prefix="onnxopt-sensitivity-sums-") as tmp:
        functions = {THIS: layer_sensitivity, BEFORE: code_before(before, Path(tmp))}
        return each_case(lambda prepared: {
            **compare(prepared, {THIS: {}, BEFORE: {}}, rounds, functions),
            "peak_mb": {way: traced_peak_mb(function, prepared) for way, function in functions.items()}})


def render(payload: dict[str, Any]) -> str:
    lines = [
        *report_header("Sensitivity table: SQNR summed one sample at a time vs joined outputs", "sensitivity_sums.py",
                       payload),
        f"Each model: the table of every Conv/Gemm/MatMul layer on {SAMPLES} samples with both versions of "
        f"`layer_sensitivity`, alternated, the fastest of {payload['rounds']} runs each (every run's time is in the "
        "JSON). Peak: the most Python and numpy held during one more, untimed run of each (tracemalloc; ONNX "
        "Runtime's own memory is not traced). Differences: largest change of a layer's output SQNR and layer SQNR; "
        "Spearman correlation of the two orders (1 = the same order); whether the 10 most sensitive layers are the "
        "same set; whether the whole order is the same.", "",
        "| model | layers | this code | before | time saved | peak, this code / before | max diff, output SQNR "
        "| max diff, layer SQNR | Spearman | top 10 same | same order |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        new, old = r["seconds"][THIS], r["seconds"][BEFORE]
        peak = r["peak_mb"]
        lines.append(f"| {r['model']} | {r['layers']} | {new:.2f} s | {old:.2f} s | {1 - new / old:.0%} | "
                     f"{peak[THIS]:.0f} / {peak[BEFORE]:.0f} MB | " + difference_cells(r))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, metavar="REF", help="git ref of the code to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "reports" / "sensitivity_sums.md"))
    args = parser.parse_args()
    rows = measure(args.before, args.rounds)
    write_report(Path(args.out), {"before": args.before, "rounds": args.rounds, "rows": rows, **run_facts()}, render)


if __name__ == "__main__":
    main()
