"""Checking data against a model's inputs: names, rank, fixed dims, dtype, NaN/Inf, labels.

Every check raises :class:`DataError` with a message that says where the data came from and which input is at fault,
with both shapes where shapes disagree, because the user fixes the data, not the code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxopt.errors import DataError
from onnxopt.modelio import InputSpec

#: The key that holds integer labels in ``.npz`` files, dicts of arrays and dict items (unless an input has that name).
LABEL_KEY = "y"


def to_numpy(value: Any) -> np.ndarray:
    """An ndarray from an array, a torch tensor (without importing torch), a scalar or a nested list."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()  # torch tensors, also those that require grad
    return np.asarray(value)


def format_model_shape(shape: Sequence[int | str | None]) -> str:
    """``(N, 3, 48, 192)``: symbolic dims by name, unknown ones as ``?``."""
    dims = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def format_shape(shape: Sequence[int]) -> str:
    return format_model_shape([int(d) for d in shape])


def fixed_batch_size(specs: Sequence[InputSpec]) -> int | None:
    """The model's batch size when the leading dim of an input is a fixed number, else None."""
    for spec in specs:
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
            return int(spec.shape[0])
    return None


def bind_inputs(
    raw: Mapping[str, Any] | Sequence[Any],
    specs: Sequence[InputSpec],
    where: str,
    labels: Any = None,
) -> tuple[dict[str, Any], Any]:
    """Key ``raw`` by graph input name; split off ``y`` labels from a mapping.

    A mapping must name exactly the model's inputs (plus ``y`` for labels when no input is called ``y``); a sequence
    is positional, in graph input order (a single unnamed array feeds a single-input model).
    """
    names = [spec.name for spec in specs]
    if isinstance(raw, Mapping):
        inputs = dict(raw)
        if LABEL_KEY in inputs and LABEL_KEY not in names:
            found = inputs.pop(LABEL_KEY)
            labels = found if labels is None else labels
        missing = [n for n in names if n not in inputs]
        extra = [k for k in inputs if k not in names]
        if missing or extra:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(f"'{n}'" for n in missing))
            if extra:
                parts.append("unknown " + ", ".join(f"'{k}'" for k in extra))
            raise DataError(
                f"{where}: data has inputs [{', '.join(map(repr, inputs))}] but the model's inputs are "
                f"[{', '.join(map(repr, names))}] ({'; '.join(parts)})"
            )
        return {n: inputs[n] for n in names}, labels
    arrays = list(raw)
    if len(arrays) != len(names):
        raise DataError(
            f"{where}: data has {len(arrays)} unnamed array(s) but the model has {len(names)} inputs "
            f"[{', '.join(map(repr, names))}]; key the arrays by input name"
        )
    return dict(zip(names, arrays)), labels


