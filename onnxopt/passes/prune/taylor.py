"""First-order Taylor importance on activations (Molchanov et al. 2017), through the torch bridge.

For each producer of a group, |mean over positions of a * dL/da| per channel, averaged over calibration batches;
the loss is cross-entropy on the labels when the data has them, else on the model's own top-1 (so unlabelled data
works). Imports torch: this module is only imported when ``criterion="taylor"``.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt.calib_data.base import DataSource
from onnxopt.errors import BadInputError
from onnxopt.modelio import InputSpec
from onnxopt.passes.prune.depgraph import DepGraph


def taylor_scores(proto: onnx.ModelProto, graph: DepGraph, data: DataSource, specs: list[InputSpec],
                  samples: int, batch_size: int = 16, seed: int = 0) -> dict[int, np.ndarray]:
    import torch

    from onnxopt.bridge import UnsupportedOpError, to_torch

    torch.manual_seed(seed)
    try:
        module = to_torch(proto)
    except UnsupportedOpError as exc:
        raise BadInputError(f"prune criterion taylor: the torch bridge cannot run this model ({exc}); "
                            f"use l1, l2 or bn_scale") from None
    module.eval()
    nodes = {node.name or f"{node.op_type}:{node.output[0]}": node for node in proto.graph.node}
    capture: dict[str, list[tuple[int, int, int]]] = {}  # value name -> [(group id, channel offset, channels)]
    axes: dict[str, int] = {}
    for group in graph.prunable:
        for producer in group.producers:
            node = nodes[producer]
            offset = next((c.offset for c in group.cuts if c.kind == "producer" and c.init == node.input[1]), 0)
            capture.setdefault(node.output[0], []).append((group.id, offset, group.size))
            axes[node.output[0]] = -1 if node.op_type == "MatMul" else 1
    sums = {name: None for name in capture}
    seen = 0
    names = [spec.name for spec in specs]
    for batch in data.iter_batches(specs, batch_size=batch_size):
        inputs = [torch.from_numpy(np.asarray(batch.inputs[n])) for n in names]
        outs, feats = module.run_with_features(*inputs, capture=list(capture))
        for tensor in feats.values():
            tensor.retain_grad()
        logits = outs[0] if isinstance(outs, tuple) else outs
        logits = logits.reshape(logits.shape[0], -1)
        if batch.labels is not None:
            target = torch.from_numpy(np.asarray(batch.labels)).long()
        else:
            target = logits.detach().argmax(dim=1)
        loss = torch.nn.functional.cross_entropy(logits, target)
        module.zero_grad(set_to_none=True)
        loss.backward()
        for name, tensor in feats.items():
            axis = axes[name] % tensor.dim()
            prod = (tensor * tensor.grad).detach()
            dims = [d for d in range(1, tensor.dim()) if d != axis]
            per = prod.mean(dim=dims).abs() if dims else prod.abs()
            value = per.sum(dim=0).double().numpy()
            sums[name] = value if sums[name] is None else sums[name] + value
        seen += batch.size
        if seen >= samples:
            break
    scores: dict[int, np.ndarray] = {g.id: np.zeros(g.size) for g in graph.prunable}
    for name, parts in capture.items():
        value = sums[name]
        if value is None:
            continue
        mean = value.mean()
        value = value / mean if mean > 0 else value
        for gid, offset, size in parts:
            scores[gid] += value[offset:offset + size]
    return scores
