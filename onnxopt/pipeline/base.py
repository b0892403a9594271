"""Base class of onnxopt passes, built on onnx-ir's pass infrastructure.

An onnxopt pass is an ``onnx_ir.passes.PassBase`` whose parameters are dataclass fields (so recipes, CLI flags and
Python code configure it the same way), that can read the run's :class:`PassContext`, and that leaves notes for the
report (what it did and why).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

import onnx
import onnx_ir as ir

from onnxopt.pipeline.context import PassContext

M = TypeVar("M", onnx.ModelProto, ir.Model)


class OnnxoptPass(ir.passes.InPlacePass):
    """Subclasses are ``@dataclass`` es; their fields are the pass parameters.

    Class attributes:
        name: the name used in recipes and reports.
        exact: True when the pass must not change outputs beyond float rounding; the manager then holds its output to
            a tight tolerance. Lossy passes (prune, quantize) are judged by budgets instead.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.context: PassContext = PassContext()
        self.notes: list[str] = []
        #: Figures a pass wants in the report (e.g. {"folded_batchnorms": 52}).
        self.details: dict[str, Any] = {}

    def bind(self, context: PassContext) -> "OnnxoptPass":
        self.context = context
        return self

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]

    def note(self, message: str) -> None:
        self.notes.append(message)

    def apply(self, model: M) -> M:
        """Run the pass alone on a ModelProto or an ir.Model; a ModelProto is returned for a ModelProto."""
        self.notes = []
        self.details = {}
        if isinstance(model, onnx.ModelProto):
            from onnxopt.modelio import to_proto  # modelio imports the pipeline package

            result = self(ir.serde.deserialize_model(model))
            return to_proto(result.model)
        return self(model).model

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
