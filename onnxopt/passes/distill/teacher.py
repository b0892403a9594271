"""The teacher: an ONNX model run by ONNX Runtime (default) or through the torch bridge, returning logits and the
intermediate values that feature losses need.

ORT runs the teacher as it will be deployed and costs no autograd memory; intermediate values are read by
listing them as extra graph outputs of a copy of the model. Models that end in Softmax (the Paddle cls model does)
are distilled on the Softmax's input, so KD sees logits, not probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from onnxopt.errors import BadInputError

#: Ops whose outputs are never feature maps (weights stored as Constant nodes, shape arithmetic).
_NOT_FEATURES = {"Constant", "Shape", "ConstantOfShape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Range"}


def logits_value(model: onnx.ModelProto) -> str:
    """The value to distill on: the first output, or the input of the Softmax that produces it (last axis; trailing
    Identity/Reshape/Flatten/Squeeze nodes, as Paddle exports add, are looked through)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    name = model.graph.output[0].name
    node = producer.get(name)
    while node is not None and node.op_type in ("Identity", "Reshape", "Flatten", "Squeeze"):
        node = producer.get(node.input[0])
    if node is not None and node.op_type == "Softmax":
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if axis in (-1, 1):
            return node.input[0]
    return name


def node_values(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(value name, op type) of every node output that could be a feature map, in graph order."""
    return [(out, node.op_type) for node in model.graph.node for out in node.output
            if out and node.op_type not in _NOT_FEATURES]


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value shape inference can type (graph inputs, outputs and intermediates)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types are a hint; values it cannot type are treated as float
        inferred = model
    graph = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}


def with_outputs(model: onnx.ModelProto, names: Sequence[str], types: dict[str, int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (element type from shape inference, else float)."""
    types = value_types(model) if types is None else types
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            elem = types.get(name, onnx.TensorProto.FLOAT)
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            present.add(name)
    return copy


class OrtTeacher:
    """The teacher in ONNX Runtime; ``run`` returns logits and the requested features as numpy arrays."""

    def __init__(self, model: onnx.ModelProto, *, provider: str = "cpu", threads: int | None = 1,
                 what: str = "teacher"):
        self.model = model
        self.what = what
        self.provider = provider
        self.threads = threads
        self.logits_name = logits_value(model)
        self.input_names = [i.name for i in model.graph.input
                            if i.name not in {init.name for init in model.graph.initializer}]
        #: One session per set of extra outputs (logits only for evaluation, logits + features for training).
        self._sessions: dict[tuple[str, ...], Any] = {}

    def _session(self, features: tuple[str, ...]) -> Any:
        if features not in self._sessions:
            from onnxopt.runtime import make_session

            model = with_outputs(self.model, [self.logits_name, *features])
            self._sessions[features] = make_session(model, threads=self.threads, provider=self.provider,
                                                    what=self.what)
        return self._sessions[features]

    def run(self, inputs: dict[str, np.ndarray], features: Sequence[str] = ()) -> tuple[np.ndarray,
                                                                                       dict[str, np.ndarray]]:
        session = self._session(tuple(features))
        feeds = self.feeds(inputs)
        try:
            outs = session.run([self.logits_name, *features], feeds)
        except Exception as exc:  # noqa: BLE001 - ORT's errors name the node; keep one line of it
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
            raise BadInputError(f"{self.what} cannot run on the training data ({shapes}): "
                                f"{str(exc).splitlines()[0][:300]}") from None
        return np.asarray(outs[0], dtype=np.float32), {n: np.asarray(v) for n, v in zip(features, outs[1:])}

    def feeds(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The data keyed by the teacher's own input names (positional when the names differ)."""
        if set(self.input_names) <= set(inputs):
            return {n: inputs[n] for n in self.input_names}
        if len(self.input_names) == len(inputs):
            return dict(zip(self.input_names, inputs.values()))
        raise BadInputError(f"{self.what} takes inputs {', '.join(self.input_names)} but the data has "
                            f"{', '.join(inputs)}")

    def probe(self, inputs: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every float intermediate value on ``inputs``, in graph order (for layer matching)."""
        types = value_types(self.model)
        names = [n for n, _ in node_values(self.model)
                 if types.get(n, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]
        session_model = with_outputs(self.model, names, types)
        from onnxopt.runtime import make_session

        session = make_session(session_model, threads=self.threads, provider=self.provider, what=self.what)
        outs = session.run(names, self.feeds(inputs))
        return [(n, tuple(v.shape)) for n, v in zip(names, outs)
                if isinstance(v, np.ndarray) and v.dtype == np.float32]


class TorchTeacher:
    """The teacher through the torch bridge (e.g. on a GPU next to the student); frozen, eval mode, no grad."""

    def __init__(self, model: onnx.ModelProto, *, device: str = "cpu", what: str = "teacher"):
        import torch

        from onnxopt.bridge import to_torch

        self.what = what
        self.device = torch.device(device)
        self.module = to_torch(model).to(self.device).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.logits_name = logits_value(model)
        self.input_names = list(self.module.input_names)
        self._ort = OrtTeacher(model, what=what)

    def feeds(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._ort.feeds(inputs)

    def run(self, inputs: dict[str, np.ndarray], features: Sequence[str] = ()) -> tuple[np.ndarray,
                                                                                       dict[str, np.ndarray]]:
        import torch

        feeds = self.feeds(inputs)
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
        with torch.no_grad():
            _, feats = self.module.run_with_features(*tensors, capture=[self.logits_name, *features])
        return (feats[self.logits_name].float().cpu().numpy(),
                {n: feats[n].float().cpu().numpy() for n in features})

    def probe(self, inputs: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
        return self._ort.probe(inputs)
