"""The search report: every candidate stage, the Pareto fronts (latency and size vs accuracy), as Markdown and PNG.

Input is :meth:`onnxopt.pipeline.search.SearchOutcome.to_dict` (schema ``onnxopt.search``). matplotlib (Agg) is
imported only when a plot is drawn.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from onnxopt.modelio import atomic_write_bytes, atomic_write_text


def write_pareto_reports(summary: dict[str, Any], stem: str | Path) -> list[Path]:
    """``STEM.pareto.json``, ``.md`` and ``.png``; returns the written paths."""
    stem = Path(stem)
    json_path = Path(f"{stem}.pareto.json")
    png_path = Path(f"{stem}.pareto.png")
    md_path = Path(f"{stem}.pareto.md")
    return [
        atomic_write_text(json_path, json.dumps(summary, indent=2) + "\n"),
        atomic_write_bytes(png_path, render_pareto_plot(summary)),
        atomic_write_text(md_path, render_pareto_markdown(summary, png_path.name)),
    ]


def render_pareto_markdown(summary: dict[str, Any], plot_name: str | None = None) -> str:
    points = summary["points"]
    base = points[0] if points else {}
    labelled = any(p.get("accuracy") is not None for p in points)
    quality = "accuracy" if labelled else "top-1 agreement"
    fronts = summary.get("pareto", {})
    lines = ["# onnxopt search: candidates and Pareto fronts", "",
             f"- target: **{summary['target']}**; kept **{summary['chosen']}**: {summary['reason']}",
             f"- candidates: {len(summary['candidates'])} recipe(s), {len(points) - 1} distinct stage model(s)"
             + (" (search over pass parameters)" if summary.get("search") else ""),
             f"- latency: {(summary.get('latency_measurement') or {}).get('method', 'not measured')}", ""]
    lines += ["| point | recipe | size | MACs | latency ms | speed-up | " + quality + " | budgets | front |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        speedup = (base["latency_ms"] / p["latency_ms"]) if base.get("latency_ms") and p.get("latency_ms") else None
        on = [name for name in ("latency", "size") if p["label"] in fronts.get(name, [])]
        label = f"**{p['label']}**" if p["label"] == summary["chosen"] else p["label"]
        lines.append("| " + " | ".join([
            label + (f" (= {', '.join(p['same_as'])})" if p.get("same_as") else ""),
            describe_recipe(p.get("recipe") or []),
            f"{p['size_bytes'] / 1e3:.1f} KB",
            f"{p['macs'] / 1e6:.2f}M" if p.get("macs") else "n/a",
            f"{p['latency_ms']:.3f}" if p.get("latency_ms") else "n/a",
            f"{speedup:.2f}x" if speedup else "n/a",
            f"{p['quality']:.2%}" if p.get("quality") is not None else "n/a",
            "met" if p["passed"] else "missed " + ", ".join(b["name"] for b in p["budgets"] if not b["passed"]),
            ", ".join(on) or "-",
        ]) + " |")
    lines += ["", "Front: no other point is both at least as fast (or small) and at least as accurate, and strictly "
              "better in one.", ""]
    for name in ("latency", "size"):
        lines.append(f"- {name} vs {quality} front: " + (" -> ".join(fronts.get(name, [])) or "n/a"))
    failed = [c for c in summary["candidates"] if c["status"] != "ok" or c.get("skipped")]
    if failed or summary.get("notes"):
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in summary.get("notes", [])]
    if plot_name:
        lines += ["", f"![pareto]({plot_name})"]
    return "\n".join(lines) + "\n"


def render_pareto_plot(summary: dict[str, Any]) -> bytes:
    """Two panels: latency vs quality and size vs quality; front points joined, the kept one circled (on a bare
    Figure, like ``writers.render_plot``: pyplot stays untouched)."""
    from matplotlib.figure import Figure

    points = summary["points"]
    labelled = any(p.get("accuracy") is not None for p in points)
    fronts = summary.get("pareto", {})
    fig = Figure(figsize=(10, 4), dpi=100)
    axes = fig.subplots(1, 2)
    for ax, (cost, xlabel, scale) in zip(axes, (("latency", "ORT latency, median ms (batch 1)", 1.0),
                                                ("size", "file size, KB", 1e-3))):
        key = "latency_ms" if cost == "latency" else "size_bytes"
        usable = [p for p in points if p.get(key) and p.get("quality") is not None]
        if not usable:
            ax.text(0.5, 0.5, f"{cost} not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        for p in usable:
            colour = "tab:green" if p["passed"] else "tab:red"
            ax.scatter(p[key] * scale, p["quality"], color=colour, s=25, zorder=3)
            ax.annotate(p["label"], (p[key] * scale, p["quality"]), textcoords="offset points", xytext=(3, 3),
                        fontsize=7)
        front = [p for p in usable if p["label"] in fronts.get(cost, [])]
        front.sort(key=lambda p: p[key])
        if front:
            ax.plot([p[key] * scale for p in front], [p["quality"] for p in front], "--", color="tab:blue",
                    label="Pareto front")
        drop = next((b["limit"] for b in summary.get("budgets", []) if b["name"] == "accuracy_drop"), None)
        if drop is not None and points and points[0].get("quality") is not None:
            ax.axhline(points[0]["quality"] - drop, color="tab:gray", linestyle=":", label="accuracy budget")
        chosen = [p for p in usable if p["label"] == summary["chosen"]]
        if chosen:
            ax.scatter([chosen[0][key] * scale], [chosen[0]["quality"]], s=160, facecolors="none",
                       edgecolors="black", label="kept", zorder=4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy" if labelled else "top-1 agreement with input")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"onnxopt search (target {summary['target']}; green: meets every budget)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def describe_recipe(recipe: list[dict[str, Any]]) -> str:
    """``normalize -> prune(ratio=0.5) -> quantize(method=mse)``: the searched parameters of a stage's recipe."""
    from onnxopt.pipeline.search import SEARCH_AXES

    searched = {param for _, param, _ in SEARCH_AXES}
    if not recipe:
        return "(input)"
    parts = []
    for item in recipe:
        shown = {k: v for k, v in (item.get("params") or {}).items() if k in searched}
        parts.append(item["pass"] + (f"({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else ""))
    return " -> ".join(parts)


__all__ = ["describe_recipe", "render_pareto_markdown", "render_pareto_plot", "write_pareto_reports"]
