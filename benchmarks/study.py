"""Assemble reports/study.md - the recommendations a user asks for - from the committed benchmark JSON reports.

Every figure in study.md is read from reports/distillation.json, pruning.json, quantization.json, end_to_end.json,
recovery_steps.json and small_data_recovery.json (produced by the benchmarks/ scripts of the same names); nothing is
typed in by hand.
A report that is missing, or whose layout this script does not recognize, is named in study.md as such and its
question is left open rather than answered from memory.

Usage: python benchmarks/study.py [--reports reports] [--out reports/study.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCES = {
    "distillation": "benchmarks/distillation.py",
    "pruning": "benchmarks/pruning.py",
    "quantization": "benchmarks/quantization.py",
    "end_to_end": "benchmarks/end_to_end.py",
    "recovery_steps": "benchmarks/recovery_steps.py",
    "small_data_recovery": "benchmarks/small_data_recovery.py",
}


def load(folder: Path, name: str) -> tuple[Any | None, str]:
    path = folder / f"{name}.json"
    if not path.is_file():
        return None, f"`reports/{name}.json` is missing (run `python {SOURCES[name]}`): this question stays open."
    try:
        return json.loads(path.read_text()), ""
    except ValueError as exc:
        return None, f"`reports/{name}.json` cannot be parsed ({exc}): this question stays open."


def records(data: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every dict in ``data`` with the path of keys leading to it (for layouts this script knows only loosely)."""
    if isinstance(data, dict):
        yield path, data
        for key, value in data.items():
            yield from records(value, f"{path}/{key}" if path else str(key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from records(value, f"{path}[{index}]")


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def pts(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f} pt"


# ------------------------------------------------------------------------------------------------------ sections
def section_quantization(data: Any) -> list[str]:
    """When int8 pays off: speed of int8 vs FP32 per model and CPU flags, from quantization.json and end_to_end."""
    host = data.get("host", {}) if isinstance(data, dict) else {}
    flags = ", ".join(k for k, v in (host.get("flags") or {}).items() if v) or "unknown"
    lines = [f"Measured on {host.get('cpu_model', '?')} ({host.get('logical_cores', '?')} cores; flags: {flags}).", ""]
    found = []
    for where, item in records(data):
        variants = item.get("variants") if isinstance(item.get("variants"), dict) else item.get("rows")
        if not isinstance(variants, dict):
            continue
        name = item.get("name") or item.get("model") or where
        for label, variant in variants.items():
            if not isinstance(variant, dict):
                continue
            speeds = variant.get("speed") if isinstance(variant.get("speed"), dict) else {}
            speed = _first_number({**variant, **speeds}, ("speed_t1", "b1_t1", "speedup_b1_t1", "speedup"))
            speed2 = _first_number({**variant, **speeds}, ("speed_t2", "b1_t2", "speedup_b1_t2"))
            if speed is None:
                continue
            found.append((name, label, speed, speed2, variant.get("accuracy"), variant.get("size")))
    if not found:
        return lines + ["`reports/quantization.json` has no per-variant speed figures this script recognizes; see "
                        "`reports/quantization.md`."]
    lines += ["| model | variant | speed vs FP32, 1 thread | 2 threads | accuracy |", "|---|---|---|---|---|"]
    for name, label, speed, speed2, accuracy, _ in found:
        lines.append(f"| {name} | {label} | {speed:.2f}x | {'n/a' if speed2 is None else f'{speed2:.2f}x'} "
                     f"| {pct(accuracy)} |")
    ours = [f for f in found if "onnxopt" in f[1].lower()]
    peers = [f for f in found if f[1].lower().startswith("ort ")]
    lines.append("")
    if ours:
        best = max(ours, key=lambda f: f[2])
        worst = min(ours, key=lambda f: f[2])
        lines.append(f"- onnxopt's int8 ran between {worst[2]:.2f}x ({worst[0]}) and {best[2]:.2f}x ({best[0]}) of "
                     "FP32 speed at batch 1, 1 thread, over all its variants; `placement auto` keeps FP32 where int8 "
                     "is "
                     "not faster (a ratio near 1.00x: int8 did not pay off on that model and this CPU), `placement "
                     "all` forces int8 everywhere and shows what that costs.")
    if peers:
        lines.append(f"- ORT's quantize_static variants ran {min(p[2] for p in peers):.2f}x-"
                     f"{max(p[2] for p in peers):.2f}x of FP32 speed in the same runs.")
    return lines


def section_end_to_end(data: Any) -> list[str]:
    rows = [r for r in data.get("rows", []) if "error" not in r]
    if not rows:
        return ["`reports/end_to_end.json` has no completed model."]
    host = data.get("host_line", "?")
    lines = [f"Measured on {host}; passes registered in that run: {', '.join(data.get('passes', []))}.", "",
             "| model | kept stage | speed-up b1 t1 / t2 | size ratio | accuracy (original -> kept) | "
             "3x faster + 8x smaller within 1 pt |", "|---|---|---|---|---|---|"]
    for row in rows:
        base = row["variants"]["original"]
        kept = row["variants"].get("optimize (kept)", {})
        lat = kept.get("latency", {})
        target = row.get("targets", {})
        lines.append(
            f"| {row['name']} | {row['optimize']['chosen']} | "
            f"{lat.get('b1_t1', {}).get('speedup', 0):.2f}x / {lat.get('b1_t2', {}).get('speedup', 0):.2f}x | "
            f"{kept.get('size_ratio') or 0:.2f}x | {pct(base.get('accuracy'))} -> {pct(kept.get('accuracy'))} | "
            + (f"yes ({target.get('latency_and_size_point')}) |" if target.get("latency_size_met") else "no |"))
    pending = sorted({p["stage"] for r in rows for p in r.get("pending", [])})
    if pending:
        lines += ["", f"Stages pending in that run (pass missing or failed): {', '.join(pending)}."]
    fp32 = [row["name"] for row in rows if "same model as" in row["variants"].get("quantize", {}).get("params", "")]
    if fp32:
        lines += ["", "On the pruned models the quantize pass kept FP32 (its timed int8 candidates were not faster, or "
                  "not accurate enough, on this CPU): " + ", ".join(fp32) + "."]
    return lines


# ---- distillation.json: {"meta", "info": {digits_teacher, paddle_teacher, ...}, "table": {pair: {method: {mean, std,
#      accuracies, errors}}}, "runs": [...]}
LOGIT_METHODS = ("kd", "dkd", "dist", "ofa")
FEATURE_METHODS = ("fitnet", "fsp", "at")
IDEAS = {
    "dkd": "decouple the target-class and non-target-class parts of KD (DKD)",
    "dist": "match the teacher's class correlations instead of its exact probabilities (DIST), for strong teachers",
    "ofa": "project student features into logit space through small heads (OFA-style), so no feature shapes "
           "must match",
    "fitnet": "feature hints through learned 1x1 adapters with automatic layer matching by spatial resolution",
    "fsp": "flow-of-solution-procedure matrices between matched layers (FSP)",
    "at": "attention maps of matched layers (attention transfer)",
}


def _distill_table(data: Any) -> dict[str, dict[str, dict[str, Any]]]:
    table = data["table"]
    if not isinstance(table, dict) or not table:
        raise ValueError("no pairs in 'table'")
    return table


def _means(row: dict[str, Any]) -> dict[str, float]:
    return {m: c["mean"] for m, c in row.items() if isinstance(c, dict) and c.get("mean") is not None}


def section_distill_methods(data: Any) -> list[str]:
    table = _distill_table(data)
    methods = [m for m in ("none", *LOGIT_METHODS, *FEATURE_METHODS) if any(m in row for row in table.values())]
    seeds = {len(c.get("accuracies", [])) for row in table.values() for c in row.values() if isinstance(c, dict)}
    lines = [f"Test accuracy of the student (mean ± std over {max(seeds) if seeds else '?'} seeds; `none` = the same "
             "student trained without a teacher on the same budget).", "",
             "| pair | " + " | ".join(methods) + " | best | best - none |", "|---|" + "---|" * (len(methods) + 2)]
    recommendations = []
    for pair, row in table.items():
        means = _means(row)
        cells = []
        for m in methods:
            cell = row.get(m)
            cells.append("n/a" if not cell or cell.get("mean") is None
                         else f"{100 * cell['mean']:.1f} ± {100 * (cell.get('std') or 0):.1f}")
        best = max((m for m in means if m != "none"), key=lambda m: means[m], default=None)
        gain = means[best] - means["none"] if best and "none" in means else None
        lines.append(f"| {pair} | " + " | ".join(cells) + f" | {best or 'n/a'} | {pts(gain)} |")
        logit = [m for m in LOGIT_METHODS if m in means]
        if logit:
            top = max(logit, key=lambda m: means[m])
            recommendations.append(f"- **{pair}**: use `{top}` ({100 * means[top]:.1f}%"
                                   + (f", {pts(means[top] - means['none'])} over no teacher" if "none" in means
                                      else "") + ")"
                                   + (f"; the best of all methods was `{best}` ({100 * means[best]:.1f}%)"
                                      if best and best != top else "") + ".")
    overall = {}
    for m in (*LOGIT_METHODS, *FEATURE_METHODS):
        gains = [_means(row)[m] - _means(row)["none"] for row in table.values() if m in _means(row)
                 and "none" in _means(row)]
        if gains:
            overall[m] = (statistics.fmean(gains), sum(g > 0 for g in gains), len(gains))
    lines += ["", "Recommendation per pair (the best logit-based loss, the safe default for unrelated architectures):",
              ""] + recommendations
    unstable = [f"`{m}` on {pair} (± {100 * c['std']:.1f})" for pair, row in table.items() for m, c in row.items()
                if isinstance(c, dict) and (c.get("std") or 0) > 0.05]
    if unstable:
        lines += ["", "Unstable across seeds (standard deviation above 5 points), so not a default however good its "
                  "best seed: " + "; ".join(unstable) + "."]
    if overall:
        ranked = sorted(overall.items(), key=lambda kv: -kv[1][0])
        lines += ["", "Mean gain over the no-teacher baseline across pairs (pairs where it helps / pairs run): "
                  + "; ".join(f"`{m}` {pts(g)} ({k}/{n})" for m, (g, k, n) in ranked) + "."]
    return lines


def section_distill_architectures(data: Any) -> list[str]:
    table = _distill_table(data)
    info = data.get("info", {})
    lines = ["| pair | teacher | no teacher | best student | gap to teacher | teacher's gain |",
             "|---|---|---|---|---|---|"]
    ranking = []
    for pair, row in table.items():
        teacher = (info.get("paddle_teacher") if "paddle" in pair.lower() else info.get("digits_teacher")) or {}
        t_acc = teacher.get("test_accuracy")
        means = _means(row)
        best = max((m for m in means if m != "none"), key=lambda m: means[m], default=None)
        if best is None:
            continue
        gain = means[best] - means["none"] if "none" in means else None
        gap = t_acc - means[best] if t_acc is not None else None
        ranking.append((pair, gain, gap))
        lines.append(f"| {pair} | {pct(t_acc)} | {pct(means.get('none'))} | {pct(means[best])} ({best}) | "
                     f"{pts(gap)} | {pts(gain)} |")
    with_gain = [r for r in ranking if r[1] is not None]
    if with_gain:
        easy = max(with_gain, key=lambda r: r[1])
        hard = min(with_gain, key=lambda r: r[1])
        lines += ["", f"- The teacher helped most on **{easy[0]}** ({pts(easy[1])} over training alone) and least "
                  f"on **{hard[0]}** ({pts(hard[1])})."]
    with_gap = [r for r in ranking if r[2] is not None]
    if with_gap:
        closest = min(with_gap, key=lambda r: r[2])
        farthest = max(with_gap, key=lambda r: r[2])
        lines.append(f"- Closest to its teacher: **{closest[0]}** (gap {pts(closest[2])}); farthest: "
                     f"**{farthest[0]}** (gap {pts(farthest[2])}). A small gap with a small gain means the student "
                     "learns the task alone; a large gap that distillation narrows is where the teacher matters.")
    return lines


def section_distill_ideas(data: Any) -> list[str]:
    table = _distill_table(data)
    lines = ["Each idea below was run on every pair of the distillation benchmark (same students, data and budget); "
             "its effect is the measured accuracy minus plain KD and minus no teacher, averaged over the pairs.", "",
             "| idea | method | vs KD | vs no teacher | pairs above no teacher |", "|---|---|---|---|---|"]
    tried = 0
    for method, idea in IDEAS.items():
        vs_kd, vs_none = [], []
        for row in table.values():
            means = _means(row)
            if method not in means:
                continue
            if "kd" in means:
                vs_kd.append(means[method] - means["kd"])
            if "none" in means:
                vs_none.append(means[method] - means["none"])
        if not vs_kd and not vs_none:
            lines.append(f"| {idea} | `{method}` | not run | not run | - |")
            continue
        tried += 1
        lines.append(f"| {idea} | `{method}` | {pts(statistics.fmean(vs_kd)) if vs_kd else 'n/a'} | "
                     f"{pts(statistics.fmean(vs_none)) if vs_none else 'n/a'} | "
                     f"{sum(v > 0 for v in vs_none)}/{len(vs_none)} |")
    if tried == 0:
        return [f"None of the ideas ({', '.join(IDEAS)}) appears in `reports/distillation.json`; this stays open."]
    return lines


# ---- pruning.json: {"host", "args", "results": [{"model", "rows": [{variant, method, target (fraction of MACs
#      removed), macs, accuracy, accuracy_distilled?, speedup, macs_ratio}], "notes"}]}
def section_pruning(data: Any) -> list[str]:
    results = [r for r in data["results"] if r.get("rows")]
    if not results:
        return ["`reports/pruning.json` holds no measured model."]
    lines = ["Accuracy right after cutting a fraction of the MACs by channels (onnxopt prune, per criterion, no "
             "recovery); speed-up measured by ORT, batch 1, 1 thread.", "",
             "| model | criterion | MACs cut | speed-up | accuracy (original) | pruned |", "|---|---|---|---|---|---|"]
    for result in results:
        rows = result["rows"]
        base = rows[0].get("accuracy")
        for row in (r for r in rows if str(r.get("method", "")).startswith("onnxopt")):
            speed = f"{row['speedup']:.2f}x" if row.get("speedup") is not None else "n/a"
            lines.append(f"| {result['model']} | {row['method'].removeprefix('onnxopt-')} | {row['target']:.0%} | "
                         f"{speed} | {pct(base)} | {pct(row.get('accuracy'))} |")
    recovered = [t for t in data.get("targets", []) if t.get("accuracy_recovered") is not None]
    if not recovered:
        return lines + ["", "No recovery was measured, so how far pruning can go after recovery stays open."]
    lines += ["", "After recovery by distillation from the original (the `--recovery-only` runs: pruned with "
              "BatchNorm kept at >= 2x fewer MACs, by channels and, with `+depthD`, whole blocks first):", "",
              "| model | method | epochs | MACs ratio | speed-up | original | pruned | recovered |",
              "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for model in dict.fromkeys(t["model"] for t in recovered):
        rows = [t for t in recovered if t["model"] == model]
        for t in rows:
            lines.append(f"| {model} | {t['method']} | {t['epochs']} | {t['macs_ratio']:.2f}x | "
                         f"{t['speedup_pruned']:.2f}x | {pct(t['accuracy_original'])} | {pct(t['accuracy_pruned'])} | "
                         f"{pct(t['accuracy_recovered'])} |")
        held = [t for t in rows if t["accuracy_recovered"] >= t["accuracy_original"] - 0.01]
        short = [t for t in rows if t["accuracy_recovered"] < t["accuracy_original"] - 0.01]
        text = f"- **{model}**: "
        if held:
            deepest = max(held, key=lambda t: t["macs_ratio"])
            fastest = max(held, key=lambda t: t["speedup_pruned"])
            text += (f"deepest cut recovered within 1 point: {deepest['macs_ratio']:.2f}x fewer MACs "
                     f"({deepest['method']}, {pct(deepest['accuracy_recovered'])}); fastest within 1 point: "
                     f"{fastest['speedup_pruned']:.2f}x ({fastest['method']})")
        else:
            text += "no measured cut recovered to within 1 point of the original"
        if short:
            worst = min(short, key=lambda t: t["macs_ratio"])
            text += (f"; recovery fell short at {worst['macs_ratio']:.2f}x with {worst['method']} "
                     f"({pct(worst['accuracy_recovered'])} vs {pct(worst['accuracy_original'])})")
        verdicts.append(text + ".")
    return lines + ["", "How far it went:", ""] + verdicts + _per_criterion(data)


def section_recovery_steps(data: Any) -> list[str]:
    """Deep cuts: test accuracy after distillation with more or fewer optimizer steps (recovery_steps.json)."""
    rows = data["rows"]
    lines = ["Deep cuts recovered by KD from the original with different step budgets (last epoch kept; test "
             "accuracy on held-out data):", "", "| model | MACs cut | steps | test accuracy | original |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['cut']:.1%} | {r['steps']} | {pct(r['test_accuracy'])} | "
              f"{pct(r['original_accuracy'])} |" for r in rows]
    verdicts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["steps"])
        first, last = mine[0], mine[-1]
        if len(mine) > 1:
            verdicts.append(f"- **{model}**: {first['steps']} -> {last['steps']} steps moved test accuracy "
                            f"{pct(first['test_accuracy'])} -> {pct(last['test_accuracy'])} "
                            f"(original {pct(last['original_accuracy'])}).")
    return lines + [""] + verdicts


def section_small_data(data: Any) -> list[str]:
    """Recovery with little data: augmentation during distillation (small_data_recovery.json)."""
    rows = data["rows"]
    what = data.get("what", "the model and cut named in `reports/small_data_recovery.md`")
    lines = [f"A cut recovered from only a few hundred training samples ({what}), with and without input "
             "augmentation during KD (the teacher labels the augmented inputs):", "",
             "| augmentation | training samples | steps | test accuracy | after pruning | original |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['augment']} | {r['train_lines']} | {r['steps']} | {pct(r['test_accuracy'])} | "
              f"{pct(r['pruned_accuracy'])} | {pct(r['original_accuracy'])} |" for r in rows]
    plain = next((r for r in rows if r["augment"] in ("none", "")), None)
    best = max(rows, key=lambda r: r["test_accuracy"])
    if plain is not None and best is not plain:
        gap = best["original_accuracy"] - best["test_accuracy"]
        lines += ["", f"Augmentation ({best['augment']}) lifted recovery from {pct(plain['test_accuracy'])} to "
                  f"{pct(best['test_accuracy'])}; " + ("still " + pts(gap) + " below the original, so with this "
                                                       "little data a cut this deep is not worth keeping: give "
                                                       "distillation more (unlabelled) samples, or cut less."
                                                       if gap > 0.01 else "within a point of the original.")]
    return lines


def _per_criterion(data: Any) -> list[str]:
    """Recovered accuracy minus the original's at each MACs cut, per criterion (channels only), from the recovery
    rows that carry a ``target`` (``--recovery-targets`` runs): how far each criterion can go."""
    cells: dict[tuple[str, str, int, int], dict[float, dict[str, Any]]] = {}
    for model, rec in data.get("recovery", {}).items():
        for row in rec.get("rows", []):
            method = str(row.get("method", ""))
            if method.startswith("onnxopt-") and "+" not in method:
                key = (model, method.removeprefix("onnxopt-"), row.get("epochs", 0), row.get("train_samples", 0))
                cells.setdefault(key, {})[float(row.get("target", 0.5))] = row
    cuts = sorted({c for by_cut in cells.values() for c in by_cut})
    keys = [k for k in cells if len(cells[k]) == len(cuts)]
    if len(cuts) < 2 or not keys:
        return []
    lines = ["", "Per criterion, channels only: recovered accuracy minus the original's, in points, at each "
             "MACs cut (epochs, training samples as listed):", "",
             "| model | criterion | epochs (samples) | " + " | ".join(f"-{c:.0%} MACs" for c in cuts) +
             " | deepest cut within 1 point |", "|---|---|---|" + "---|" * (len(cuts) + 1)]
    for key in keys:
        rows = cells[key]
        deltas = {c: (rows[c]["accuracy_recovered"] - rows[c]["accuracy_original"]) * 100 for c in cuts}
        held = [c for c in cuts if deltas[c] >= -1.0 - 1e-6]  # exactly 1 point lower is within 1 point
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} ({key[3]}) | "
                     + " | ".join(f"{deltas[c]:+.2f}" for c in cuts)
                     + f" | {f'-{max(held):.0%}' if held else 'none'} |")
    return lines


