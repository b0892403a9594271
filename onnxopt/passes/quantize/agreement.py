"""How a quantized candidate's first output is compared with FP32's: top-1 agreement per sample for class scores,
per position along the class axis of a sequence of them (an OCR recognizer's [N, T, C]), SQNR for an output without
classes (a detector's probability map), where one arg-max over the whole map flips on any change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx

from onnxopt.fidelity import is_score_vector, top1


def top1_agreement(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], axis: int | None = None) -> float:
    """Share of samples whose first output has the same top-1 class as the reference; NaN outputs give 0. With
    ``axis`` (the classes' axis), the share of positions whose arg-max along it agrees: a sequence of class scores
    (an OCR recognizer's [N, T, C]) is judged per position, not by one arg-max over all T x C values.

    Both sides are stacked along the batch dim first, so one batched output and a list of per-sample outputs (see
    :func:`first_outputs`) compare alike.
    """
    if not reference:
        return 1.0
    ref, out = _stacked(reference, outputs)
    if not np.all(np.isfinite(out)):
        return 0.0
    if axis is not None and ref.ndim > 1:
        return float(np.mean(ref.argmax(axis % ref.ndim) == out.argmax(axis % ref.ndim)))
    return float(np.mean(top1(ref) == top1(out)))


def output_sqnr_db(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """SQNR (dB) of the candidate's first outputs against the reference's; -inf for NaN/Inf outputs."""
    if not reference:
        return math.inf
    ref, out = _stacked(reference, outputs)
    return _sqnr_db(square_sum(ref), noise_sum(ref, out))


def square_sum(values: np.ndarray) -> float:
    """The sum of ``values``' squares, in float64."""
    return float(np.sum(np.square(values, dtype=np.float64)))


def noise_sum(reference: np.ndarray, noisy: np.ndarray) -> float:
    """The sum of ``(reference - noisy)``'s squares; inf when ``noisy`` is not finite.

    float32 values are subtracted and squared in float32 and summed in float64: no float64 copy of either array, a
    third of the time on a detector's 640x640 maps (the SQNR the same to 1e-6 dB, ad hoc); a sum that is not finite
    that way (a NaN or Inf output, or a square beyond float32's range) is redone in float64."""
    if reference.dtype == np.float32 and noisy.dtype == np.float32:
        with np.errstate(over="ignore", invalid="ignore"):  # judged below, on the sum
            diff = np.subtract(reference, noisy)
            np.square(diff, out=diff)
            total = float(np.sum(diff, dtype=np.float64))
        if np.isfinite(total):
            return total
    if not np.all(np.isfinite(noisy)):
        return float("inf")
    return float(np.sum(np.square(reference.astype(np.float64) - noisy)))


class PrefixCheck:
    """Whether a candidate can still pass its check, from its outputs on the first samples.

    The reference's outputs on every sample are known before the candidate runs, and both measures are pooled over
    the samples: noise and disagreements only accumulate. So once even a perfect rest of the samples could not lift
    the pooled SQNR (total signal / noise so far) or the agreement ((decisions - disagreements so far) / decisions)
    to its bar, the full check would fail too, and the candidate's remaining samples need not run. A candidate that
    can still pass runs every sample and gets the full check as before: the verdicts are the same, only failures come
    sooner (PaddleOCR's v4 detector: its int8 candidates sit at 9-14 dB against a 20 dB bar).
    """

    def __init__(self, reference: Sequence[np.ndarray], kind: str, axis: int | None, min_sqnr_db: float,
                 min_agreement: float | None = None, agreement_name: str = "top-1 agreement"):
        self._ref = np.concatenate([np.atleast_2d(r) for r in reference], axis=0) if reference else np.empty((0, 1))
        self.kind, self.axis, self.agreement_name = kind, axis, agreement_name
        self.aligned = True  # False once an output does not match the reference's next rows: no verdict then
        self.min_sqnr_db, self.min_agreement = min_sqnr_db, min_agreement
        self.judges_agreement = kind != "sqnr" and min_agreement is not None
        self.signal = square_sum(self._ref)
        self.decisions = self._decisions(self._ref)
        self.noise, self.disagreements, self.rows = 0.0, 0, 0
        self.seen_signal, self.seen_decisions = 0.0, 0

    def _decisions(self, array: np.ndarray) -> int:
        if self.kind == "sqnr":
            return 0
        if self.axis is not None and array.ndim > 1:
            return array.size // max(1, array.shape[self.axis % array.ndim])
        return array.shape[0]

    def figures(self, seen_only: bool = False) -> tuple[float, float]:
        """(pooled SQNR in dB, agreement): over the samples added so far with ``seen_only``, else the most the
        candidate can still reach (all the reference's signal and decisions; the noise and disagreements so far)."""
        signal, decisions = (self.seen_signal, self.seen_decisions) if seen_only else (self.signal, self.decisions)
        return _sqnr_db(signal, self.noise), 1.0 - self.disagreements / decisions if decisions else 1.0

    def add(self, output: np.ndarray) -> str | None:
        """Count the candidate's next output (the samples after those already added); the reason it can no longer
        pass, or None while it can."""
        out = np.atleast_2d(output)
        ref = self._ref[self.rows:self.rows + out.shape[0]]
        self.aligned = self.aligned and ref.shape == out.shape
        if not self.aligned:
            return None  # not the reference's next rows: the verdict is left to the full check
        self.rows += out.shape[0]
        if not np.all(np.isfinite(out)):
            self.noise = math.inf
            return "its output is not finite"
        self.noise += noise_sum(ref, out)
        self.seen_signal += square_sum(ref)
        self.seen_decisions += self._decisions(ref)
        if self.judges_agreement:
            if self.axis is not None and ref.ndim > 1:
                axis = self.axis % ref.ndim
                self.disagreements += int(np.sum(ref.argmax(axis) != out.argmax(axis)))
            else:
                self.disagreements += int(np.sum(top1(ref) != top1(out)))
        sqnr_bound, agreement_bound = self.figures()
        if self.judges_agreement and agreement_bound < self.min_agreement:  # type: ignore[operator]
            return f"{self.agreement_name} at most {agreement_bound:.4f} < {self.min_agreement:g}"
        if sqnr_bound < self.min_sqnr_db:
            return f"SQNR at most {sqnr_bound:.2f} dB < {self.min_sqnr_db:g} dB"
        return None


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 and math.isfinite(noise) else -math.inf


def _stacked(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ref = np.concatenate([np.atleast_2d(r) for r in reference], axis=0)
    out = np.concatenate([np.atleast_2d(o) for o in outputs], axis=0) if len(outputs) else np.empty((0,))
    if out.shape[0] != ref.shape[0]:
        raise ValueError(f"{out.shape[0]} candidate samples for {ref.shape[0]} reference samples")
    return ref, out


def probabilities_along(array: np.ndarray, axis: int) -> bool:
    """True when ``array`` is >= 0 and sums to 1 along ``axis`` everywhere (a Softmax's output)."""
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)) or np.any(array < 0):
        return False
    return bool(np.allclose(array.sum(axis=axis, dtype=np.float64), 1.0, atol=1e-3))


#: Ops whose output holds class scores along their ``axis`` attribute (default -1 from opset 13, 1 before).
_CLASS_OPS = ("Softmax", "LogSoftmax", "Hardmax")


def class_axis(model: onnx.ModelProto) -> int | None:
    """The axis along which the graph's first output holds class scores, when the graph says so: the ``axis`` of a
    Softmax/LogSoftmax/Hardmax that produces it (through Identity); None otherwise."""
    if not model.graph.output:
        return None
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(model.graph.output[0].name)
    while node is not None and node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
        node = producers.get(node.input[0])
    if node is None or node.op_type not in _CLASS_OPS or node.domain not in ("", "ai.onnx"):
        return None
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if version >= 13 else 1)
    return int(axis)


