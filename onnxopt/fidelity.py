"""How far a model's outputs moved: error figures, SQNR, top-1 agreement and task accuracy.

Figures are accumulated batch by batch so evaluation streams over the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Fidelity:
    """Agreement of a candidate's outputs with a reference's, over all outputs and samples."""

    samples: int
    max_abs_error: float
    #: max |ref - out| / max |ref| per output, worst output.
    max_rel_error: float
    #: 10 log10(sum ref^2 / sum (ref - out)^2); inf when identical.
    sqnr_db: float
    #: Fraction of samples whose arg-max class agrees; None when the first output is not a score vector.
    top1_agreement: float | None = None
    worst_output: str | None = None

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {k: _finite_or_str(v) for k, v in asdict(self).items()}


@dataclass
class _OutputStats:
    max_abs_err: float = 0.0
    max_abs_ref: float = 0.0
    signal: float = 0.0
    noise: float = 0.0


@dataclass
class FidelityAccumulator:
    """Feed (reference, candidate) output lists batch by batch, then read :meth:`result`."""

    output_names: Sequence[str]
    _stats: list[_OutputStats] = field(default_factory=list)
    _agree: int = 0
    _scored: int = 0
    _samples: int = 0

    def __post_init__(self) -> None:
        self._stats = [_OutputStats() for _ in self.output_names]

    def update(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> None:
        """Fold one batch in. Where the reference itself is +-inf or NaN the candidate must give the same value
        (it is left out of the error figures); anywhere else a non-finite candidate value is an infinite error."""
        for stats, ref, out, name in zip(self._stats, reference, candidate, self.output_names):
            ref64 = np.asarray(ref, dtype=np.float64)
            out64 = np.asarray(out, dtype=np.float64)
            if ref64.shape != out64.shape:
                raise ValueError(f"output '{name}' changed shape: {ref64.shape} -> {out64.shape}")
            finite = np.isfinite(ref64)
            if not finite.all():  # the reference's own +-inf/NaN (log(0), a masked score): matched exactly or not
                same = (ref64 == out64) | (np.isnan(ref64) & np.isnan(out64))
                if not np.all(same[~finite]):
                    stats.max_abs_err = stats.noise = math.inf
                    continue
                ref64, out64 = ref64[finite], out64[finite]
            if not np.all(np.isfinite(out64)):
                stats.max_abs_err = math.inf
                stats.noise = math.inf
                continue
            diff = np.abs(ref64 - out64)
            stats.max_abs_err = max(stats.max_abs_err, float(diff.max(initial=0.0)))
            stats.max_abs_ref = max(stats.max_abs_ref, float(np.abs(ref64).max(initial=0.0)))
            stats.signal += float(np.sum(ref64 * ref64))
            stats.noise += float(np.sum(diff * diff))
        first_ref, first_out = np.asarray(reference[0]), np.asarray(candidate[0])
        self._samples += int(first_ref.shape[0]) if first_ref.ndim else 1
        if is_score_vector(first_ref):
            self._agree += int(np.sum(top1(first_ref) == top1(first_out)))
            self._scored += int(first_ref.shape[0])

    def result(self) -> Fidelity:
        worst_rel, worst_name, max_abs = 0.0, None, 0.0
        signal = noise = 0.0
        for stats, name in zip(self._stats, self.output_names):
            rel = stats.max_abs_err / stats.max_abs_ref if stats.max_abs_ref > 0 else stats.max_abs_err
            if rel >= worst_rel:
                worst_rel, worst_name = rel, name
            max_abs = max(max_abs, stats.max_abs_err)
            signal += stats.signal
            noise += stats.noise
        sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
        agreement = self._agree / self._scored if self._scored else None
        return Fidelity(self._samples, max_abs, worst_rel, sqnr, agreement, worst_name)


@dataclass
class AccuracyAccumulator:
    """Top-1 accuracy of the first output against integer labels."""

    correct: int = 0
    total: int = 0

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.correct += int(np.sum(top1(scores) == np.asarray(labels).reshape(-1)))
        self.total += int(len(labels))

    @property
    def value(self) -> float | None:
        return self.correct / self.total if self.total else None


def top1(scores: np.ndarray) -> np.ndarray:
    """Arg-max class per sample of [N, C] or [N, C, 1, 1] scores."""
    scores = np.asarray(scores)
    return scores.reshape(scores.shape[0], -1).argmax(-1)


def is_score_vector(array: np.ndarray) -> bool:
    """[N, C] (or [N, C, 1, 1]) with C > 1 reads as class scores."""
    array = np.asarray(array)
    if array.ndim < 2 or not np.issubdtype(array.dtype, np.floating):
        return False
    squeezed_tail = [d for d in array.shape[2:] if d != 1]
    return array.shape[1] > 1 and not squeezed_tail


def compare(reference: Iterable[Sequence[np.ndarray]], candidate: Iterable[Sequence[np.ndarray]],
            output_names: Sequence[str]) -> Fidelity:
    accumulator = FidelityAccumulator(output_names)
    for ref, out in zip(reference, candidate):
        accumulator.update(ref, out)
    return accumulator.result()


def _finite_or_str(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return value
