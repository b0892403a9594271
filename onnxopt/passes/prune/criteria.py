"""Channel importance, aggregated over a whole dependency group.

- ``l1`` / ``l2``: filter norms of every producer of the group (Li et al. 2017), each producer's norms divided by
  their mean so a wide layer does not outvote a narrow one, then summed over the group.
- ``bn_scale``: |gamma| of the BatchNormalizations on the group's channels (network slimming, Liu et al. 2017);
  needs BN in the graph (run normalize with ``fold_batchnorm=False`` first). Groups without BN fall back to L1.
- ``taylor``: first-order Taylor expansion of the loss on activations, |mean(a * dL/da)| per channel (Molchanov et
  al. 2017), on calibration data through the torch bridge (:mod:`onnxopt.passes.prune.taylor`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt.errors import BadInputError
from onnxopt.passes.prune.depgraph import Cut, DepGraph

CRITERIA = ("l1", "l2", "bn_scale", "taylor")


def _channel_view(array: np.ndarray, cut: Cut, size: int) -> np.ndarray:
    """[size, rest] rows of ``array`` for the channels of the cut's space."""
    moved = np.moveaxis(array, cut.axis, 0)
    if cut.index is None:
        part = moved[cut.offset:cut.offset + size * cut.block]
        return part.reshape(size, -1).astype(np.float64)
    rows = np.zeros((size, int(np.prod(moved.shape[1:]))))  # channels absent from this tensor score nothing here
    for channel, slot in enumerate(cut.index):
        if slot >= 0:
            rows[channel] = moved[slot].reshape(-1)
    return rows


def weight_scores(proto: onnx.ModelProto, graph: DepGraph, criterion: str) -> dict[int, np.ndarray]:
    """Per prunable group, one score per channel (higher = more important) from weights alone."""
    inits = {i.name: i for i in proto.graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    scores: dict[int, np.ndarray] = {}
    if criterion == "bn_scale" and not any(c.kind == "bn_scale" for g in graph.prunable for c in g.cuts):
        raise BadInputError("prune criterion bn_scale needs BatchNormalization nodes, and this model has none on a "
                            "prunable group (normalize folds BN by default: use normalize with fold_batchnorm=false, "
                            "as `onnxopt prune --criterion bn_scale` does), or choose l1/l2/taylor")
    for group in graph.prunable:
        kinds = ("bn_scale",) if criterion == "bn_scale" else ("producer",)
        cuts = [c for c in group.cuts if c.kind in kinds]
        if not cuts:
            cuts = [c for c in group.cuts if c.kind == "producer"]
        total = np.zeros(group.size)
        for cut in cuts:
            rows = _channel_view(array(cut.init), cut, group.size)
            if criterion == "l2":
                norm = np.sqrt((rows ** 2).sum(axis=1))
            else:
                norm = np.abs(rows).sum(axis=1)
            mean = norm.mean()
            total += norm / mean if mean > 0 else norm
        scores[group.id] = total
    return scores

