"""Running a model over the evaluation data once, keeping what fidelity and accuracy need."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.calib_data.base import DataSource
from onnxopt.calib_data.validate import check_labels
from onnxopt.fidelity import AccuracyAccumulator, Fidelity, FidelityAccumulator, is_score_vector
from onnxopt.modelio import input_specs
from onnxopt.runtime import make_session


@dataclass
class ModelOutputs:
    """Outputs of one model on the evaluation data, concatenated along the batch axis."""

    names: list[str]
    arrays: list[np.ndarray]
    labels: np.ndarray | None

    @property
    def accuracy(self) -> float | None:
        if self.labels is None or not self.arrays:
            return None
        accumulator = AccuracyAccumulator()
        accumulator.update(self.arrays[0], self.labels)
        return accumulator.value

    def compare(self, candidate: "ModelOutputs", chunk: int = 64) -> Fidelity:
        """Fidelity of ``candidate`` against these outputs (same samples, same order)."""
        accumulator = FidelityAccumulator(self.names)
        total = min(a.shape[0] for a in self.arrays) if self.arrays else 0
        for start in range(0, total, chunk):
            accumulator.update(
                [a[start:start + chunk] for a in self.arrays],
                [b[start:start + chunk] for b in candidate.arrays],
            )
        return accumulator.result()


def collect_outputs(
    model: ir.Model,
    data: DataSource,
    *,
    batch_size: int,
    max_samples: int | None,
    threads: int | None = None,
    provider: str = "cpu",
    what: str = "model",
    serialized: bytes | None = None,
) -> ModelOutputs:
    """Outputs (and labels) of ``model`` over up to ``max_samples`` samples of ``data``; ``serialized``: the model's
    ``modelio.serialized_in_memory``, when the caller has it (ORT then loads it without serializing again)."""
    available = data.num_samples()
    runs = available if max_samples is None or available is None else min(available, max_samples)
    session = make_session(model if serialized is None else serialized, threads=threads, provider=provider,
                           what=what, samples=runs)
    names = [o.name for o in session.get_outputs()]
    chunks: list[list[np.ndarray]] = [[] for _ in names]
    labels: list[np.ndarray] = []
    seen = 0
    for batch in data.iter_batches(input_specs(model), batch_size=batch_size):
        outputs = session.run(names, batch.inputs)
        for store, array in zip(chunks, outputs):  # a whole feed's outputs get a sample axis: one sample
            store.append(np.asarray(array)[np.newaxis] if batch.is_feed else np.asarray(array))
        if batch.labels is not None:
            labels.append(np.asarray(batch.labels))
        seen += batch.size
        if max_samples is not None and seen >= max_samples:
            break
    arrays = [_concat(store) for store in chunks]
    label_array = np.concatenate(labels) if labels and len(labels) == len(chunks[0]) else None
    if label_array is not None and arrays and is_score_vector(arrays[0]):
        # A label past the last class would silently count as a miss: refuse it instead.
        check_labels(label_array, int(np.prod(arrays[0].shape[1:])), where=f"labels of {data.description}")
    return ModelOutputs(names, arrays, label_array)


def _concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    if all(p.ndim >= 1 for p in parts):
        try:
            return np.concatenate(parts, axis=0)
        except ValueError:  # outputs whose non-batch dims vary per batch (e.g. detections): keep the first
            return parts[0]
    return np.stack(parts)