def section_generic(data: Any, name: str, keys: tuple[str, ...]) -> list[str]:
    """Fallback for a layout this script does not know: list the records that carry ``keys``."""
    rows = [(where, item) for where, item in records(data) if all(k in item for k in keys)]
    if not rows:
        return [f"`reports/{name}.json` is present but its layout is not one this script recognizes; "
                f"see `reports/{name}.md`."]
    lines = ["| record | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for where, item in rows[:40]:
        lines.append(f"| {where} | " + " | ".join(str(item[k]) for k in keys) + " |")
    return lines


def _first_number(item: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = item.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


SECTIONS: list[tuple[str, str, Callable[[Any], list[str]]]] = [
    ("Which distillation method for which teacher/student pair", "distillation", section_distill_methods),
    ("From which architectures distillation is easy or hard", "distillation", section_distill_architectures),
    ("When int8 pays off, on which CPU features", "quantization", section_quantization),
    ("How far pruning can go before recovery fails", "pruning", section_pruning),
    ("How long recovery must run after a deep cut", "recovery_steps", section_recovery_steps),
    ("Recovery from little data", "small_data_recovery", section_small_data),
    ("Ideas to make distillation between different architectures easier, each tried", "distillation",
     section_distill_ideas),
    ("End to end: what optimize reaches on each model", "end_to_end", section_end_to_end),
]


def render(folder: Path) -> str:
    lines = ["# Study: recommendations from the measured reports", "",
             "Generated by `python benchmarks/study.py` from the JSON reports committed under `reports/`; every "
             "figure below is read from them (the script invents none). Where a report is missing or was not "
             "recognized, the question is marked open.", ""]
    cache: dict[str, tuple[Any, str]] = {}
    for title, name, build in SECTIONS:
        if name not in cache:
            cache[name] = load(folder, name)
        data, problem = cache[name]
        lines += [f"## {title}", "", f"Source: `reports/{name}.json` ({SOURCES[name]}).", ""]
        if data is None:
            lines += [problem, ""]
            continue
        try:
            lines += build(data) + [""]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            lines += [f"`reports/{name}.json` did not have the fields this section reads ({type(exc).__name__}: "
                      f"{exc}); see `reports/{name}.md`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", default=str(REPO / "reports"))
    parser.add_argument("--out", default=str(REPO / "reports" / "study.md"))
    args = parser.parse_args()
    text = render(Path(args.reports))
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
