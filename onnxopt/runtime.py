"""ONNX Runtime sessions built from in-memory models, with errors that say what went wrong."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.errors import BadInputError
from onnxopt.modelio import (EXTERNAL_DATA_THRESHOLD, has_external_tensors, model_file, proto_file, proto_tensor_bytes,
                             tensor_bytes, to_proto)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def resolve_provider(name: str) -> str:
    """Map 'cpu'/'cuda'/'tensorrt' (or a full provider name) to an installed ORT provider, or explain."""
    provider = PROVIDER_ALIASES.get(name.lower(), name)
    available = ort.get_available_providers()
    if provider not in available:
        raise BadInputError(
            f"execution provider '{name}' is not available in this onnxruntime build (available: {', '.join(available)})"
        )
    return provider


#: ORT prepacks MatMul/Gemm weights into its kernels' layout when it creates a session, which pays back only after
#: some hundreds of samples: on the 2.4 GB MLP of ``benchmarks/large_model.py`` ("ORT weight prepacking") it took
#: 2.2 s, a batch-16 run took 130 ms packed and about 265 ms unpacked (even after ~17 runs, 270 samples), a batch-1
#: run no consistently different time. A session that will run at most ``FEW_SAMPLES`` samples of a model with at
#: least ``PREPACK_SKIP_BYTES`` of weights is created without it: calibration and the pipeline's evaluation runs,
#: never the timed sessions (placement, benchmarks), which must run as deployed.
PREPACK_SKIP_BYTES = 256 * 2**20
FEW_SAMPLES = 256


def session_options(threads: int | None = None, optimization: str = "all", prepack: bool = True,
                    spinning: bool = True) -> ort.SessionOptions:
    """``spinning=False``: the intra-op threads sleep as soon as a run ends instead of spinning for the next one.
    A model timed alone keeps ORT's default (spinning), as it runs in deployment; sessions timed interleaved with
    other sessions of the same process turn it off (:func:`onnxopt.bench.benchmark`, the placement search): with
    several sessions spinning, copies of one model file timed round-robin on 2 threads read several times apart
    (``benchmarks/spinning.py`` -> reports/spinning.md)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = _LEVELS[optimization]
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def worth_prepacking(model: ir.Model | onnx.ModelProto | bytes | str | os.PathLike[str], samples: int | None,
                     weight_bytes: int | None = None) -> bool:
    """False for a session that will run at most ``FEW_SAMPLES`` samples (``samples``: None when not known) of a
    model with at least ``PREPACK_SKIP_BYTES`` of weights in memory (``weight_bytes``: their size, when the caller
    knows it: a model given as a path is otherwise prepacked)."""
    if samples is None or samples > FEW_SAMPLES:
        return True
    if weight_bytes is not None:
        size = weight_bytes
    elif isinstance(model, bytes):
        size = len(model)
    elif isinstance(model, onnx.ModelProto):
        size = proto_tensor_bytes(model)
    elif isinstance(model, ir.Model):
        size = tensor_bytes(model)
    else:
        return True
    return size < PREPACK_SKIP_BYTES


def make_session(
    model: ir.Model | onnx.ModelProto | bytes | str | os.PathLike[str],
    *,
    threads: int | None = None,
    provider: str = "cpu",
    optimization: str = "all",
    what: str = "model",
    samples: int | None = None,
    weight_bytes: int | None = None,
    spinning: bool = True,
) -> ort.InferenceSession:
    """Create an ORT session (from a path, a proto, serialized bytes or an ir model); failures become
    :class:`BadInputError` naming ``what``. ``samples``: how many samples the session will run, when the caller
    knows (a few on a large model: no weight prepacking, :func:`worth_prepacking`; ``weight_bytes``: the model's
    weights, for a path). ``spinning``: see :func:`session_options`.

    Above the external-data threshold ORT gets a temporary file whose data it maps, reading only what it uses.
    Handing it the tensors from memory instead (``add_external_initializers``, which copies them) was tried on
    the 2.4 GB MLP: no faster, 1.8 GB more peak memory, and every byte of the sparse test model's 2 GiB of zeros
    read (over 4 GB resident in tests/test_reliability.py)."""
    providers = [resolve_provider(provider)]
    if providers[0] != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    options = session_options(threads, optimization, prepack=worth_prepacking(model, samples, weight_bytes),
                              spinning=spinning)
    try:
        if isinstance(model, (str, os.PathLike)):
            return ort.InferenceSession(str(model), options, providers=providers)
        if isinstance(model, bytes):  # a serialized model
            return ort.InferenceSession(model, options, providers=providers)
        if isinstance(model, onnx.ModelProto):
            if proto_tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD:  # one message cannot be serialized above 2 GB
                with proto_file(model) as path:
                    return ort.InferenceSession(str(path), options, providers=providers)
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        if tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD or has_external_tensors(model):
            with model_file(model) as path:
                return ort.InferenceSession(str(path), options, providers=providers)
        return ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=providers)
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(f"ONNX Runtime cannot load {what}: {_first_line(exc)}") from None


def make_full_session(model: onnx.ModelProto | str | os.PathLike[str], *, threads: int | None = None,
                      provider: str = "cpu", what: str = "model", samples: int | None = None,
                      weight_bytes: int | None = None) -> ort.InferenceSession:
    """:func:`make_session` at ORT's full optimization level, or at the basic one when an optimizer that ORT applies
    only at the full level fails on this graph."""
    common = {"threads": threads, "provider": provider, "what": what, "samples": samples, "weight_bytes": weight_bytes}
    try:
        return make_session(model, optimization="all", **common)
    except BadInputError:
        return make_session(model, optimization="basic", **common)


def run_batches(session: ort.InferenceSession, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[list[np.ndarray]]:
    """Run each feed dict; yields the list of outputs in graph order."""
    names = [o.name for o in session.get_outputs()]
    for feed in batches:
        yield session.run(names, feed)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:400]
    return type(exc).__name__


__all__ = ["FEW_SAMPLES", "PREPACK_SKIP_BYTES", "make_full_session", "make_session", "resolve_provider", "run_batches",
           "session_options", "worth_prepacking", "Path"]
