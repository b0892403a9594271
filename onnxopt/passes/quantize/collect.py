"""Activation statistics for static quantization: which tensors need a range, and one streaming pass to gather them.

ONNX Runtime's quantizer needs a clipping range for every float tensor that enters or leaves a node it quantizes.
We expose those tensors as extra graph outputs, run the model over the calibration data once, and fold every batch
into our own :class:`Calibrator` (bounded memory, exact histograms) instead of ORT's calibrators, which keep every
batch's outputs and peak at over a GB on small models (see notes/measured.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import onnx

from onnxopt.calib_data.base import DataSource
from onnxopt.errors import DataError
from onnxopt.modelio import InputSpec, proto_tensor_bytes
from onnxopt.passes.quantize.calibrators import Calibrator
from onnxopt.runtime import make_full_session
from onnxopt.shared_weights import SharedWeights

_FLOAT = onnx.TensorProto.FLOAT
#: Batch size of the calibration runs: histogram statistics cost a numpy pass per tensor and batch, so fewer,
#: larger batches pay (batch 8 took 1.1-1.3x the time of 32 on the digits nets: reports/calibration_paths.md).
CALIB_BATCH = 32
#: Min-max runs of models whose exposed activations are large per sample go in smaller batches, down to
#: MIN_CALIB_BATCH, so that a batch's activations stay near this many bytes: MnasNet (1.9 MB per sample) and the
#: example (3.2 MB) calibrated in 0.8x the time at batch 8, while ShuffleNetV2 and VGG (0.4-0.6 MB) took up to
#: 1.6x the time there (reports/calibration_paths.md).
MINMAX_BATCH_BYTES = 16 << 20
MIN_CALIB_BATCH = 8


def tensors_to_calibrate(model: onnx.ModelProto, op_types: Iterable[str], exclude: Iterable[str] = (),
                         elem_types: Iterable[int] = (_FLOAT,)) -> list[str]:
    """Float32 activations (not weights; ``elem_types`` for others) read or written by nodes of ``op_types``, in
    graph order.

    ``model`` must carry inferred value_info (types of intermediate tensors), as ORT's quantizer requires too.
    """
    wanted, skipped, wanted_types = set(op_types), set(exclude), set(elem_types)
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.output, *graph.value_info]}
    names: dict[str, None] = {}
    for node in graph.node:
        if node.op_type not in wanted or node.name in skipped:
            continue
        for name in [*node.input, *node.output]:
            if name and name not in constants and types.get(name) in wanted_types:
                names[name] = None
    return list(names)


def nodes_reading_or_writing(model: onnx.ModelProto, tensors: Iterable[str], op_types: Iterable[str],
                             exclude: Iterable[str] = ()) -> list[str]:
    """Names of the nodes of ``op_types`` (not in ``exclude``) that read or write one of ``tensors``: those that
    must stay float when the tensors have no int8 range (they hold +-inf, or an attention mask's fill)."""
    wanted, skipped, names = set(op_types), set(exclude), set(tensors)
    return [node.name for node in model.graph.node
            if node.op_type in wanted and node.name and node.name not in skipped
            and any(name in names for name in [*node.input, *node.output])]


#: A Softmax input whose calibrated values span more than this holds an attention mask's fill (-1e4, -1e9, float32's
#: lowest): an int8 grid over that span leaves the real scores a step or two, while in float32 a logit 104 below its
#: row's maximum already contributes exactly 0, so unmasked scores never span this much.
SOFTMAX_FILL_SPAN = 1e3


def mask_filled_softmax_inputs(model: onnx.ModelProto, calibrator: Calibrator) -> dict[str, float]:
    """Softmax inputs whose calibrated min-max span exceeds :data:`SOFTMAX_FILL_SPAN` -> that span: like an
    activation holding -inf, no int8 range serves them."""
    spans = {}
    for node in model.graph.node:
        if node.op_type == "Softmax" and node.input and node.input[0] in calibrator:
            stats = calibrator.stats(node.input[0])
            if stats.count and stats.max - stats.min > SOFTMAX_FILL_SPAN:
                spans[node.input[0]] = stats.max - stats.min
    return spans


def collect_statistics(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    data: DataSource,
    specs: Sequence[InputSpec],
    *,
    samples: int,
    histograms: bool,
    threads: int | None = None,
    provider: str = "cpu",
    files: SharedWeights | None = None,
) -> tuple[Calibrator, int]:
    """Run ``model`` (with ``tensors`` exposed as outputs) over up to ``samples`` samples; the calibrator and count.

    ``files``: ``model``'s :class:`SharedWeights`, whose files ORT then loads (its weights written once for this
    session and the placement search's, or linked from the input's data files), when the model is big enough to go
    to ORT as a file anyway."""
    # ORT's full optimization level (fusions that keep every fetched tensor, NCHWc kernels) ran the calibration 1.0-1.7x
    # faster than the basic level on the benchmark nets; the ranges differ by float rounding only (< 1e-6 relative):
    # reports/calibration_paths.md.
    available = data.num_samples()
    runs = samples if available is None else min(samples, available)
    with _exposing(model, tensors) as augmented:
        source: onnx.ModelProto | Path = augmented
        if files is not None and files.proto is model:
            try:
                source = files.model_file()
            except OSError:  # no room in the temporary folder: from memory, as make_session does it
                source = augmented
        session = make_full_session(source, threads=threads, provider=provider,
                                    what="the model prepared for calibration", samples=runs,
                                    weight_bytes=proto_tensor_bytes(model))
    output_names = [o.name for o in session.get_outputs()]
    keep = set(tensors)
    calibrator = Calibrator(histograms=histograms)
    seen = 0
    for batch in data.iter_samples(specs, samples, batch_size=calibration_batch(model, tensors, histograms)):
        outputs = session.run(output_names, batch.inputs)
        calibrator.update_activations({n: a for n, a in zip(output_names, outputs) if n in keep})
        # Graph inputs are not outputs of any node: fold them in directly.
        calibrator.update_many({n: a for n, a in batch.inputs.items() if n in keep and n not in output_names})
        seen += batch.size
    if seen == 0:
        raise DataError(f"the calibration data ({data.description}) yielded no samples")
    missing = [name for name in tensors if name not in calibrator and name not in calibrator.infinite]
    if missing:
        raise DataError(f"calibration saw no values for {len(missing)} tensor(s), e.g. '{missing[0]}'")
    return calibrator, seen


def calibration_batch(model: onnx.ModelProto, tensors: Sequence[str], histograms: bool) -> int:
    """:data:`CALIB_BATCH`, or for min-max statistics of large activations fewer samples per run (see
    :data:`MINMAX_BATCH_BYTES`); tensors whose shape is not fully known beyond the batch dim count nothing."""
    if histograms:
        return CALIB_BATCH
    wanted = set(tensors)
    per_sample = 0
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if value.name in wanted:
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim][1:]
            if dims and all(d > 0 for d in dims):
                per_sample += math.prod(dims) * 4
            wanted.discard(value.name)
    if per_sample == 0:
        return CALIB_BATCH
    return max(MIN_CALIB_BATCH, min(CALIB_BATCH, MINMAX_BATCH_BYTES // per_sample))


def _with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``tensors`` (graph inputs are fed, not fetched)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    _add_outputs(augmented.graph, tensors)
    return augmented


@contextlib.contextmanager
def _exposing(model: onnx.ModelProto, tensors: Sequence[str]) -> Iterator[onnx.ModelProto]:
    """``model`` itself with ``tensors`` added to its graph outputs inside the block, removed after: a session is
    built from it without a copy of the weights (a second 2.4 GB on a 2.4 GB model)."""
    outputs = model.graph.output
    count = len(outputs)
    _add_outputs(model.graph, tensors)
    try:
        yield model
    finally:
        del outputs[count:]


def _add_outputs(graph: onnx.GraphProto, tensors: Sequence[str]) -> None:
    present = {o.name for o in graph.output} | {i.name for i in graph.input}
    for name in tensors:
        if name not in present:
            graph.output.append(onnx.helper.make_tensor_value_info(name, _FLOAT, None))
