"""Fixing dynamic input dimensions of a model.

Many exports leave every input dimension dynamic (PaddlePaddle writes ``[-1, 3, ?, ?]``). Shape-dependent
simplification, benchmarking and static-shape runtimes need concrete sizes, which come either from the user
(``--input-shape``: taken exactly as given) or from the calibration data (every dim except the leading batch dim,
which stays symbolic so the model still runs at batch 1 and batch 8).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import onnx_ir as ir

from onnxopt.errors import BadInputError, DataError

BATCH_DIM = "batch"
#: A 1-D weight with more elements than this is shown to ONNX shape inference with a symbolic length (this prefix and
#: its name): ONNX 1.23's data propagation through Gather expands a 1-D input of known length into one dim per
#: element (0.74 GB for 10M floats; a model with a 2 GB 1-D weight grew past 18 GB of memory).
LONG_VECTOR_ELEMENTS = 1024
LONG_VECTOR_PREFIX = "onnxopt_len_"


@contextlib.contextmanager
def long_vectors_hidden(model: ir.Model) -> Iterator[None]:
    """Inside the block, the main graph's long 1-D initializers have a symbolic length; their shapes are restored
    after (whatever inference wrote into them)."""
    saved: dict[ir.Value, ir.Shape | None] = {}
    for value in model.graph.initializers.values():
        hidden = hidden_length(value.name or "", value.const_value)
        if hidden is not None:
            saved[value] = value.shape
            value.shape = hidden
    try:
        yield
    finally:
        for value, shape in saved.items():
            value.shape = shape


def hidden_length(name: str, tensor: ir.TensorProtocol | None) -> ir.Shape | None:
    """The shape of symbolic length a long 1-D weight ``name`` is shown to shape inference with; None for others."""
    if tensor is not None and len(tensor.shape) == 1 and tensor.size > LONG_VECTOR_ELEMENTS:
        return ir.Shape([f"{LONG_VECTOR_PREFIX}{name}"])
    return None


def infer_shapes(model: ir.Model) -> None:
    """onnx-ir's shape inference pass (intermediate shapes in place; a failure leaves the model as it was), with long
    1-D weights hidden from ONNX's data propagation (:func:`long_vectors_hidden`)."""
    import logging

    from onnx_ir import passes as ir_passes

    logger = logging.getLogger("onnx_ir.passes.common.shape_inference")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it reports a failure we tolerate as a warning with a traceback
    try:
        with long_vectors_hidden(model):
            ir_passes.common.ShapeInferencePass()(model)
    finally:
        logger.setLevel(level)


def input_dims(value: ir.Value) -> list[int | str | None] | None:
    """The dims of a graph input: ints, symbolic names, or None for unknown (negative sizes count as unknown)."""
    if value.shape is None:
        return None
    dims: list[int | str | None] = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim if dim >= 0 else None)
        else:
            dims.append(dim.value if isinstance(dim, ir.SymbolicDim) else None)
    return dims


def format_dims(dims: Sequence[int | str | None] | None) -> str:
    if dims is None:
        return "[unknown rank]"
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def data_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are fed at run time (not initializers)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def normalize_negative_dims(model: ir.Model) -> int:
    """Replace negative sizes (``-1``, written by some exporters and by onnxsim) with symbolic dims.

    ONNX sizes are never negative; shape inference rejects ``-1`` as soon as a real size meets it. Intermediate
    values are cleaned too; the count returned covers the graph inputs and outputs only (what a user sees).
    """
    count = 0
    boundary = [*data_inputs(model), *model.graph.outputs]
    for value in boundary:
        count += _replace_negative(value, BATCH_DIM)
    seen = set(boundary)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value not in seen:
                _replace_negative(value, None)
    return count


def _replace_negative(value: ir.Value, leading_name: str | None) -> int:
    if value.shape is None or not any(isinstance(d, int) and d < 0 for d in value.shape):
        return 0
    dims: list[int | ir.SymbolicDim] = []
    count = 0
    for index, dim in enumerate(value.shape):
        if isinstance(dim, int) and dim < 0:
            dims.append(ir.SymbolicDim(leading_name if index == 0 else None))
            count += 1
        else:
            dims.append(dim)
    value.shape = ir.Shape(dims)
    return count


def fix_input_shapes(
    model: ir.Model,
    shapes: Mapping[str, Sequence[int]],
    *,
    keep_batch: bool,
    source: str,
) -> dict[str, list[int | str | None]]:
    """Set input dims from ``shapes`` (name -> full shape); returns the new dims of each changed input.

    ``keep_batch`` leaves a dynamic leading dim dynamic. ``source`` says where the shapes came from ("given" for
    user input, "data" for calibration data) and picks the error type: :class:`BadInputError` for the user's shapes,
    :class:`DataError` for the data's.
    """
    error = BadInputError if source == "given" else DataError
    inputs = {v.name: v for v in data_inputs(model)}
    unknown = [name for name in shapes if name not in inputs]
    if unknown:
        raise error(
            f"{_origin(source)} names input '{unknown[0]}', which the model does not have "
            f"(model inputs: {', '.join(f'{n}{format_dims(input_dims(v))}' for n, v in inputs.items())})"
        )
    changed: dict[str, list[int | str | None]] = {}
    for name, wanted in shapes.items():
        value = inputs[name]
        current = input_dims(value)
        wanted = [int(d) for d in wanted]
        if keep_batch and current and wanted and isinstance(current[0], int):
            wanted[0] = current[0]  # the data's batch of 1 says nothing about a batch size the model fixes
        _check_compatible(name, current, wanted, source, error)
        dims: list[int | ir.SymbolicDim] = []
        for index, size in enumerate(wanted):
            old = current[index] if current is not None else None
            if keep_batch and index == 0 and not isinstance(old, int):
                dims.append(ir.SymbolicDim(old if isinstance(old, str) else BATCH_DIM))
            else:
                dims.append(size)
        new_shape = ir.Shape(dims)
        if value.shape is None or list(value.shape) != list(new_shape):
            value.shape = new_shape
            changed[name] = input_dims(value)  # type: ignore[assignment]
    return changed


def clear_intermediate_shapes(model: ir.Model) -> None:
    """Forget inferred shapes of intermediate values, which may contradict newly fixed inputs (re-inferred later)."""
    outputs = set(model.graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value not in outputs:
                value.shape = None


def _check_compatible(
    name: str,
    current: list[int | str | None] | None,
    wanted: list[int],
    source: str,
    error: type[BadInputError],
) -> None:
    if any(d <= 0 for d in wanted):
        raise error(f"{_origin(source)} for input '{name}' is {format_dims(wanted)}; every size must be positive")
    if current is None:
        return
    if len(current) != len(wanted):
        raise error(
            f"{_origin(source)} for input '{name}' is {format_dims(wanted)} (rank {len(wanted)}), but the model's "
            f"input is {format_dims(current)} (rank {len(current)})"
        )
    for index, (have, want) in enumerate(zip(current, wanted)):
        if isinstance(have, int) and have != want:
            raise error(
                f"{_origin(source)} for input '{name}' is {format_dims(wanted)}, but the model fixes dim {index} of "
                f"{format_dims(current)} to {have}, not {want}"
            )


def _origin(source: str) -> str:
    return "the given input shape" if source == "given" else "the calibration data's shape"
