"""An accuracy budget's search checks the all-int8 model before it makes the sensitivity table (this code vs before).

With ``--budget accuracy_drop=X`` the quantize pass keeps the most sensitive layers FP32 until the budget holds.
The table that ranks them quantizes one layer at a time over every evaluation sample; when the all-int8 model
already meets the budget it ranks nothing, yet it was made first, always. For each model: ``normalize`` +
``quantize`` with ``accuracy_drop=0.005`` judged on the labelled calibration data (as the accuracy-budget row of
``benchmarks/quantization.py``), with this commit's code and with ``--before REF``'s (a temporary git worktree first
on ``PYTHONPATH``), each in its own process, the versions taking turns going first, ``--rounds`` times each.
Reported: wall time of ``optimize`` (imports excluded), whether a table was made, the budget search's trials
(layers kept FP32 and the drop) and the layers it kept FP32, which must be the same for both versions.

Models: the Paddle text-orientation classifier (fixed batch 1, 200 rendered labelled lines: the table's probes run
one sample at a time) and the digits example (200 labelled calibration images).

Usage: nice -n 5 python benchmarks/budget_table.py --before REF [--rounds 2] [--out reports/budget_table.md]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_files import write_report  # noqa: E402 - beside this script
from search_checks import report_header, run_facts, side_by_side, side_by_side_parser  # noqa: E402

BUDGET = 0.005


def _cases(workdir: Path) -> list[dict[str, Any]]:
    from onnxopt import examples

    recipe = ["normalize", {"name": "quantize", "accuracy_drop": BUDGET}]
    digits = np.load(examples.default_calib_path())
    np.savez(workdir / "example.npz", **{key: digits[key][:200] for key in digits.files})
    cases = [{"key": "example", "title": "example digits_cnn (200 labelled calibration images)",
              "model": str(examples.default_model_path()), "calib": str(workdir / "example.npz"),
              "eval": str(workdir / "example.npz"), "shapes": {}, "recipe": recipe}]
    try:
        import rapidocr_onnxruntime
    except ImportError:
        print("rapidocr-onnxruntime not installed: Paddle model left out", file=sys.stderr)
        return cases
    from onnxopt.datasets import render_textlines

    x, y = render_textlines(200, seed=1)
    np.savez(workdir / "text.npz", x=x, y=y)
    model = Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    return [{"key": "paddle", "title": "Paddle ch_ppocr_mobile_v2.0_cls (200 rendered labelled lines, batch 1)",
             "model": str(model), "calib": str(workdir / "text.npz"), "eval": str(workdir / "text.npz"),
             "shapes": {"x": [1, 3, 48, 192]}, "recipe": recipe}] + cases


def _summary(out: dict[str, Any]) -> dict[str, Any]:
    details = out["details"]
    mixed = details.get("mixed_precision", {})
    return {"seconds": out["seconds"], "table": "sensitivity" in details,
            "trials": [[t["fp32_layers"], round(t["drop"], 6)] for t in mixed.get("trials", [])],
            "fp32_layers": mixed.get("fp32_layers"), "chosen": out["placement"].get("chosen")}


def render(payload: dict[str, Any]) -> str:
    lines = [
        *report_header("Accuracy budget: the all-int8 model checked before the sensitivity table", "budget_table.py",
                       payload),
        f"Each model: `normalize` + `quantize` with `accuracy_drop={payload['budget']}` on labelled calibration data, "
        f"each version in its own process, in turns, {payload['rounds']} runs each. Wall time: the fastest run (all "
        "runs in brackets). Table: whether the sensitivity table was made. Trials: the budget search's (layers kept "
        "FP32, accuracy drop). Same: the trials and the layers kept FP32 are the code before's, in every run.", "",
        "| model | code | wall time | table | trials | layers kept FP32 | same as before |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        labels = list(row["runs"])
        reference = row["runs"][labels[-1]][0]
        for label in labels:
            runs = row["runs"][label]
            best = min(runs, key=lambda r: r["seconds"])
            same = all(r["trials"] == reference["trials"] and r["fp32_layers"] == reference["fp32_layers"]
                       for r in runs)
            trials = ", ".join(f"{k}: {drop:+.4f}" for k, drop in best["trials"])
            all_runs = ", ".join(f"{r['seconds']:.1f}" for r in runs)
            lines.append(f"| {row['model']} | {label} | {best['seconds']:.1f} s ({all_runs}) | "
                         f"{'made' if best['table'] else 'not made'} | {trials} | {len(best['fp32_layers'] or [])} | "
                         f"{'yes' if same else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = side_by_side_parser(__doc__, "budget_table.md").parse_args()
    rows = side_by_side(_cases, args.before, args.rounds, _summary)
    write_report(Path(args.out), {"before": args.before, "rounds": args.rounds, "budget": BUDGET, "rows": rows,
                                  **run_facts()}, render)


if __name__ == "__main__":
    main()
