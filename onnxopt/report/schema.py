"""The run report: what every pass did to the model, measured, and the verdict against the budgets.

JSON schema (``schema_version`` 1), documented in docs/report-schema.md:

* ``schema``: "onnxopt.report", ``schema_version``: 1, ``onnxopt_version``
* ``input`` / ``output``: {path, sha256, size_bytes}
* ``host``: CPU model, instruction flags (avx2, avx512f, avx512_vnni, ...), cores, library versions, ``memory``
  ({thp_mode, malloc_hugepages}: transparent huge pages, onnxopt.hugepages)
* ``settings``: seed, threads, provider, input_shapes, latency batch size
* ``recipe``: {source, passes: [{pass, params}]}
* ``data``: {eval: {description, samples, labelled, synthetic}, calib: {...} or null}
* ``steps``: [StepRecord]: the first is "input" (the model as given); then one per pass, in order
* ``budgets``: [BudgetVerdict]; ``verdict``: {passed, summary}
* ``resources``: {wall_s, peak_rss_mb} of the whole run
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_NAME = "onnxopt.report"
SCHEMA_VERSION = 1


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    batch_size: int
    threads: int | None
    provider: str


@dataclass
class StepMetrics:
    size_bytes: int
    params: int
    macs: int
    num_nodes: int
    macs_by_op: dict[str, int] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    latency: Latency | None = None
    latency_note: str = ""
    #: Top-1 accuracy on the labelled evaluation data; None without labels.
    accuracy: float | None = None


@dataclass
class StepRecord:
    name: str
    params: dict[str, Any]
    status: str  # "ok" | "failed"
    wall_s: float
    metrics: StepMetrics | None
    fidelity_vs_previous: dict[str, Any] | None = None
    fidelity_vs_original: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class RunReport:
    input: dict[str, Any]
    host: dict[str, Any]
    settings: dict[str, Any]
    recipe: dict[str, Any]
    data: dict[str, Any]
    steps: list[StepRecord] = field(default_factory=list)
    budgets: list[dict[str, Any]] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=lambda: {"passed": True, "summary": ""})
    output: dict[str, Any] | None = None
    #: Input vs final model timed round-robin in one run (the latency budget's figure); None when not measured.
    latency_comparison: dict[str, Any] | None = None
    #: What the run cost: {wall_s, peak_rss_mb} (peak resident memory of the process so far, getrusage maxrss).
    resources: dict[str, Any] | None = None
    onnxopt_version: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.verdict.get("passed", False))

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        return _jsonable({"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, **body})


def _jsonable(value: Any) -> Any:
    """Replace non-finite floats by strings so the JSON is strict (RFC 8259) and numpy scalars by Python ones."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return value
