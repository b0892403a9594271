"""The parity corpus of the torch bridge: the onnx package's own backend test models, compared with ONNX Runtime.

Shared by tests/test_bridge.py and benchmarks/bridge.py. Node tests are generated from ``onnx.backend.test.case.node``
(the same cases that make up ``backend/test/data/node``, which this onnx wheel does not ship as files); model tests
are the ``pytorch-converted``, ``pytorch-operator`` and ``simple`` folders and the ``light`` models.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

#: ONNX op types the issue asks for, in the order the report lists them.
ISSUE_OPS: tuple[str, ...] = (
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Relu", "LeakyRelu", "PRelu", "Clip",
    "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample", "Concat", "Split", "Slice", "Reshape", "Transpose",
    "Flatten", "Squeeze", "Unsqueeze", "Shape", "Gather", "Cast", "Constant", "ConstantOfShape", "Range", "Expand",
    "Where", "Equal", "Less", "Greater", "Not", "And", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log",
    "Neg", "Abs", "Reciprocal", "Erf", "ReduceMean", "ReduceSum", "ReduceMax", "LayerNormalization", "Pad", "LRN",
    "Dropout", "Sum", "Identity", "Gelu", "Einsum", "QuantizeLinear", "DequantizeLinear",
)

#: Node-test name fragments outside the bridge's scope, with the reason (reported, never silently dropped).
EXCLUDED: dict[str, str] = {
    "training_dropout": "Dropout in training mode (random masks)",
    "antialias": "Resize antialias=1 is not implemented",
    "blocked": "blocked (block_size) quantization is not implemented",
    "bfloat16": "bfloat16/float8/int4/int2 element types",
    "BFLOAT16": "bfloat16/float8/int4/int2 element types",
    "e4m3": "float8 element types", "e5m2": "float8 element types", "E4M3": "float8 element types",
    "E5M2": "float8 element types", "int4": "int4 element types", "INT4": "int4 element types",
    "int2": "int2 element types", "INT2": "int2 element types", "float4": "float4 element types",
    "FLOAT4": "float4 element types", "string": "string tensors", "STRING": "string tensors",
    "uint16": "torch has few kernels for uint16/32/64", "uint32": "torch has few kernels for uint16/32/64",
    "uint64": "torch has few kernels for uint16/32/64", "UINT16": "torch has few kernels for uint16/32/64",
    "UINT32": "torch has few kernels for uint16/32/64", "UINT64": "torch has few kernels for uint16/32/64",
    "fp16": "float16 attention (outside the float32 target)", "e8m0": "float8 element types",
    "bf16": "bfloat16/float8/int4/int2 element types",
    "softmax_precision": "Attention-24 softmax_precision: ONNX Runtime differs from the ONNX reference by 5.6e-4 "
                         "(the bridge matches the reference exactly)",
}


@dataclass
class Case:
    """One model with inputs and reference outputs (from the test data; ONNX Runtime's are added when it runs)."""

    name: str
    model: onnx.ModelProto
    inputs: list[np.ndarray]
    expected: list[np.ndarray]
    ops: set[str] = field(default_factory=set)


def _array(value: object) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def excluded_reason(name: str) -> str | None:
    for fragment, reason in EXCLUDED.items():
        if fragment in name:
            return reason
    return None


def _case_modules(ops: Sequence[str]) -> list[str]:
    """The onnx.backend.test.case.node modules that define the cases of ``ops`` (module names are op names in
    lower case, some with underscores: batch_normalization, and_, rangeop...)."""
    import pkgutil

    import onnx.backend.test.case.node as package

    wanted = {op.lower() for op in ops}
    names = []
    for info in pkgutil.iter_modules(package.__path__):
        key = info.name.replace("_", "")
        if key in wanted or (key == "rangeop" and "range" in wanted):
            names.append(f"{package.__name__}.{info.name}")
    return names


def node_cases(ops: Sequence[str] = ISSUE_OPS, *, every_module: bool = False) -> Iterator[Case]:
    """Generated node test cases (incl. '_expanded' function bodies) whose every node is one of ``ops``.

    Generating a case computes its reference outputs, so by default only the modules of ``ops`` are imported
    (seconds); ``every_module`` imports all of them (also cases of other ops whose function bodies use ``ops``)."""
    import importlib

    import onnx.backend.test.case.node as package

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if every_module:
            cases = package.collect_testcases(None)
        else:
            for module in _case_modules(ops):
                importlib.import_module(module)
            cases = package._NodeTestCases
    wanted = set(ops)
    for case in list(cases):
        graph_ops = {n.op_type for n in case.model.graph.node}
        if not graph_ops or not graph_ops <= wanted or not case.data_sets:
            continue
        inputs, outputs = case.data_sets[0]
        yield Case(case.name, case.model, [_array(x) for x in inputs], [_array(y) for y in outputs], graph_ops)


def backend_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def model_dir_cases(folders: Sequence[str] = ("pytorch-converted", "pytorch-operator", "simple")) -> Iterator[Case]:
    """Model folders with model.onnx and test_data_set_0/{input,output}_*.pb."""
    for folder in folders:
        for path in sorted((backend_dir() / folder).glob("*/model.onnx")):
            data = path.parent / "test_data_set_0"
            inputs = [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in sorted(data.glob("input_*.pb"))]
            outputs = [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in sorted(data.glob("output_*.pb"))]
            model = onnx.load(str(path))
            yield Case(f"{folder}/{path.parent.name}", model, inputs, outputs, {n.op_type for n in model.graph.node})


def light_cases(names: Sequence[str] | None = None, seed: int = 0) -> Iterator[Case]:
    """The Caffe2-era 'light' models with a random [0, 1) input (reference outputs come from ONNX Runtime)."""
    for path in sorted((backend_dir() / "light").glob("*.onnx")):
        if names is not None and path.stem not in names:
            continue
        model = onnx.load(str(path))
        inits = {i.name for i in model.graph.initializer}
        rng = np.random.default_rng(seed)
        inputs = []
        for value in model.graph.input:
            if value.name not in inits:
                shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
                inputs.append(rng.random(shape, dtype=np.float32))
        yield Case(f"light/{path.stem}", model, inputs, [], {n.op_type for n in model.graph.node})


def ort_outputs(model: onnx.ModelProto, inputs: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    """ONNX Runtime's outputs (graph optimizations off), or None when it cannot load or run the model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return session.run(None, dict(zip(names, inputs)))
    except Exception:  # noqa: BLE001 - ORT lacks some recent opsets/types: the test data's outputs still count
        return None


def error(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """Worst relative error over outputs: max |a - b| / max |b| for floats (NaNs must match), and 0 or inf for
    exact types (ints, bools)."""
    if len(reference) != len(actual):
        return float("inf")
    worst = 0.0
    for ref, out in zip(reference, actual):
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape:
            return float("inf")
        if ref.size == 0:
            continue
        if ref.dtype.kind in "fc":
            nan = np.isnan(ref)
            if not np.array_equal(nan, np.isnan(out)):
                return float("inf")
            inf = np.isinf(ref)
            if not np.array_equal(ref[inf], out[inf]):
                return float("inf")
            ok = ~(nan | inf)
            if not ok.any():
                continue
            scale = float(np.abs(ref[ok]).max())
            diff = float(np.abs(ref[ok].astype(np.float64) - out[ok].astype(np.float64)).max())
            worst = max(worst, diff / max(scale, 1e-12) if scale > 1e-6 else diff)
        elif not np.array_equal(ref, out.astype(ref.dtype)):
            return float("inf")
    return worst


def bridge_outputs(model: onnx.ModelProto, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The bridge's outputs in eval mode, without autograd."""
    import torch

    from onnxopt.bridge import to_torch

    module = to_torch(model)
    with torch.no_grad():
        result = module(*[torch.from_numpy(np.array(x, copy=True)) for x in inputs])
    results = result if isinstance(result, tuple) else (result,)
    return [r.numpy() for r in results]


@dataclass
class Parity:
    """A case's errors against the test data and against ONNX Runtime (None where that reference is missing)."""

    name: str
    vs_expected: float | None
    vs_ort: float | None
    error: str | None = None
    spread: float | None = None  # max - min of the reference's first output (0: a constant output proves little)

    @property
    def worst(self) -> float:
        """The figure judged against the 1e-4 target: the error against ONNX Runtime where it runs the case, else
        against the test data's outputs."""
        if self.error:
            return float("inf")
        if self.vs_ort is not None:
            return self.vs_ort
        return self.vs_expected if self.vs_expected is not None else float("inf")


def parity(case: Case, use_ort: bool = True) -> Parity:
    """Run ``case`` through the bridge (and ONNX Runtime) and measure the errors."""
    try:
        outputs = bridge_outputs(case.model, case.inputs)
    except Exception as exc:  # noqa: BLE001 - reported per case
        return Parity(case.name, None, None, f"{type(exc).__name__}: {exc}")
    vs_expected = error(case.expected, outputs) if case.expected else None
    reference = ort_outputs(case.model, case.inputs) if use_ort else None
    vs_ort = error(reference, outputs) if reference is not None else None
    first = reference[0] if reference else (case.expected[0] if case.expected else None)
    with np.errstate(all="ignore"):
        spread = float(np.ptp(first)) if first is not None and first.size and first.dtype.kind == "f" else None
    return Parity(case.name, vs_expected, vs_ort, spread=spread)
