"""ONNX Runtime latency benchmark whose ratios between models come from one interleaved run.

Timing model A for a minute and then model B lets frequency scaling, thermal state and noisy neighbours drift in
between, and the ratio absorbs that drift. Here every setting (batch size x thread count) runs the models
round-robin: one timed run of each model per round (the start model rotates each round), all fed the same seeded
random inputs, so slow phases of the machine hit every model alike. The sessions of such a run do not spin between
runs (ORT's intra-op threads otherwise spin on the cores the next model needs: ``benchmarks/spinning.py``).

``import onnxopt.bench`` stays cheap: onnxruntime, onnx and the statistics are imported when a benchmark runs.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import numpy as np

from onnxopt.errors import BadInputError
from onnxopt.hostinfo import HostInfo, host_info

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from onnxopt.modelio import InputSpec
    from onnxopt.stats import ModelStats

ModelInput = Union[str, "os.PathLike[str]", "onnx.ModelProto", "ir.Model"]

BENCH_SCHEMA = "onnxopt.bench"
BENCH_SCHEMA_VERSION = 1
# Integer inputs (token ids, indices) get values in [0, _INT_HIGH): valid for any vocabulary or axis of that size.
_INT_HIGH = 8


@dataclass
class BenchConfig:
    """What to measure. ``threads`` of None means ONNX Runtime's default (all cores)."""

    batch_sizes: tuple[int, ...] = (1,)
    threads: tuple[int | None, ...] = (1,)
    warmup: int = 10
    repeats: int = 50
    #: Keep adding rounds after ``repeats`` until every model has been timed for at least this long.
    min_time_s: float | None = None
    provider: str = "cpu"
    #: Full shapes of inputs with dynamic dims other than the leading batch dim (whose size is the batch size).
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    #: ORT graph optimization level: disable, basic, extended, all.
    optimization: str = "all"
    #: Intra-op threads spin between runs: None (auto) only when one model is timed; True/False force it
    #: (interleaved spinning sessions slow each other down: benchmarks/spinning.py).
    spinning: bool | None = None

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(self.batch_sizes)
        self.threads = tuple(self.threads)
        self.input_shapes = {name: tuple(int(d) for d in dims) for name, dims in (self.input_shapes or {}).items()}
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise BadInputError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if not self.threads or any(t is not None and int(t) < 1 for t in self.threads):
            raise BadInputError(f"thread counts must be positive integers (or None), got {list(self.threads)}")
        if self.warmup < 0 or self.repeats < 1:
            raise BadInputError(f"warmup must be >= 0 and repeats >= 1, got warmup={self.warmup} "
                                f"repeats={self.repeats}")
        if self.min_time_s is not None and not self.min_time_s >= 0:
            raise BadInputError(f"min_time_s must be >= 0, got {self.min_time_s}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["batch_sizes"] = list(self.batch_sizes)
        data["threads"] = list(self.threads)
        data["input_shapes"] = {name: list(dims) for name, dims in self.input_shapes.items()}
        return data


@dataclass
class LatencyResult:
    """One model at one batch size and thread count; times are per batch, throughput is samples/s at the median."""

    label: str
    batch_size: int
    threads: int | None
    provider: str
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    throughput: float

    @classmethod
    def from_times(cls, label: str, batch_size: int, threads: int | None, provider: str,
                   times_ns: Sequence[int]) -> LatencyResult:
        ms = np.asarray(times_ns, dtype=np.float64) / 1e6
        median = float(np.median(ms))
        return cls(label, batch_size, threads, provider, median_ms=median, p90_ms=float(np.percentile(ms, 90)),
                   mean_ms=float(ms.mean()), min_ms=float(ms.min()), runs=int(ms.size),
                   throughput=batch_size * 1000.0 / median if median > 0 else float("inf"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Skipped(NamedTuple):
    """A model that was not measured at a batch size, and why: a ``(label, batch_size, reason)`` tuple."""

    label: str
    batch_size: int
    reason: str


@dataclass
class BenchReport:
    """Results of :func:`benchmark`.

    ``to_dict()`` JSON schema (``schema_version`` 1)::

        {
          "schema": "onnxopt.bench", "schema_version": 1,
          "host": HostInfo.to_dict() (cpu_model, machine, logical_cores, usable_cores, flags{name: bool|null},
                  os, python, onnxruntime_version, onnx_version, onnx_ir_version, numpy_version, ort_providers),
          "config": {batch_sizes, threads (null = ORT default), warmup, repeats, min_time_s, provider,
                     input_shapes{name: [dims]}, seed, optimization},
          "models": [label, ...]                      (in the order given; the first is the reference),
          "results": [{label, batch_size, threads, provider, median_ms, p90_ms, mean_ms, min_ms, runs,
                       throughput (samples/s at the median),
                       speedup_vs_first (first model's median / this median at the same batch and threads,
                                         null when the first model was not measured there)}],
          "stats": {label: {size_bytes, params, num_nodes, op_counts, macs, macs_by_op, macs_unknown_nodes,
                            input_shapes, batch_size}}   (static, MACs per sample at batch 1),
          "skipped": [{label, batch_size, reason}]
        }
    """

    host: HostInfo
    config: BenchConfig
    results: list[LatencyResult] = field(default_factory=list)
    stats: dict[str, ModelStats] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def result(self, label: str, batch_size: int, threads: int | None) -> LatencyResult | None:
        for item in self.results:
            if item.label == label and item.batch_size == batch_size and item.threads == threads:
                return item
        return None

    def ratio(self, a_label: str, b_label: str, batch_size: int | None = None,
              threads: int | None | str = "first") -> float:
        """Median latency of ``a`` over that of ``b`` (< 1: ``a`` is faster), at one batch size and thread count.

        Defaults: the first batch size and thread count of the config. Raises KeyError if either was not measured.
        """
        batch = self.config.batch_sizes[0] if batch_size is None else batch_size
        count = self.config.threads[0] if threads == "first" else threads
        a, b = self.result(a_label, batch, count), self.result(b_label, batch, count)  # type: ignore[arg-type]
        if a is None or b is None:
            missing = a_label if a is None else b_label
            raise KeyError(f"'{missing}' was not measured at batch {batch}, threads {_threads_text(count)}")
        return a.median_ms / b.median_ms

    def speedup_vs_first(self, item: LatencyResult) -> float | None:
        if not self.labels:
            return None
        first = self.result(self.labels[0], item.batch_size, item.threads)
        return first.median_ms / item.median_ms if first is not None and item.median_ms > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": BENCH_SCHEMA,
            "schema_version": BENCH_SCHEMA_VERSION,
            "host": self.host.to_dict(),
            "config": self.config.to_dict(),
            "models": list(self.labels),
            "results": [{**item.to_dict(), "speedup_vs_first": self.speedup_vs_first(item)} for item in self.results],
            "stats": {label: stats.to_dict() for label, stats in self.stats.items()},
            "skipped": [item._asdict() for item in self.skipped],
        }

    def format_table(self) -> str:
        """Latency table, static table, host line: for people, not for parsing (use ``to_dict``)."""
        from onnxopt.stats import format_count

        config = self.config
        reference = self.labels[0] if self.labels else "?"
        lines = [f"host: {self.host.describe()}",
                 f"settings: provider {config.provider}, threads {', '.join(_threads_text(t) for t in config.threads)}"
                 f" (intra-op; inter-op 1, sequential), optimization '{config.optimization}', warmup {config.warmup},"
                 f" repeats {config.repeats}" + (f", min time {config.min_time_s:g} s" if config.min_time_s else "")
                 + ", models interleaved round-robin", ""]
        header = ["model", "batch", "threads", "median ms", "p90 ms", "samples/s", "speed-up"]
        rows = []
        for item in self.results:
            speedup = self.speedup_vs_first(item)
            rows.append([item.label, str(item.batch_size), _threads_text(item.threads), f"{item.median_ms:.3f}",
                         f"{item.p90_ms:.3f}", f"{item.throughput:,.1f}",
                         "n/a" if speedup is None else f"{speedup:.2f}x"])
        lines += _table(header, rows) if rows else ["(nothing measured)"]
        if rows:
            lines.append(f"speed-up: median latency of {reference} / that of the row, same batch and threads")
        if self.stats:
            lines.append("")
            static_rows = []
            for label, stats in self.stats.items():
                macs = format_count(stats.macs) + (" (partial)" if stats.macs_unknown_nodes else "")
                static_rows.append([label, f"{stats.size_bytes / 1e6:.3f}", format_count(stats.params), macs,
                                    str(stats.num_nodes)])
            lines += _table(["model", "size MB", "params", "MACs/sample", "nodes"], static_rows)
        for item in self.skipped:
            lines.append(f"skipped {item.label} at batch {item.batch_size}: {item.reason}")
        return "\n".join(lines)


def _threads_text(threads: int | None) -> str:
    return "default" if threads is None else str(threads)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    return [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]


# ------------------------------------------------------------------------------------------------------ the runner
@dataclass
class _Bench:
    """One model in a (batch, threads) setting."""

    label: str
    session: ort.InferenceSession
    feeds: dict[str, np.ndarray]
    times_ns: list[int] = field(default_factory=list)
    failure: str | None = None


class _SkipSetting(Exception):
    """The model cannot run at this batch size (a fixed batch dim)."""


def benchmark(
    models: Sequence[ModelInput],
    config: BenchConfig | None = None,
    labels: Sequence[str] | None = None,
    progress: bool = False,
) -> BenchReport:
    """Measure every model at every (batch size, threads) of ``config``, models interleaved round-robin.

    Inputs are random (seeded by ``config.seed``), the same arrays for every model with the same input; their shapes
    come from each model's inputs with the leading dynamic dim set to the batch size and other dynamic dims taken
    from ``config.input_shapes``. A model whose batch dim is fixed (or that fails at a batch size above 1) is
    listed in ``skipped`` for that batch size; a dynamic dim with no size given is a :class:`BadInputError`.
    """
    from onnxopt import runtime
    from onnxopt.modelio import as_ir_model
    from onnxopt.stats import model_stats

    config = config or BenchConfig()
    if not models:
        raise BadInputError("no models to benchmark")
    names = _labels(models, labels)
    runtime.resolve_provider(config.provider)  # fail before loading anything
    loaded = [as_ir_model(m) for m in models]
    report = BenchReport(host=host_info(), config=config, labels=names)
    for label, model in zip(names, loaded):
        report.stats[label] = model_stats(model, input_shapes=config.input_shapes, batch_size=1)
    sources = [m if isinstance(m, (str, os.PathLike)) else model for m, model in zip(models, loaded)]
    results: dict[tuple[int, int | None, str], LatencyResult] = {}
    skipped: dict[tuple[str, int], str] = {}
    for threads in config.threads:
        # interleaved sessions must not spin between runs (runtime.session_options); one model alone may
        spinning = len(sources) == 1 if config.spinning is None else config.spinning
        sessions = [runtime.make_session(source, threads=threads, provider=config.provider,
                                         optimization=config.optimization, what=f"model '{label}'",
                                         spinning=spinning)
                    for label, source in zip(names, sources)]
        for batch in config.batch_sizes:
            inputs = _InputFactory(config.seed, batch)
            runners = []
            for label, model, session in zip(names, loaded, sessions):
                try:
                    feeds = inputs.feeds(_specs(model), batch, config.input_shapes, label)
                except _SkipSetting as exc:
                    skipped.setdefault((label, batch), str(exc))
                    continue
                runners.append(_Bench(label, session, feeds))
            _run_interleaved(runners, config, batch, threads, progress)
            for runner in runners:
                if runner.failure is not None:
                    skipped.setdefault((runner.label, batch), runner.failure)
                else:
                    results[(batch, threads, runner.label)] = LatencyResult.from_times(
                        runner.label, batch, threads, config.provider, runner.times_ns)
    # Rows grouped by setting, models in the order given.
    for batch in config.batch_sizes:
        for threads in config.threads:
            report.results += [results[key] for key in ((batch, threads, label) for label in names) if key in results]
    report.skipped = [Skipped(label, batch, reason) for (label, batch), reason in skipped.items()]
    return report


def measure_latency(
    model: ModelInput,
    batch_size: int = 1,
    threads: int | None = None,
    *,
    provider: str = "cpu",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    warmup: int = 3,
    repeats: int = 20,
    seed: int = 0,
    label: str = "model",
    optimization: str = "all",
) -> LatencyResult:
    """Latency of one model at one batch size: cheap defaults, for measuring after every pass.

    Raises :class:`BadInputError` when the model cannot run at ``batch_size`` or an input size is missing.
    """
    from onnxopt import runtime
    from onnxopt.modelio import as_ir_model

    config = BenchConfig(batch_sizes=(batch_size,), threads=(threads,), warmup=warmup, repeats=repeats,
                         provider=provider, input_shapes=dict(input_shapes or {}), seed=seed,
                         optimization=optimization)
    ir_model = as_ir_model(model)
    source = model if isinstance(model, (str, os.PathLike)) else ir_model
    try:
        feeds = _InputFactory(seed, batch_size).feeds(_specs(ir_model), batch_size, config.input_shapes, label)
    except _SkipSetting as exc:
        raise BadInputError(f"{label}: {exc}") from None
    session = runtime.make_session(source, threads=threads, provider=provider, optimization=optimization,
                                   what=f"{label}")
    runner = _Bench(label, session, feeds)
    _run_interleaved([runner], config, batch_size, threads, progress=False)
    if runner.failure is not None:
        raise BadInputError(f"{label}: {runner.failure}")
    return LatencyResult.from_times(label, batch_size, threads, provider, runner.times_ns)


def _run_interleaved(runners: list[_Bench], config: BenchConfig, batch: int, threads: int | None,
                     progress: bool) -> None:
    """Warm each model up, then rounds of one timed run per model (rotating the start) until done."""
    active = list(runners)
    for runner in runners:
        for _ in range(config.warmup):
            if not _run(runner, batch, timed=False):
                active.remove(runner)
                break
    bar = _progress_bar(progress, config, batch, threads)
    min_ns = int((config.min_time_s or 0) * 1e9)
    rounds = 0
    try:
        while active and (rounds < config.repeats or min(sum(r.times_ns) for r in active) < min_ns):
            start = rounds % len(active)
            for runner in active[start:] + active[:start]:
                if not _run(runner, batch, timed=True):
                    active.remove(runner)
            rounds += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _run(runner: _Bench, batch: int, *, timed: bool) -> bool:
    """One inference; False (with ``runner.failure`` set) if ORT refused it at a batch size above 1."""
    start = time.perf_counter_ns()
    try:
        runner.session.run(None, runner.feeds)
    except Exception as exc:  # noqa: BLE001 - ORT raises several types; all mean "this model cannot run this"
        message = f"ONNX Runtime failed to run it at batch {batch}: {_first_line(exc)}"
        if batch == 1:
            raise BadInputError(f"model '{runner.label}': {message}") from None
        runner.failure = message
        return False
    if timed:
        runner.times_ns.append(time.perf_counter_ns() - start)
    return True


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:400] if lines else type(exc).__name__


def _progress_bar(progress: bool, config: BenchConfig, batch: int, threads: int | None):  # noqa: ANN202
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=config.repeats, desc=f"batch {batch}, threads {_threads_text(threads)}", unit="round",
                leave=False)


