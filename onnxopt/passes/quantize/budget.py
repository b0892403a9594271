"""How much a quantized candidate loses: accuracy on labelled eval data, else top-1 agreement with FP32.

Loaded once per run (at most ``samples`` samples, batches of 32) and reused by the sensitivity table, the
mixed-precision search and placement, so every decision is taken on the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.calib_data.base import Batch
from onnxopt.fidelity import top1
from onnxopt.modelio import InputSpec
from onnxopt.pipeline.context import PassContext
from onnxopt.runtime import make_session

_BATCH = 32


@dataclass
class Evaluator:
    feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    reference: np.ndarray  # FP32 first output over all feeds
    what: str
    threads: int | None = None

    @classmethod
    def build(cls, model: onnx.ModelProto, context: PassContext, specs: Sequence[InputSpec],
              samples: int) -> Evaluator:
        source = context.eval if context.eval is not None and context.eval.has_labels() else context.calib
        assert source is not None
        feeds: list[dict[str, np.ndarray]] = []
        labels: list[np.ndarray] = []
        seen = 0
        for batch in source.iter_samples(specs, samples, batch_size=_BATCH):
            feeds.append(batch.inputs)
            if batch.labels is not None:
                labels.append(np.asarray(batch.labels))
            seen += batch.size
        labelled = source is context.eval and len(labels) == len(feeds) and bool(labels)
        what = (f"accuracy on {seen} labelled eval samples" if labelled
                else f"top-1 agreement with FP32 on {seen} {'eval' if source is context.eval else 'calibration'} "
                     "samples")
        evaluator = cls(feeds, np.concatenate(labels) if labelled else None, np.empty(0), what, context.threads)
        evaluator.reference = evaluator.outputs(model)
        return evaluator

    def outputs(self, model: onnx.ModelProto) -> np.ndarray:
        session = make_session(model, threads=self.threads, what="a quantization candidate",
                               samples=sum(Batch(feed).size for feed in self.feeds))
        name = session.get_outputs()[0].name
        return np.concatenate([np.asarray(session.run([name], feed)[0]) for feed in self.feeds], axis=0)

    def score(self, outputs: np.ndarray) -> float:
        """Accuracy (labels) or top-1 agreement with FP32; 0 for non-finite outputs."""
        if not np.all(np.isfinite(outputs)):
            return 0.0
        predicted = top1(outputs)
        target = self.labels if self.labels is not None else top1(self.reference)
        return float(np.mean(predicted == target))

    @property
    def baseline(self) -> float:
        return self.score(self.reference)

    def drop(self, model: onnx.ModelProto) -> float:
        """Baseline score minus the model's score (positive = worse)."""
        return self.baseline - self.score(self.outputs(model))


__all__ = ["Evaluator"]