def add_batch_axis(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Data one rank short of the model input is a single sample: give it a batch axis of 1."""
    if spec.shape and array.ndim == len(spec.shape) - 1:
        return array[np.newaxis]
    if not spec.shape and array.ndim == 0:
        return array.reshape(1)
    return array


def no_batch_axis(specs: Sequence[InputSpec]) -> bool:
    """True for a model whose inputs fix their leading dims to different sizes (``torch.mm``'s ``[2, 3]`` by
    ``[3, 4]``): no axis they share can count samples, so a sample is a whole feed."""
    leading = [spec.shape[0] for spec in specs if spec.shape]
    return len(set(leading)) > 1 and all(isinstance(d, int) and d > 0 for d in leading)


def stacked_feeds(values: Mapping[str, Any], specs: Mapping[str, InputSpec],
                  where: str) -> dict[str, np.ndarray] | None:
    """``values`` as a stack of whole feeds on a new first axis, or None for data along the model's batch axis.

    Data one rank above every input is such a stack (for a model without a batch axis, say), but only where the
    inputs' leading dims are fixed: one rank above an input with a symbolic batch dim is a shape error, reported as
    one. A model without a batch axis (:func:`no_batch_axis`) fed at its own ranks gets one feed (an ONNX Runtime
    data reader's item). Some inputs stacked and others not is refused."""
    ranks = {name: (np.ndim(value), len(specs[name].shape)) for name, value in values.items() if specs[name].shape}
    if ranks and no_batch_axis(list(specs.values())) and all(data == model for data, model in ranks.values()):
        return {name: to_numpy(value)[np.newaxis] for name, value in values.items()}
    stacked = [name for name, (data, model) in ranks.items() if data == model + 1]
    if not stacked or not all(isinstance(specs[name].shape[0], int) and specs[name].shape[0] > 0 for name in stacked):
        return None
    if len(stacked) != len(ranks):  # an input of unknown rank goes either way
        other = next(name for name in ranks if name not in stacked)
        raise DataError(f"{where}: input '{stacked[0]}' is a stack of feeds (one rank above the model input) but "
                        f"input '{other}' is not; stack every input's feeds on a new first axis, or none")
    return {name: to_numpy(value) for name, value in values.items()}


def conform_feed(name: str, value: Any, spec: InputSpec, where: str, sample: int, hint: str = "") -> np.ndarray:
    """One whole feed of stacked feeds: its shape checked in full (a fixed leading dim too: it is not cut or joined
    into batches), cast, NaN/Inf checked."""
    original = to_numpy(value)
    check_shape(name, original.shape, spec, where, hint)
    want = spec.shape[0] if spec.shape else None
    if isinstance(want, int) and want > 0 and original.shape[0] != want:
        raise DataError(f"{where}: input '{name}': feed {sample} has shape {format_shape(original.shape)}, model "
                        f"expects {format_model_shape(spec.shape)}" + (f"; {hint}" if hint else ""))
    array = cast_to(name, original, spec.dtype, where)
    check_finite(name, array[np.newaxis], where, sample, original=original[np.newaxis])  # the feed is one sample
    return np.ascontiguousarray(array)


def conform(
    name: str,
    value: Any,
    spec: InputSpec,
    where: str,
    first_sample: int = 0,
    hint: str = "",
) -> np.ndarray:
    """Check one input's array (with or without a batch axis) against ``spec``; return it batched and cast.

    The batch dim itself is not checked here: batching enforces a fixed batch size.
    """
    original = add_batch_axis(to_numpy(value), spec)
    check_shape(name, original.shape, spec, where, hint)
    array = cast_to(name, original, spec.dtype, where)
    check_finite(name, array, where, first_sample, original=original)
    return array


def check_shape(name: str, shape: Sequence[int], spec: InputSpec, where: str, hint: str = "") -> None:
    if not spec.shape:
        return  # unknown rank: nothing to check
    bad_rank = len(shape) != len(spec.shape)
    bad_dim = not bad_rank and any(
        isinstance(want, int) and want > 0 and have != want for have, want in zip(shape[1:], spec.shape[1:])
    )
    if bad_rank or bad_dim:
        raise DataError(
            f"{where}: input '{name}': data has shape {format_shape(shape)}, model expects "
            f"{format_model_shape(spec.shape)}" + (f"; {hint}" if hint else "")
        )


def cast_to(name: str, array: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """Cast when no value can change meaning (float64->float32, int32->int64, 0/1->bool); refuse otherwise."""
    dtype = np.dtype(dtype)
    src = array.dtype
    if src == dtype:
        return array
    kind, target = src.kind, dtype.kind

    def refuse(why: str) -> DataError:
        return DataError(f"{where}: input '{name}': data is {src} but the model expects {dtype}; {why}")

    if target in "OSU":
        if kind in "OSU":
            return array.astype(dtype) if target != "O" else array.astype(object)
        raise refuse("the input takes strings")
    if kind in "OSUV" or kind == "c" or kind == "M" or kind == "m":
        raise refuse("this data type cannot be fed to the input")
    if target == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            return array.astype(dtype)  # narrowing floats may overflow: check_finite reports it
    if target in "iu":
        if kind == "f":
            raise refuse("float data is not cast to an integer input (values would be truncated); "
                         "convert it explicitly, e.g. np.rint(x).astype(...)")
        if kind in "iu" and not np.can_cast(src, dtype, "safe") and array.size:
            info = np.iinfo(dtype)
            low, high = int(array.min()), int(array.max())
            if low < info.min or high > info.max:
                raise refuse(f"values range {low}..{high}, outside {dtype}'s {info.min}..{info.max}")
        return array.astype(dtype)
    if target == "b":
        if kind in "iu" and (array.size == 0 or bool(np.isin(array, (0, 1)).all())):
            return array.astype(bool)
        raise refuse("a bool input takes bool data (or integers that are all 0 or 1)")
    raise refuse("this data type cannot be fed to the input")


def check_finite(
    name: str, array: np.ndarray, where: str, first_sample: int = 0, original: np.ndarray | None = None
) -> None:
    """Refuse NaN/Inf, naming the first bad sample by its index in the whole stream.

    ``original`` is the data before a narrowing cast, to tell data that holds NaN/Inf from values that overflow.
    """
    if array.dtype.kind not in "fc" or array.size == 0:
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    per_sample = finite.reshape(array.shape[0], -1).all(axis=1) if array.ndim else finite.reshape(1)
    index = int(np.argmin(per_sample))
    sample = array[index] if array.ndim else array
    if original is not None and original.dtype != array.dtype and original.dtype.kind in "fc":
        before = original[index] if original.ndim else original
        if np.isfinite(before).all():
            raise DataError(f"{where}: input '{name}': sample {first_sample + index} has values that overflow "
                            f"{array.dtype} (largest |value| {float(np.abs(before).max()):g})")
    what = "NaN" if np.isnan(sample).any() else "Inf"
    raise DataError(f"{where}: input '{name}': sample {first_sample + index} contains {what}; "
                    f"calibration and evaluation need finite values")


def conform_labels(labels: Any, count: int, where: str, first_sample: int = 0) -> np.ndarray | None:
    """Labels of one chunk as int64 ``[count]``: integer class indices >= 0."""
    if labels is None:
        return None
    array = to_numpy(labels)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        extra = " (one-hot labels? give class indices, e.g. y.argmax(axis=1))" if array.ndim == 2 else ""
        raise DataError(f"{where}: labels must be a 1-D array of class indices, got shape "
                        f"{format_shape(array.shape)}{extra}")
    if array.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integer class indices, got {array.dtype} values")
    if len(array) != count:
        raise DataError(f"{where}: {len(array)} label(s) for {count} sample(s) starting at sample {first_sample}; "
                        f"give one label per sample")
    if array.size and int(array.min()) < 0:
        index = int(np.argmin(array))
        raise DataError(f"{where}: label {int(array[index])} of sample {first_sample + index} is negative; "
                        f"labels are class indices >= 0")
    return array.astype(np.int64, copy=False)


def check_labels(labels: Any, num_classes: int, *, where: str = "labels") -> np.ndarray:
    """Raise :class:`DataError` unless every label is an integer class index in ``0..num_classes-1``."""
    array = to_numpy(labels)
    array = conform_labels(array, array.size if array.ndim <= 1 else -1, where)
    assert array is not None
    if array.size and int(array.max()) >= num_classes:
        index = int(np.argmax(array))
        raise DataError(
            f"{where}: label {int(array[index])} of sample {index} is out of range for a model with "
            f"{num_classes} classes (labels must be 0..{num_classes - 1})"
        )
    return array


__all__ = [
    "LABEL_KEY", "add_batch_axis", "bind_inputs", "cast_to", "check_finite", "check_labels", "check_shape",
    "conform", "conform_labels", "fixed_batch_size", "format_model_shape", "format_shape", "to_numpy",
]