# ------------------------------------------------------------------------------------------------------ the inputs
def _specs(model: ir.Model) -> list[InputSpec]:
    from onnxopt.modelio import input_specs

    return input_specs(model)


class _InputFactory:
    """Seeded random arrays, cached by (name, shape, dtype) so models with the same input get the same data."""

    def __init__(self, seed: int, batch: int):
        self.seed = seed
        self.batch = batch
        self._cache: dict[tuple[str, tuple[int, ...], str], np.ndarray] = {}

    def feeds(self, specs: Sequence[InputSpec], batch: int, input_shapes: Mapping[str, Sequence[int]],
              label: str) -> dict[str, np.ndarray]:
        batched = any(_dynamic(spec.shape[0]) for spec in specs if spec.shape)
        feeds = {}
        for spec in specs:
            shape = feed_shape(spec, batch, input_shapes, label, batched=batched)
            feeds[spec.name] = self.array(spec.name, shape, spec.dtype)
        return feeds

    def array(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        key = (name, shape, str(dtype))
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, self.batch, zlib.crc32(name.encode())])
            self._cache[key] = random_array(rng, shape, dtype, name)
        return self._cache[key]


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, name: str = "input") -> np.ndarray:
    """Standard normal floats, small non-negative integers, random booleans."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, _INT_HIGH, shape).astype(dtype)
    if dtype.kind == "f" or dtype.name in ("bfloat16",) or dtype.name.startswith("float8"):
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)
    raise BadInputError(f"input '{name}' has type {dtype}, which the benchmark cannot generate random data for")


def _dynamic(dim: int | str | None) -> bool:
    return not (isinstance(dim, int) and dim > 0)


def feed_shape(spec: InputSpec, batch: int, input_shapes: Mapping[str, Sequence[int]], label: str = "model",
               *, batched: bool = True) -> tuple[int, ...]:
    """The shape to feed ``spec`` at ``batch``: static dims kept, dynamic leading dim = batch, others from hints.

    Raises ``_SkipSetting`` when the batch dim is fixed to another size, :class:`BadInputError` when a dynamic dim
    has no size or ``input_shapes`` contradicts a static dim. ``batched`` is False when no input of the model has a
    dynamic leading dim: then a fixed leading dim is the batch and must equal ``batch``.
    """
    hint = input_shapes.get(spec.name)
    if not spec.shape:
        if hint is not None:  # unknown rank: the user's shape is all there is
            return tuple(int(d) for d in hint)
        return ()
    if hint is not None and len(hint) != len(spec.shape):
        raise BadInputError(f"model '{label}': input '{spec.name}' has {len(spec.shape)} dims "
                            f"{_dims_text(spec.shape)}, but the given input shape {tuple(hint)} has {len(hint)}")
    dims = []
    for axis, dim in enumerate(spec.shape):
        if not _dynamic(dim):
            if axis == 0 and not batched and dim != batch:
                raise _SkipSetting(f"the batch dim of input '{spec.name}' is fixed to {dim} "
                                   f"(shape {_dims_text(spec.shape)})")
            if axis > 0 and hint is not None and int(hint[axis]) != dim:
                raise BadInputError(f"model '{label}': input '{spec.name}' has shape {_dims_text(spec.shape)}, "
                                    f"which contradicts the given input shape {tuple(hint)} in dim {axis}")
            dims.append(int(dim))  # type: ignore[arg-type]
        elif axis == 0:
            dims.append(batch)
        elif hint is not None:
            dims.append(int(hint[axis]))
        else:
            name = f" ('{dim}')" if isinstance(dim, str) and dim.strip("?") else ""
            raise BadInputError(
                f"model '{label}': input '{spec.name}' {_dims_text(spec.shape)} has dynamic dim {axis}{name}; "
                f"give its size with --input-shape {spec.name}:{','.join(_example_dims(spec.shape, batch))}")
    return tuple(dims)


def _dims_text(shape: Sequence[int | str | None]) -> str:
    return "[" + ",".join(str(d) if isinstance(d, str) or not _dynamic(d) else "?" for d in shape) + "]"


def _example_dims(shape: Sequence[int | str | None], batch: int) -> list[str]:
    return [str(batch) if axis == 0 and _dynamic(d) else (str(d) if not _dynamic(d) else "N")
            for axis, d in enumerate(shape)]


def _labels(models: Sequence[ModelInput], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        names = [str(label) for label in labels]
        if len(names) != len(models):
            raise BadInputError(f"{len(names)} labels given for {len(models)} models")
        if len(set(names)) != len(names):
            raise BadInputError(f"labels must be unique, got {names}")
        return names
    names = []
    for index, model in enumerate(models):
        if isinstance(model, (str, os.PathLike)):
            name = Path(model).name
        else:
            graph = getattr(model, "graph", None)
            name = getattr(graph, "name", "") or f"model{index}"
        names.append(name)
    if len(set(names)) != len(names):
        names = [f"{index}:{name}" for index, name in enumerate(names)]
    return names


__all__ = ["BenchConfig", "BenchReport", "LatencyResult", "Skipped", "benchmark", "feed_shape", "measure_latency",
           "random_array"]