def decision_axis(graph_axis: int | None, reference: np.ndarray) -> int | None:
    """The class axis of ``reference`` (a first output, batch first), non-negative: ``graph_axis``
    (:func:`class_axis`) when it fits, else an axis along which it holds probabilities (>= 0, summing to 1: a Softmax
    the opset conversion wrapped in Reshapes); None for none, or the batch axis."""
    first = np.atleast_2d(reference)
    ndim = first.ndim
    if graph_axis is not None and -ndim <= graph_axis < ndim:
        return graph_axis % ndim or None
    for axis in dict.fromkeys((ndim - 1, 1)):
        if axis and first.shape[axis] > 1 and probabilities_along(first, axis):
            return axis
    return None


#: Each :func:`check_kind` as notes name it.
CHECK_NAMES = {"top-1": "top-1 agreement", "top-1 per position": "top-1 agreement per position",
               "sqnr": "SQNR (no classes in the output)"}


def check_kind(reference: np.ndarray, axis: int | None) -> str:
    """"top-1" (one decision per sample), "top-1 per position" (a class axis beside other non-trivial axes) or "sqnr"
    (no classes: neither a class axis nor a [N, C] score vector)."""
    first = np.atleast_2d(reference)
    if axis is None:
        return "top-1" if is_score_vector(first) else "sqnr"
    positions = [d for i, d in enumerate(first.shape[1:], 1) if i != axis]
    return "top-1 per position" if any(d != 1 for d in positions) else "top-1"


__all__ = ["CHECK_NAMES", "PrefixCheck", "check_kind", "class_axis", "decision_axis", "output_sqnr_db",
           "probabilities_along", "top1_agreement"]
