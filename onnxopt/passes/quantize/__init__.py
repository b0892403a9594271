"""Calibration statistics and quantization arithmetic (pure numpy), and the int8 ``quantize`` pass.

``QuantizePass`` loads lazily (it imports ONNX Runtime's quantizer), so the numpy parts stay cheap to import.
"""

from typing import Any

from onnxopt.passes.quantize.calibrators import DEFAULT_BINS, Calibrator
from onnxopt.passes.quantize.histogram import GridHistogram
from onnxopt.passes.quantize.qparams import (
    QuantParams,
    TensorRange,
    dequantize,
    fake_quantize,
    qrange,
    quant_params,
    quantize,
)
from onnxopt.passes.quantize.range_methods import (
    METHODS,
    EntropySearch,
    compute_range,
    entropy_search,
    expected_mse_asymmetric,
    expected_mse_symmetric,
)
from onnxopt.passes.quantize.stats import TensorStats
from onnxopt.passes.quantize.weights import WEIGHT_METHODS, weight_quant_params, weight_range

__all__ = [
    "DEFAULT_BINS",
    "METHODS",
    "WEIGHT_METHODS",
    "Calibrator",
    "EntropySearch",
    "GridHistogram",
    "QuantizePass",
    "QuantParams",
    "TensorRange",
    "TensorStats",
    "compute_range",
    "dequantize",
    "entropy_search",
    "expected_mse_asymmetric",
    "expected_mse_symmetric",
    "fake_quantize",
    "qrange",
    "quant_params",
    "quantize",
    "weight_quant_params",
    "weight_range",
]


def __getattr__(name: str) -> Any:
    if name == "QuantizePass":
        from onnxopt.passes.quantize.pass_ import QuantizePass

        return QuantizePass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
