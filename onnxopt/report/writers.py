"""Render a :class:`RunReport` as JSON, Markdown and a PNG trajectory plot, each written atomically."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from onnxopt.modelio import atomic_write_bytes, atomic_write_text
from onnxopt.report.schema import RunReport


def write_reports(report: RunReport, json_path: str | Path | None = None, markdown_path: str | Path | None = None,
                  plot_path: str | Path | None = None) -> list[Path]:
    """Write whichever of the three files are asked for; returns the written paths."""
    written = []
    if json_path:
        written.append(atomic_write_text(json_path, render_json(report)))
    if plot_path:
        written.append(atomic_write_bytes(plot_path, render_plot(report)))
    if markdown_path:
        plot_name = Path(plot_path).name if plot_path and Path(plot_path).parent == Path(markdown_path).parent else None
        written.append(atomic_write_text(markdown_path, render_markdown(report, plot_name)))
    return written


def render_json(report: RunReport) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n"


def _memory_text(memory: dict[str, Any]) -> str:
    """"; transparent huge pages madvise, malloc on" (onnxopt.hugepages), or "" for a report without it."""
    if not memory.get("thp_mode"):
        return ""
    return (f"; transparent huge pages {memory['thp_mode']}, "
            f"malloc {'on' if memory.get('malloc_hugepages') else 'off'}")


def render_markdown(report: RunReport, plot_name: str | None = None) -> str:
    data = report.to_dict()
    lines = ["# onnxopt report", ""]
    source = data["input"].get("path", "in-memory model")
    lines.append(f"- input: `{source}`")
    if data.get("output"):
        lines.append(f"- output: `{data['output'].get('path')}`")
    host = data["host"]
    flags = ", ".join(k for k, v in (host.get("flags") or {}).items() if v) or "unknown"
    lines.append(f"- host: {host.get('cpu_model', '?')}, {host.get('logical_cores', '?')} logical cores; "
                 f"CPU flags: {flags}; onnxruntime {host.get('onnxruntime_version', '?')}"
                 + _memory_text(host.get("memory") or {}))
    settings = data["settings"]
    lines.append(f"- latency: ONNX Runtime {settings['provider']}, batch {settings['latency_batch_size']}, "
                 f"threads {settings['threads'] or 'default'}; seed {settings['seed']}")
    evaluation = data["data"]["eval"]
    if evaluation:
        flag = " (**synthetic**: structural check only)" if evaluation["synthetic"] else ""
        lines.append(f"- evaluation data: {evaluation['description']}{flag}")
    lines.append(f"- recipe ({data['recipe'].get('source', '?')}): "
                 + " -> ".join(p["pass"] for p in data["recipe"].get("passes", [])))
    lines += ["", "## Per-pass trajectory", "",
              "| step | size | params | MACs | latency median (p90) | speed-up | max rel err | SQNR dB | top-1 agree | accuracy | time |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    steps = data["steps"]
    base_latency = _latency(steps[0]) if steps else None
    for step in steps:
        metrics = step.get("metrics") or {}
        latency = _latency(step)
        fidelity = step.get("fidelity_vs_original") or {}
        lines.append("| " + " | ".join([
            step["name"],
            _bytes(metrics.get("size_bytes")),
            _count(metrics.get("params")),
            _count(metrics.get("macs")),
            f"{latency[0]:.3f} ms ({latency[1]:.3f})" if latency else "n/a",
            f"{base_latency[0] / latency[0]:.2f}x" if latency and base_latency else "n/a",
            _num(fidelity.get("max_rel_error"), "{:.2e}") if fidelity else "-",
            _num(fidelity.get("sqnr_db"), "{:.1f}") if fidelity else "-",
            _num(fidelity.get("top1_agreement"), "{:.2%}") if fidelity else "-",
            _num(metrics.get("accuracy"), "{:.2%}"),
            f"{step['wall_s']:.2f} s",
        ]) + " |")
    lines += ["", "Fidelity columns compare each step with the input model on the evaluation data. Per-step latencies "
              "are measured one model at a time; the comparison below times input and output round-robin in one run.",
              ""]
    comparison = data.get("latency_comparison")
    if comparison and "speedup" in comparison:
        lines += [f"**Input vs output, round-robin in one run** (batch {comparison['batch_size']}, "
                  f"{comparison['runs']} runs each): {comparison['input_median_ms']:.3f} ms -> "
                  f"{comparison['output_median_ms']:.3f} ms median, **{comparison['speedup']:.2f}x** "
                  f"(latency ratio {comparison['latency_ratio']:.3f}).", ""]
    elif comparison:
        lines += [f"Input vs output latency: {comparison.get('note', 'not measured')}.", ""]
    for step in steps:
        notes = list(step.get("notes") or [])
        if (step.get("metrics") or {}).get("latency_note"):
            notes.append(step["metrics"]["latency_note"])
        if notes:
            lines.append(f"**{step['name']}**" + (f" `{_params(step['params'])}`" if step.get("params") else ""))
            lines += [f"- {note}" for note in notes] + [""]
    lines += ["## Budgets", ""]
    if data["budgets"]:
        lines += ["| budget | limit | measured | verdict | note |", "|---|---|---|---|---|"]
        for verdict in data["budgets"]:
            sign = "<=" if verdict["direction"] == "max" else ">="
            lines.append(f"| {verdict['name']} | {sign} {verdict['limit']:g} | {_num(verdict['measured'], '{:.4g}')} "
                         f"| {'met' if verdict['passed'] else '**missed**'} | {verdict.get('note', '')} |")
        lines.append("")
    lines.append(f"**Verdict: {'PASS' if data['verdict']['passed'] else 'FAIL'}** - {data['verdict']['summary']}")
    if data.get("resources"):
        lines += ["", f"Run: {data['resources']['wall_s']:.1f} s wall time, peak memory "
                      f"{data['resources']['peak_rss_mb']:.0f} MB (process maximum resident set)."]
    if plot_name:
        lines += ["", f"![trajectory]({plot_name})"]
    return "\n".join(lines) + "\n"


def render_plot(report: RunReport) -> bytes:
    """Latency against accuracy (or top-1 agreement with the input when there are no labels), one point per step;
    model size on the x axis instead when latency was not measured (``--no-latency``), so the plot still shows
    what each pass traded.

    A bare :class:`matplotlib.figure.Figure` renders through Agg without pyplot: no backend is switched under a user
    who has pyplot open (a switch closes their figures)."""
    from matplotlib.figure import Figure

    data = report.to_dict()
    points, xlabel = trajectory_points(data)
    has_labels = any((s.get("metrics") or {}).get("accuracy") is not None for s in data["steps"])
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    if points:
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        ax.plot(xs, ys, "-o", color="tab:blue")
        for index, (name, x, y) in enumerate(points):
            ax.annotate(f"{index}:{name}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    else:
        ax.text(0.5, 0.5, "nothing measured to plot", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy" if has_labels else "top-1 agreement with input")
    ax.set_title("onnxopt: per-pass trajectory")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def trajectory_points(data: dict[str, Any]) -> tuple[list[tuple[str, float, float]], str]:
    """(step name, x, quality) per step of a report's dict, and the x axis label: latency when it was measured,
    else model size; quality = accuracy, else top-1 agreement with the input (1.0 for the input itself)."""
    by_latency = any(_latency(step) for step in data["steps"])
    points = []
    for step in data["steps"]:
        metrics = step.get("metrics") or {}
        latency = _latency(step)
        if by_latency:
            x = latency[0] if latency else None
        else:
            x = metrics["size_bytes"] / 1e6 if metrics.get("size_bytes") else None
        accuracy = metrics.get("accuracy")
        agreement = (step.get("fidelity_vs_original") or {}).get("top1_agreement")
        quality = accuracy if accuracy is not None else (agreement if agreement is not None else 1.0)
        if x:
            points.append((step["name"], x, quality))
    if by_latency:
        return points, f"ORT latency, median ms (batch {data['settings']['latency_batch_size']})"
    return points, "model size, MB (latency not measured)"


def _latency(step: dict[str, Any]) -> tuple[float, float] | None:
    latency = (step.get("metrics") or {}).get("latency")
    return (latency["median_ms"], latency["p90_ms"]) if latency else None


def _bytes(value: Any) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def _count(value: Any) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def _num(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return fmt.format(value)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
