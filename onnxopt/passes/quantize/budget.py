"""How much a quantized candidate loses: accuracy on labelled eval data, else top-1 agreement with FP32 (per position
along the class axis of a sequence output, :mod:`onnxopt.passes.quantize.agreement`).

Loaded once per run (at most ``samples`` samples, batches of 32) and reused by the sensitivity table, the
mixed-precision search and placement, so every decision is taken on the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.calib_data.base import Batch
from onnxopt.errors import RecipeError
from onnxopt.fidelity import top1
from onnxopt.passes.quantize.agreement import CHECK_NAMES, check_kind, class_axis, decision_axis, top1_agreement
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
    #: The class axis of the first output when there are no labels (None: one decision per sample).
    axis: int | None = None
    #: How an unlabelled candidate is scored (:func:`agreement.check_kind`): "sqnr" means it cannot be.
    kind: str = "top-1"

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
        evaluator = cls(feeds, np.concatenate(labels) if labelled else None, np.empty(0), "", context.threads)
        evaluator.reference = evaluator.outputs(model)
        samples_text = f"{seen} {'eval' if source is context.eval else 'calibration'} samples"
        if labelled:
            evaluator.what = f"accuracy on {seen} labelled eval samples"
            return evaluator
        evaluator.axis = decision_axis(class_axis(model), evaluator.reference)
        evaluator.kind = check_kind(evaluator.reference, evaluator.axis)
        evaluator.what = f"{CHECK_NAMES[evaluator.kind]} with FP32 on {samples_text}"
        return evaluator

    def outputs(self, model: onnx.ModelProto) -> np.ndarray:
        session = make_session(model, threads=self.threads, what="a quantization candidate",
                               samples=sum(Batch(feed).size for feed in self.feeds))
        name = session.get_outputs()[0].name
        return np.concatenate([np.asarray(session.run([name], feed)[0]) for feed in self.feeds], axis=0)

    def score(self, outputs: np.ndarray) -> float:
        """Accuracy (labels) or top-1 agreement with FP32 (per position along :attr:`axis`); 0 for non-finite
        outputs. An unlabelled output without classes has no score: a clear error, not a meaningless arg-max over a
        whole map."""
        self.ensure_scorable()
        if not np.all(np.isfinite(outputs)):
            return 0.0
        if self.labels is not None:
            return float(np.mean(top1(outputs) == self.labels))
        return top1_agreement([self.reference], [outputs], self.axis)

    def ensure_scorable(self) -> None:
        """Raise :class:`RecipeError` when there is no score to judge a budget on: no labels, and a first output
        without classes."""
        if self.labels is None and self.kind == "sqnr":
            raise RecipeError(
                f"an accuracy budget needs labelled eval data (--eval with labels) for this model: its first output "
                f"{list(self.reference.shape)} holds no classes, so top-1 agreement with FP32 says nothing; use "
                "min_sqnr_db for an unlabelled budget")

    @property
    def baseline(self) -> float:
        return self.score(self.reference)

    def drop(self, model: onnx.ModelProto) -> float:
        """Baseline score minus the model's score (positive = worse)."""
        return self.baseline - self.score(self.outputs(model))


__all__ = ["Evaluator"]
