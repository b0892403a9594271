"""Python entry point: ``distill(student, teacher, data, eval=..., output=...)`` runs the ``distill`` pass through
onnxopt's pipeline (validation, metrics, report), as ``onnxopt distill`` does."""

from __future__ import annotations

import os
from typing import Any

import onnx
import onnx_ir as ir


def distill(student: str | os.PathLike[str] | onnx.ModelProto | ir.Model,
            teacher: str | os.PathLike[str] | onnx.ModelProto | ir.Model | None, data: Any,
            eval: Any = None,  # noqa: A002 - the public name onnxopt.optimize uses
            *, output: str | os.PathLike[str] | None = None, report: str | os.PathLike[str] | None = None,
            budgets: Any = None, seed: int | None = None, preprocess: Any = None, threads: int | None = None,
            input_shapes: Any = None, measure_latency: bool = True, quiet: bool = True, plot: bool = True,
            **options: Any) -> Any:
    """Fine-tune ``student`` against ``teacher`` on ``data`` (anything ``open_data`` takes); ``options`` are
    :class:`~onnxopt.passes.distill.pass_.DistillPass` fields (method, epochs, lr, ...). Returns the
    :class:`onnxopt.api.OptimizeResult`; the pass's figures are in ``result.report`` (step details).

    Under ``torchrun`` every rank trains; only rank 0 writes ``output`` and ``report``.
    """
    from onnxopt.api import optimize
    from onnxopt.passes.distill.pass_ import DistillPass

    step = DistillPass(teacher=os.fspath(teacher) if isinstance(teacher, (str, os.PathLike)) else teacher, **options)
    if int(os.environ.get("RANK", "0")) != 0:
        output = report = None
    return optimize(student, [step], data, eval, input_shapes=input_shapes, budgets=budgets, seed=seed,
                    output=output, report=report, preprocess=preprocess, threads=threads,
                    measure_latency=measure_latency, quiet=quiet, plot=plot)
