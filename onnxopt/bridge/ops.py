"""ONNX operators as torch callables.

Each builder receives a :class:`NodeSpec` (the node, its parsed attributes, the values of the inputs that are known
when the module is built) and returns a callable over the node's input tensors (``None`` for an omitted optional
input) that returns one tensor or a tuple. Inputs known at build time (Reshape shapes, Slice bounds, Clip limits...)
are baked into the callable as Python values, so the forward pass does no shape bookkeeping for them; the same
inputs arriving as tensors (dynamic shape arithmetic) are read with ``tolist()`` at run time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.nn import functional as F

from onnxopt.bridge import quant
from onnxopt.errors import BadInputError


class UnsupportedOpError(BadInputError):
    """The graph uses an operator (or an operator variant) that the bridge does not implement."""

    def __init__(self, op_type: str, node: str, detail: str = ""):
        self.op_type = op_type
        self.node = node
        extra = f": {detail}" if detail else ""
        super().__init__(f"torch bridge: unsupported operator '{op_type}' at node '{node}'{extra}")


#: ONNX TensorProto element type -> torch dtype.
DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
}
for _code, _name in ((4, "uint16"), (12, "uint32"), (13, "uint64")):
    if hasattr(torch, _name):
        DTYPES[_code] = getattr(torch, _name)

Fn = Callable[..., Any]


@dataclass
class NodeSpec:
    """What a builder knows about one node when the module is built."""

    node: onnx.NodeProto
    name: str
    attrs: dict[str, Any]
    consts: list[np.ndarray | None]
    opset: int
    #: DequantizeLinear whose input 0 is a float parameter standing for an integer weight: that weight's dtype
    qweight: np.dtype | None = None

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def const(self, index: int) -> np.ndarray | None:
        return self.consts[index] if index < len(self.consts) else None

    def has(self, index: int) -> bool:
        return index < len(self.node.input) and self.node.input[index] != ""

    def n_outputs(self) -> int:
        return sum(1 for o in self.node.output if o)

    def unsupported(self, detail: str) -> UnsupportedOpError:
        return UnsupportedOpError(self.node.op_type, self.name, detail)


def parse_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """Attributes as Python values (strings decoded, tensors as numpy arrays)."""
    out: dict[str, Any] = {}
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH or attribute.type == onnx.AttributeProto.GRAPHS:
            raise UnsupportedOpError(node.op_type, node.name, "subgraphs (control flow) are not supported")
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[attribute.name] = value
    return out


class _Mode(threading.local):
    """The running module's mode, set at the start of every forward (thread-local for DataParallel replicas).
    Callables read it instead of holding a reference to their module, so deep copies of a module stay independent."""

    training: bool = False
    stochastic: bool = False


MODE = _Mode()

BUILDERS: dict[str, Callable[[NodeSpec], Fn]] = {}
#: op type -> input indices that are shape-like or otherwise never trainable (their initializers become buffers).
STATIC_INPUTS: dict[str, frozenset[int]] = {}
#: op type -> input indices that hold weights (trainable even when scalar).
WEIGHT_INPUTS: dict[str, frozenset[int]] = {}


def op(*names: str, static: Sequence[int] = (), weights: Sequence[int] = ()) -> Callable[[Callable], Callable]:
    """Register a builder for the given op types."""

    def register(builder: Callable[[NodeSpec], Fn]) -> Callable[[NodeSpec], Fn]:
        for name in names:
            BUILDERS[name] = builder
            STATIC_INPUTS[name] = frozenset(static)
            WEIGHT_INPUTS[name] = frozenset(weights)
        return builder

    return register


def ints(value: Any) -> list[int]:
    """A shape-like value (numpy array, tensor, list) as a list of Python ints."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(value).reshape(-1).tolist()]


def floats(value: Any) -> list[float]:
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.reshape(-1).tolist()]
    return [float(v) for v in np.asarray(value).reshape(-1).tolist()]


def static_or(spec: NodeSpec, index: int, convert: Callable[[Any], Any] = ints) -> Any:
    """The build-time value of input ``index`` converted, or None when it is dynamic or absent."""
    value = spec.const(index)
    return None if value is None else convert(value)


# ------------------------------------------------------------------------------------------------- elementwise


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.pow(a, b)
    return out if out.dtype == a.dtype else out.to(a.dtype)


_BINARY: dict[str, Fn] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": _pow,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}

_UNARY: dict[str, Fn] = {
    "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Sqrt": torch.sqrt, "Exp": torch.exp,
    "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Erf": torch.erf,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sin": torch.sin, "Cos": torch.cos,
    "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh,
    "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh, "Sign": torch.sign,
    "Not": torch.logical_not, "Softsign": F.softsign, "HardSwish": F.hardswish, "IsNaN": torch.isnan,
    "Mish": F.mish,
}


def _binary_builder(spec: NodeSpec) -> Fn:
    fn = _BINARY[spec.node.op_type]
    if spec.node.op_type == "Pow":
        exponent = spec.const(1)
        if exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0:
            return lambda a, b: a * a
    return fn


for _name in _BINARY:
    op(_name, static=(1,) if _name == "Pow" else ())(_binary_builder)


def _unary_builder(spec: NodeSpec) -> Fn:
    return _UNARY[spec.node.op_type]


for _name in _UNARY:
    op(_name)(_unary_builder)


@op("Mod")
def _mod(spec: NodeSpec) -> Fn:
    return torch.fmod if spec.attr("fmod", 0) else torch.remainder


@op("Sum", "Max", "Min", "Mean")
def _variadic(spec: NodeSpec) -> Fn:
    kind = spec.node.op_type
    pair = {"Sum": torch.add, "Mean": torch.add, "Max": torch.maximum, "Min": torch.minimum}[kind]

    def fn(*xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = pair(out, x)
        return out / len(xs) if kind == "Mean" else out

    return fn


@op("Where", static=(0,))
def _where(spec: NodeSpec) -> Fn:
    return torch.where


@op("Identity", "Dropout", static=(1, 2))
def _identity(spec: NodeSpec) -> Fn:
    if spec.n_outputs() > 1:  # Dropout's mask
        return lambda x, *_: (x, torch.ones_like(x, dtype=torch.bool))
    return lambda x, *_: x


# ------------------------------------------------------------------------------------------------- activations


@op("LeakyRelu")
def _leaky_relu(spec: NodeSpec) -> Fn:
    slope = float(spec.attr("alpha", 0.01))
    return lambda x: F.leaky_relu(x, slope)


@op("PRelu", weights=(1,))
def _prelu(spec: NodeSpec) -> Fn:
    legacy = spec.opset < 7  # opset 6 PRelu: a 1-D slope is per channel

    def fn(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        if legacy and slope.dim() == 1 and x.dim() > 2 and slope.numel() > 1:
            slope = slope.reshape([-1] + [1] * (x.dim() - 2))
        return torch.where(x >= 0, x, x * slope)

    return fn


@op("Elu")
def _elu(spec: NodeSpec) -> Fn:
    alpha = float(spec.attr("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@op("Celu")
def _celu(spec: NodeSpec) -> Fn:
    alpha = float(spec.attr("alpha", 1.0))
    return lambda x: F.celu(x, alpha)


@op("Selu")
def _selu(spec: NodeSpec) -> Fn:
    alpha = float(spec.attr("alpha", 1.67326319217681884765625))
    gamma = float(spec.attr("gamma", 1.05070102214813232421875))
    return lambda x: gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("Shrink")
def _shrink(spec: NodeSpec) -> Fn:
    bias = float(spec.attr("bias", 0.0))
    lambd = float(spec.attr("lambd", 0.5))
    return lambda x: torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


@op("Softplus")
def _softplus(spec: NodeSpec) -> Fn:
    return F.softplus


@op("ThresholdedRelu")
def _thresholded_relu(spec: NodeSpec) -> Fn:
    alpha = float(spec.attr("alpha", 1.0))
    return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))


@op("HardSigmoid")
def _hard_sigmoid(spec: NodeSpec) -> Fn:
    alpha = float(spec.attr("alpha", 0.2))
    beta = float(spec.attr("beta", 0.5))
    if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:
        return F.hardsigmoid
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


@op("Gelu")
def _gelu(spec: NodeSpec) -> Fn:
    approximate = spec.attr("approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


@op("Clip", static=(1, 2))
def _clip(spec: NodeSpec) -> Fn:
    if spec.opset < 11:
        lo = spec.attr("min", -3.4028234663852886e38)
        hi = spec.attr("max", 3.4028234663852886e38)
        return lambda x: torch.clamp(x, lo, hi)
    lo_c = static_or(spec, 1, lambda v: v.reshape(-1)[0].item()) if spec.has(1) else None
    hi_c = static_or(spec, 2, lambda v: v.reshape(-1)[0].item()) if spec.has(2) else None
    if (lo_c is not None or not spec.has(1)) and (hi_c is not None or not spec.has(2)):
        if lo_c == 0 and hi_c is None:
            return lambda x, *_: F.relu(x)
        if lo_c is None and hi_c is None:
            return lambda x, *_: x
        if lo_c is not None and hi_c is not None and isinstance(lo_c, float) and isinstance(hi_c, float):
            lo_f, hi_f = lo_c, hi_c  # hardtanh: the cheaper backward (ReLU6 and friends)
            return lambda x, *_: F.hardtanh(x, lo_f, hi_f) if x.is_floating_point() else torch.clamp(x, lo_f, hi_f)
        return lambda x, *_: torch.clamp(x, lo_c, hi_c)
    def dynamic(x: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
        return x if lo is None and hi is None else torch.clamp(x, lo, hi)

    return dynamic


def _softmax_like(spec: NodeSpec, fn: Fn) -> Fn:
    axis = spec.attr("axis", -1 if spec.opset >= 13 else 1)
    if spec.opset >= 13:
        return lambda x: fn(x, axis)

    def legacy(x: torch.Tensor) -> torch.Tensor:  # opset < 13: softmax over the input flattened from axis on
        a = axis % x.dim() if x.dim() else 0
        if a == x.dim() - 1:
            return fn(x, -1)
        return fn(x.flatten(a), -1).reshape(x.shape)

    return legacy


@op("Softmax")
def _softmax(spec: NodeSpec) -> Fn:
    return _softmax_like(spec, lambda x, a: torch.softmax(x, a))


@op("LogSoftmax")
def _log_softmax(spec: NodeSpec) -> Fn:
    return _softmax_like(spec, lambda x, a: torch.log_softmax(x, a))


@op("Hardmax")
def _hardmax(spec: NodeSpec) -> Fn:
    def fn(x: torch.Tensor, a: int) -> torch.Tensor:
        return F.one_hot(torch.argmax(x, a), x.shape[a]).movedim(-1, a).to(x.dtype)

    return _softmax_like(spec, fn)


# ---------------------------------------------------------------------------------------------- conv and linear


def _pads_for(spec: NodeSpec, nd: int) -> list[int]:
    pads = spec.attr("pads")
    return list(pads) if pads else [0] * (2 * nd)


def _same_pads(in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
               upper: bool) -> list[int]:
    """SAME_UPPER/SAME_LOWER padding: output = ceil(input / stride); the odd pixel goes to the end (upper)."""
    begins, ends = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] over the last n dims -> F.pad's (b_n, e_n, ..., b_1, e_1)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@op("Conv", weights=(1, 2))
def _conv(spec: NodeSpec) -> Fn:
    group = int(spec.attr("group", 1))
    auto_pad = spec.attr("auto_pad", "NOTSET")
    kernel_attr = spec.attr("kernel_shape")
    w = spec.const(1)
    nd = len(kernel_attr) if kernel_attr else (w.ndim - 2 if w is not None else None)

    def geometry(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, list[int], list[int], list[int]]:
        strides, dilations, pads = _window(spec, x, list(kernel_attr or weight.shape[2:]))
        return x.dim() - 2, strides, dilations, pads

    if nd is not None and auto_pad in ("NOTSET", "VALID"):
        strides = list(spec.attr("strides") or [1] * nd)
        dilations = list(spec.attr("dilations") or [1] * nd)
        pads = [0] * (2 * nd) if auto_pad == "VALID" else _pads_for(spec, nd)
        conv = _CONV.get(nd)
        if conv is None:
            raise spec.unsupported(f"{nd}-D convolution")
        if pads[:nd] == pads[nd:]:
            padding = pads[:nd]
            return lambda x, weight, bias=None: conv(x, weight, bias, strides, padding, dilations, group)
        torch_pads = _torch_pad(pads)
        return lambda x, weight, bias=None: conv(F.pad(x, torch_pads), weight, bias, strides, 0, dilations, group)

    def dynamic(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n, strides, dilations, pads = geometry(x, weight)
        if pads[:n] != pads[n:]:
            x, pads = F.pad(x, _torch_pad(pads)), [0] * (2 * n)
        return _CONV[n](x, weight, bias, strides, pads[:n], dilations, group)

    return dynamic


@op("ConvTranspose", weights=(1, 2))
def _conv_transpose(spec: NodeSpec) -> Fn:
    group = int(spec.attr("group", 1))
    auto_pad = spec.attr("auto_pad", "NOTSET")
    output_shape = spec.attr("output_shape")

    def fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n = x.dim() - 2
        strides = list(spec.attr("strides") or [1] * n)
        dilations = list(spec.attr("dilations") or [1] * n)
        out_pad = list(spec.attr("output_padding") or [0] * n)
        kernel = list(spec.attr("kernel_shape") or weight.shape[2:])
        full = [s * (i - 1) + o + (k - 1) * d + 1
                for i, s, o, k, d in zip(x.shape[2:], strides, out_pad, kernel, dilations)]
        if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            # the split of the total padding as ONNX's tests expect: truncating division, the odd pixel at the end
            # except for SAME_LOWER
            target = list(output_shape)[-n:] if output_shape else [i * s for i, s in zip(x.shape[2:], strides)]
            total = [f - t for f, t in zip(full, target)]
            half = [int(t / 2) for t in total]
            if auto_pad == "SAME_LOWER":
                pads = [t - h for t, h in zip(total, half)] + half
            else:
                pads = half + [t - h for t, h in zip(total, half)]
        else:
            pads = _pads_for(spec, n)
        # full transposed convolution (output padding needs output_padding < stride in torch: pad by hand otherwise)
        torch_out_pad = [o if o < s or o < d else 0 for o, s, d in zip(out_pad, strides, dilations)]
        y = _CONV_T[n](x, weight, None, strides, 0, torch_out_pad, group, dilations)
        extra = [o - t for o, t in zip(out_pad, torch_out_pad)]
        if any(extra):
            y = F.pad(y, _torch_pad([0] * n + extra))
        if any(pads):
            y = F.pad(y, _torch_pad([-p for p in pads]))  # crop (or pad where the total padding is negative)
        if bias is not None:
            y = y + bias.reshape([-1] + [1] * n)
        return y

    return fn


@op("Gemm", weights=(0, 1, 2))
def _gemm(spec: NodeSpec) -> Fn:
    alpha = float(spec.attr("alpha", 1.0))
    beta = float(spec.attr("beta", 1.0))
    trans_a = int(spec.attr("transA", 0))
    trans_b = int(spec.attr("transB", 0))
    if alpha == 1.0 and beta == 1.0 and not trans_a and trans_b:
        def linear(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
            if c is None or c.dim() == 1:
                return F.linear(a, b, c)
            return F.linear(a, b) + c

        return linear

    def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y

    return gemm


@op("MatMul", weights=(0, 1))
def _matmul(spec: NodeSpec) -> Fn:
    return torch.matmul


@op("Einsum", weights=(0, 1, 2))
def _einsum(spec: NodeSpec) -> Fn:
    equation = spec.attr("equation")
    return lambda *xs: torch.einsum(equation, *xs)


# ----------------------------------------------------------------------------------------------- normalization


@op("BatchNormalization", static=(3, 4), weights=(1, 2))
def _batch_norm(spec: NodeSpec) -> Fn:
    eps = float(spec.attr("epsilon", 1e-5))
    momentum = 1.0 - float(spec.attr("momentum", 0.9))  # ONNX: running*momentum + batch*(1-momentum)
    if spec.opset < 7 and spec.attr("spatial", 1) != 1:
        raise spec.unsupported("spatial=0")
    if spec.n_outputs() > 1:
        if spec.opset < 14 or not spec.attr("training_mode", 0):
            raise spec.unsupported("pre-opset-14 saved mean/var outputs")
        return _batch_norm_training_outputs(eps, 1.0 - momentum)
    def fn(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
           var: torch.Tensor) -> torch.Tensor:
        if MODE.training:
            return F.batch_norm(x, mean, var, scale, bias, True, momentum, eps)
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)

    return fn


def _batch_norm_training_outputs(eps: float, momentum: float) -> Fn:
    """BatchNormalization-14 with training_mode=1 as a function: (Y, new running mean, new running var), ONNX's
    formulas (population variance of the batch)."""

    def fn(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
           var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = [0, *range(2, x.dim())]
        batch_mean = x.mean(dims)
        batch_var = x.var(dims, unbiased=False)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - batch_mean.reshape(shape)) * torch.rsqrt(batch_var.reshape(shape) + eps)
        y = y * scale.reshape(shape) + bias.reshape(shape)
        return y, mean * momentum + batch_mean * (1 - momentum), var * momentum + batch_var * (1 - momentum)

    return fn


@op("InstanceNormalization", weights=(1, 2))
def _instance_norm(spec: NodeSpec) -> Fn:
    eps = float(spec.attr("epsilon", 1e-5))
    return lambda x, scale, bias: F.instance_norm(x, weight=scale, bias=bias, eps=eps)


@op("LayerNormalization", weights=(1, 2))
def _layer_norm(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", -1))
    eps = float(spec.attr("epsilon", 1e-5))
    extra = spec.n_outputs() > 1

    def fn(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
        a = axis % x.dim()
        shape = tuple(x.shape[a:])
        if not extra and tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
            return F.layer_norm(x, shape, scale, bias, eps)
        dims = tuple(range(a, x.dim()))
        mean = x.mean(dims, keepdim=True)
        inv_std = torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)
        y = (x - mean) * inv_std * scale
        if bias is not None:
            y = y + bias
        return (y, mean, inv_std) if extra else y

    return fn


@op("LRN")
def _lrn(spec: NodeSpec) -> Fn:
    size = int(spec.attr("size"))
    alpha = float(spec.attr("alpha", 1e-4))
    beta = float(spec.attr("beta", 0.75))
    bias = float(spec.attr("bias", 1.0))
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2

    def fn(x: torch.Tensor) -> torch.Tensor:
        if before == after:
            return F.local_response_norm(x, size, alpha, beta, bias)
        squares = F.pad((x * x).unsqueeze(1), (0, 0) * (x.dim() - 2) + (before, after)).squeeze(1)
        window = squares.unfold(1, size, 1).sum(-1)
        return x / (bias + alpha / size * window) ** beta

    return fn


# -------------------------------------------------------------------------------------------------------- pools


def _window(spec: NodeSpec, x: torch.Tensor, kernel: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Strides, dilations and ONNX pads of a sliding window over ``x`` (auto_pad resolved on x's shape)."""
    n = len(kernel)
    strides = list(spec.attr("strides") or [1] * n)
    dilations = list(spec.attr("dilations") or [1] * n)
    auto_pad = spec.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(list(x.shape[2:]), kernel, strides, dilations, auto_pad == "SAME_UPPER")
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    else:
        pads = _pads_for(spec, n)
    return strides, dilations, pads


def _pool_geometry(spec: NodeSpec, x: torch.Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(spec.attr("kernel_shape"))
    return (kernel, *_window(spec, x, kernel))


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@op("MaxPool")
def _max_pool(spec: NodeSpec) -> Fn:
    ceil_mode = bool(spec.attr("ceil_mode", 0))
    with_indices = len(spec.node.output) > 1 and bool(spec.node.output[1])
    column_major = bool(spec.attr("storage_order", 0))

    def fn(x: torch.Tensor) -> Any:
        kernel, strides, dilations, pads = _pool_geometry(spec, x)
        n = len(kernel)
        pool = _MAXPOOL[n]
        begin, end = pads[:n], pads[n:]
        if begin == end and all(p <= k // 2 for p, k in zip(begin, kernel)):
            if with_indices:  # torch indexes each (n, c) plane; ONNX the whole tensor
                values, index = pool(x, kernel, strides, begin, dilations, ceil_mode, True)
                if column_major:
                    if n != 2:
                        raise spec.unsupported("storage_order=1 Indices beyond 2-D")
                    height, width = x.shape[2:]
                    index = (index % width) * height + index // width
                plane = math.prod(x.shape[2:])
                base = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(
                    x.shape[0], x.shape[1], *([1] * n)) * plane
                return values, index + base
            return pool(x, kernel, strides, begin, dilations, ceil_mode)
        if with_indices:
            raise spec.unsupported("Indices output with asymmetric or large padding")
        padded = F.pad(x, _torch_pad(pads), value=float("-inf"))
        return pool(padded, kernel, strides, 0, dilations, ceil_mode)

    return fn


@op("AveragePool")
def _avg_pool(spec: NodeSpec) -> Fn:
    ceil_mode = bool(spec.attr("ceil_mode", 0))
    include_pad = bool(spec.attr("count_include_pad", 0))

    def fn(x: torch.Tensor) -> torch.Tensor:
        kernel, strides, dilations, pads = _pool_geometry(spec, x)
        if any(d != 1 for d in dilations):
            return _dilated_avg_pool(x, kernel, strides, dilations, pads, ceil_mode, include_pad)
        n = len(kernel)
        pool = _AVGPOOL[n]
        begin, end = pads[:n], pads[n:]
        if begin == end and all(p <= k // 2 for p, k in zip(begin, kernel)):
            return pool(x, kernel, strides, begin, ceil_mode, include_pad)
        torch_pads = _torch_pad(pads)
        summed = pool(F.pad(x, torch_pads), kernel, strides, 0, ceil_mode, True)
        if include_pad:
            return summed
        ones = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), torch_pads)
        return summed / pool(ones, kernel, strides, 0, ceil_mode, True)

    return fn


def _dilated_avg_pool(x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int],
                      pads: list[int], ceil_mode: bool, include_pad: bool) -> torch.Tensor:
    """Dilated AveragePool (torch's avg_pool has no dilation): a depthwise convolution with a dilated kernel of ones,
    divided by the number of counted positions under each window (ceil-mode overhang is never counted)."""
    n = len(kernel)
    ext = []
    for i in range(n):
        length = x.shape[2 + i] + pads[i] + pads[i + n]
        span = (kernel[i] - 1) * dilations[i] + 1
        steps = (length - span) / strides[i]
        out = (math.ceil(steps) if ceil_mode else math.floor(steps)) + 1
        if ceil_mode and (out - 1) * strides[i] >= x.shape[2 + i] + pads[i]:
            out -= 1  # a window may not start in the end padding
        ext.append(max(0, (out - 1) * strides[i] + span - length))
    channels = x.shape[1]
    conv = _CONV[n]
    ones = torch.ones((channels, 1, *kernel), dtype=x.dtype, device=x.device)
    full = _torch_pad(list(pads[:n]) + [e + p for e, p in zip(ext, pads[n:])])
    summed = conv(F.pad(x, full), ones, None, strides, 0, dilations, channels)
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if include_pad:  # padding counts, the ceil-mode overhang does not
        mask = F.pad(F.pad(mask, _torch_pad(pads)), _torch_pad([0] * n + ext))
    else:
        mask = F.pad(mask, full)
    count = conv(mask, ones[:1], None, strides, 0, dilations)
    return summed / count


@op("GlobalAveragePool")
def _global_avg_pool(spec: NodeSpec) -> Fn:
    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return F.adaptive_avg_pool2d(x, 1)
        return x.mean(tuple(range(2, x.dim())), keepdim=True)

    return fn


@op("GlobalMaxPool")
def _global_max_pool(spec: NodeSpec) -> Fn:
    return lambda x: x.amax(tuple(range(2, x.dim())), keepdim=True)


# ----------------------------------------------------------------------------------------------------- resizing


def _source_coords(out_len: int, in_len: int, scale: float, mode: str, roi: tuple[float, float]) -> np.ndarray:
    """Where output pixel i samples the input, per ONNX Resize's coordinate_transformation_mode. align_corners uses
    the integer output length as ONNX Runtime does (the ONNX reference uses ``in_len * scale`` when scales are given;
    the two differ only when that product is not an integer)."""
    x = np.arange(out_len, dtype=np.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_len > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * (in_len - 1) / (out_len - 1) if out_len > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nearest":
        return (x + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        offset = in_len * (1 - adjustment) / 2
        return offset + (x + 0.5) / scale - 0.5
    if mode == "tf_crop_and_resize":
        start, end = roi
        if out_len > 1:
            return start * (in_len - 1) + x * (end - start) * (in_len - 1) / (out_len - 1)
        return np.full_like(x, 0.5 * (start + end) * (in_len - 1))
    raise ValueError(mode)


def _nearest_index(src: np.ndarray, rule: str, in_len: int) -> np.ndarray:
    if rule == "round_prefer_floor":
        idx = np.ceil(src - 0.5)
    elif rule == "round_prefer_ceil":
        idx = np.floor(src + 0.5)
    elif rule == "floor":
        idx = np.floor(src)
    elif rule == "ceil":
        idx = np.ceil(src)
    else:
        raise ValueError(rule)
    return np.clip(idx, 0, in_len - 1).astype(np.int64)


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution weights for the taps at offsets -1, 0, 1, 2 around floor(src)."""
    dist = np.stack([1 + t, t, 1 - t, 2 - t], axis=-1)
    d = np.abs(dist)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


@dataclass
class _AxisPlan:
    """Gather indices and weights that resample one axis."""

    index: np.ndarray  # [out, taps]
    weight: np.ndarray | None  # [out, taps] or None (nearest)
    outside: np.ndarray | None = None  # [out] bool (tf_crop_and_resize extrapolation)


def _axis_plan(spec: NodeSpec, out_len: int, in_len: int, scale: float, roi: tuple[float, float]) -> _AxisPlan:
    mode = spec.attr("mode", "nearest")
    ctm = spec.attr("coordinate_transformation_mode", "half_pixel")
    if spec.opset < 11:
        ctm = "asymmetric"
    src = _source_coords(out_len, in_len, scale, ctm, roi)
    outside = None
    if ctm == "tf_crop_and_resize":
        outside = (src < 0) | (src > in_len - 1)
    if mode == "nearest":
        rule = spec.attr("nearest_mode", "round_prefer_floor")
        if spec.opset < 11:
            rule = "floor" if scale >= 1 else "ceil"
        return _AxisPlan(_nearest_index(src, rule, in_len)[:, None], None, outside)
    if mode == "linear":
        clipped = np.clip(src, 0, in_len - 1)
        i0 = np.floor(clipped)
        frac = clipped - i0
        i0 = i0.astype(np.int64)
        i1 = np.minimum(i0 + 1, in_len - 1)
        return _AxisPlan(np.stack([i0, i1], 1), np.stack([1 - frac, frac], 1), outside)
    if mode == "cubic":
        a = float(spec.attr("cubic_coeff_a", -0.75))
        base = np.floor(src)
        weights = _cubic_weights(src - base, a)
        index = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
        if spec.attr("exclude_outside", 0):
            inside = (index >= 0) & (index < in_len)
            weights = weights * inside
            weights = weights / weights.sum(1, keepdims=True)
        return _AxisPlan(np.clip(index, 0, in_len - 1), weights, outside)
    raise spec.unsupported(f"mode '{mode}'")


def _resample(x: torch.Tensor, axis: int, plan: _AxisPlan, extrapolation: float) -> torch.Tensor:
    index = torch.from_numpy(plan.index).to(x.device)
    taps = index.shape[1]
    gathered = torch.index_select(x, axis, index.reshape(-1))
    shape = list(x.shape)
    shape[axis:axis + 1] = [index.shape[0], taps]
    gathered = gathered.reshape(shape)
    if plan.weight is None:
        out = gathered.squeeze(axis + 1)
    else:
        wshape = [1] * len(shape)
        wshape[axis], wshape[axis + 1] = index.shape[0], taps
        weight = torch.from_numpy(plan.weight).to(device=x.device, dtype=x.dtype).reshape(wshape)
        out = (gathered * weight).sum(axis + 1)
    if plan.outside is not None and plan.outside.any():
        mshape = [1] * out.dim()
        mshape[axis] = -1
        mask = torch.from_numpy(plan.outside).to(x.device).reshape(mshape)
        out = out.masked_fill(mask, extrapolation)
    return out


@op("Resize", "Upsample", static=(1, 2, 3))
def _resize(spec: NodeSpec) -> Fn:
    mode = spec.attr("mode", "nearest")
    if mode == "bilinear":
        mode = "linear"
    spec.attrs["mode"] = mode
    if spec.node.op_type == "Upsample" or spec.opset < 11:
        spec.attrs["coordinate_transformation_mode"] = "asymmetric"
    ctm = spec.attr("coordinate_transformation_mode", "half_pixel")
    if spec.attr("antialias", 0):
        raise spec.unsupported("antialias=1")
    policy = spec.attr("keep_aspect_ratio_policy", "stretch")
    if policy not in ("stretch", "not_larger", "not_smaller"):
        raise spec.unsupported(f"keep_aspect_ratio_policy '{policy}'")
    axes_attr = spec.attr("axes")
    extrapolation = float(spec.attr("extrapolation_value", 0.0))
    legacy = spec.node.op_type == "Upsample" or spec.opset < 11
    cache: dict[tuple, list[tuple[int, _AxisPlan]]] = {}

    def plans(shape: tuple[int, ...], scales: list[float] | None, sizes: list[int] | None,
              roi: list[float] | None) -> list[tuple[int, _AxisPlan]]:
        key = (shape, tuple(scales or ()), tuple(sizes or ()), tuple(roi or ()))
        if key in cache:
            return cache[key]
        rank = len(shape)
        axes = [a % rank for a in axes_attr] if axes_attr else list(range(rank))
        out: list[tuple[int, _AxisPlan]] = []
        common = None
        if sizes and policy != "stretch":  # one scale for every resized axis, the output rounded from it
            ratios = [sizes[j] / shape[axis] for j, axis in enumerate(axes)]
            common = min(ratios) if policy == "not_larger" else max(ratios)
        for j, axis in enumerate(axes):
            in_len = shape[axis]
            r = (roi[j], roi[j + len(axes)]) if roi and len(roi) == 2 * len(axes) else (0.0, 1.0)
            if common is not None:
                scale = common
                out_len = int(math.floor(common * in_len + 0.5))
            elif sizes:
                out_len = sizes[j]
                scale = out_len / in_len
            else:
                scale = scales[j]
                length = in_len * (r[1] - r[0]) if ctm == "tf_crop_and_resize" else in_len
                out_len = int(math.floor(length * scale + 1e-9)) if legacy else int(math.floor(length * scale))
            if out_len == in_len and scale == 1.0 and ctm != "tf_crop_and_resize":
                continue
            out.append((axis, _axis_plan(spec, out_len, in_len, scale, r)))
        if len(cache) < 64:
            cache[key] = out
        return out

    def inputs_of(args: tuple) -> tuple[list[float] | None, list[int] | None, list[float] | None]:
        if spec.node.op_type == "Upsample":
            scales = spec.attr("scales")
            if scales is None:
                scales = floats(args[1])
            return list(scales), None, None
        if spec.opset < 11:  # Resize-10: X, scales
            return floats(args[1]), None, None
        roi = floats(args[1]) if len(args) > 1 and args[1] is not None and args[1].numel() else None
        scales = floats(args[2]) if len(args) > 2 and args[2] is not None and args[2].numel() else None
        sizes = ints(args[3]) if len(args) > 3 and args[3] is not None and args[3].numel() else None
        return scales, sizes, roi

    def fn(x: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        scales, sizes, roi = inputs_of((x, *rest))
        fast = _fast_resize(x, mode, ctm, spec, scales, sizes, axes_attr) if policy == "stretch" else None
        if fast is not None:
            return fast
        for axis, plan in plans(tuple(x.shape), scales, sizes, roi):
            x = _resample(x, axis, plan, extrapolation)
        return x

    return fn


def _fast_resize(x: torch.Tensor, mode: str, ctm: str, spec: NodeSpec, scales: list[float] | None,
                 sizes: list[int] | None, axes: Any) -> torch.Tensor | None:
    """F.interpolate for the cases where its arithmetic is ONNX's: 2-D nearest-asymmetric-floor upsampling by
    integer factors and bilinear with half_pixel/align_corners."""
    if axes or x.dim() != 4:
        return None
    if sizes:
        if list(sizes[:2]) != list(x.shape[:2]):
            return None
        out = list(sizes[2:])
        scale = [o / i for o, i in zip(out, x.shape[2:])]
    elif scales:
        if list(scales[:2]) != [1.0, 1.0]:
            return None
        scale = list(scales[2:])
        out = [int(math.floor(i * s)) for i, s in zip(x.shape[2:], scale)]
    else:
        return None
    if mode == "nearest":
        rule = spec.attr("nearest_mode", "round_prefer_floor") if spec.opset >= 11 else "floor"
        if ctm == "asymmetric" and rule == "floor" and all(s == int(s) and s >= 1 for s in scale):
            return F.interpolate(x, size=out, mode="nearest")
        return None
    if mode == "linear" and (ctm == "align_corners" or (ctm in ("half_pixel", "pytorch_half_pixel")
                                                        and all(o > 1 for o in out))):
        if sizes:
            return F.interpolate(x, size=out, mode="bilinear", align_corners=ctm == "align_corners")
        if ctm == "align_corners":
            return F.interpolate(x, size=out, mode="bilinear", align_corners=True)
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    return None


# ------------------------------------------------------------------------------------------------------- shapes


@op("Reshape", static=(1,))
def _reshape(spec: NodeSpec) -> Fn:
    allow_zero = bool(spec.attr("allowzero", 0))
    static = spec.attr("shape") if spec.opset < 5 else static_or(spec, 1)

    def target(x: torch.Tensor, shape: list[int]) -> list[int]:
        if allow_zero or 0 not in shape:
            return shape
        return [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]

    if static is not None:
        static = list(static)
        if allow_zero or 0 not in static:
            return lambda x, *_: x.reshape(static)
        return lambda x, *_: x.reshape(target(x, static))
    return lambda x, shape: x.reshape(target(x, ints(shape)))


@op("Flatten")
def _flatten(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 1))

    def fn(x: torch.Tensor) -> torch.Tensor:
        a = axis % x.dim() if axis < 0 else axis
        if a == 0:
            return x.reshape(1, -1)
        return x.reshape(math.prod(x.shape[:a]), -1)

    return fn


@op("Transpose")
def _transpose(spec: NodeSpec) -> Fn:
    perm = spec.attr("perm")
    if perm is None:
        return lambda x: x.permute(list(reversed(range(x.dim()))))
    perm = list(perm)
    return lambda x: x.permute(perm)


def _axes_arg(spec: NodeSpec, index: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or a build-time input; None when dynamic or absent."""
    if "axes" in spec.attrs:
        return list(spec.attrs["axes"])
    if spec.has(index):
        value = spec.const(index)
        return None if value is None else ints(value)
    return []


@op("Squeeze", static=(1,))
def _squeeze(spec: NodeSpec) -> Fn:
    axes = _axes_arg(spec, 1)

    def apply(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
        if not dims:
            return x.squeeze()
        return x.squeeze(tuple(d % x.dim() for d in dims))

    if axes is None:
        return lambda x, a: apply(x, ints(a))
    return lambda x, *_: apply(x, axes)


@op("Unsqueeze", static=(1,))
def _unsqueeze(spec: NodeSpec) -> Fn:
    axes = _axes_arg(spec, 1)

    def apply(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
        rank = x.dim() + len(dims)
        for d in sorted(d % rank for d in dims):
            x = x.unsqueeze(d)
        return x

    if axes is None:
        return lambda x, a: apply(x, ints(a))
    if len(axes) == 1:
        axis = axes[0]
        return lambda x, *_: x.unsqueeze(axis if axis >= 0 else axis + x.dim() + 1)
    return lambda x, *_: apply(x, axes)


@op("Concat")
def _concat(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 0))
    return lambda *xs: torch.cat([x for x in xs if x is not None], axis)


@op("Split", static=(1,))
def _split(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 0))
    n = len(spec.node.output)
    sizes = spec.attr("split")
    if sizes is None and spec.has(1):
        sizes = static_or(spec, 1)
    num = spec.attr("num_outputs")

    def fn(x: torch.Tensor, split: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        chunks = sizes if sizes is not None else (ints(split) if split is not None else None)
        if chunks is None:
            dim = x.shape[axis]
            size = -(-dim // (num or n))
            return tuple(torch.split(x, size, axis))
        return tuple(torch.split(x, list(chunks), axis))

    return fn


@op("Slice", static=(1, 2, 3, 4))
def _slice(spec: NodeSpec) -> Fn:
    if spec.opset < 10:
        starts, ends = list(spec.attr("starts")), list(spec.attr("ends"))
        axes = spec.attr("axes")
        steps: list[int] | None = None
        static = True
    else:
        starts = static_or(spec, 1)
        ends = static_or(spec, 2)
        axes = static_or(spec, 3) if spec.has(3) else None
        steps = static_or(spec, 4) if spec.has(4) else None
        static = (starts is not None and ends is not None and (axes is not None or not spec.has(3))
                  and (steps is not None or not spec.has(4)))

    def apply(x: torch.Tensor, st: list[int], en: list[int], ax: list[int] | None, sp: list[int] | None):
        ax = list(range(len(st))) if ax is None else [a % x.dim() for a in ax]
        sp = [1] * len(st) if sp is None else sp
        index: list[Any] = [slice(None)] * x.dim()
        flips: list[tuple[int, int, int, int]] = []
        for s, e, a, step in zip(st, en, ax, sp):
            if step > 0:
                index[a] = slice(s, e, step)
            else:
                flips.append((s, e, a, step))
        y = x[tuple(index)]
        for s, e, a, step in flips:
            dim = y.shape[a]
            s = min(max(s + dim if s < 0 else s, -1), dim - 1)
            e = min(max(e + dim if e < 0 else e, -1), dim - 1)
            idx = torch.arange(s, e, step, device=y.device)
            y = torch.index_select(y, a, idx)
        return y

    if static:
        return lambda x, *_: apply(x, starts, ends, axes, steps)

    def dynamic(x: torch.Tensor, st: torch.Tensor, en: torch.Tensor, ax: torch.Tensor | None = None,
                sp: torch.Tensor | None = None) -> torch.Tensor:
        return apply(x, ints(st), ints(en), None if ax is None else ints(ax), None if sp is None else ints(sp))

    return dynamic


@op("Shape")
def _shape(spec: NodeSpec) -> Fn:
    start = spec.attr("start", 0)
    end = spec.attr("end")

    def fn(x: torch.Tensor) -> torch.Tensor:
        dims = list(x.shape)[start:end] if end is not None else list(x.shape)[start:]
        return torch.tensor(dims, dtype=torch.int64, device=x.device)

    return fn


@op("Size")
def _size(spec: NodeSpec) -> Fn:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@op("Gather", static=(1,), weights=(0,))
def _gather(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 0))
    index = spec.const(1)

    def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a = axis % x.dim()
        if idx.dim() == 0:
            return x.select(a, int(idx))
        flat = idx.reshape(-1).to(x.device)
        flat = torch.where(flat < 0, flat + x.shape[a], flat)
        out = torch.index_select(x, a, flat)
        return out.reshape(list(x.shape[:a]) + list(idx.shape) + list(x.shape[a + 1:]))

    if index is not None and index.ndim == 0:
        i = int(index)
        return lambda x, _: x.select(axis % x.dim(), i)
    return gather


@op("GatherElements", static=(1,))
def _gather_elements(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 0))

    def fn(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
        return torch.gather(x, axis, idx)

    return fn


@op("Cast")
def _cast(spec: NodeSpec) -> Fn:
    to = int(spec.attr("to"))
    if to not in DTYPES:
        raise spec.unsupported(f"cast to element type {to}")
    dtype = DTYPES[to]
    return lambda x: x.to(dtype)


@op("CastLike")
def _cast_like(spec: NodeSpec) -> Fn:
    return lambda x, like: x.to(like.dtype)


@op("ConstantOfShape", static=(0,))
def _constant_of_shape(spec: NodeSpec) -> Fn:
    value = spec.attr("value")
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    dtype = torch.from_numpy(fill.copy()).dtype
    item = fill[0].item()
    return lambda shape: torch.full(ints(shape), item, dtype=dtype, device=shape.device)


@op("Range", static=(0, 1, 2))
def _range(spec: NodeSpec) -> Fn:
    def fn(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)

    return fn


@op("Expand", static=(1,))
def _expand(spec: NodeSpec) -> Fn:
    def fn(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(shape))))

    return fn


@op("Tile", static=(1, 2))
def _tile(spec: NodeSpec) -> Fn:
    return lambda x, repeats, *_: x.repeat(ints(repeats))


@op("Pad", static=(1, 2, 3))
def _pad(spec: NodeSpec) -> Fn:
    mode = spec.attr("mode", "constant")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise spec.unsupported(f"mode '{mode}'")
    attr_pads = spec.attr("pads", spec.attr("paddings"))
    attr_value = float(spec.attr("value", 0.0))

    def fn(x: torch.Tensor, pads: torch.Tensor | None = None, value: torch.Tensor | None = None,
           axes: torch.Tensor | None = None) -> torch.Tensor:
        p = list(attr_pads) if spec.opset < 11 else ints(pads)
        rank = x.dim()
        if axes is not None:
            ax = [a % rank for a in ints(axes)]
            full = [0] * (2 * rank)
            for j, a in enumerate(ax):
                full[a], full[a + rank] = p[j], p[j + len(ax)]
            p = full
        torch_pads = _torch_pad(p)
        while len(torch_pads) > 2 and torch_pads[-1] == 0 and torch_pads[-2] == 0:
            torch_pads = torch_pads[:-2]
        if torch_mode == "constant":
            fill = attr_value if spec.opset < 11 else (value.reshape(-1)[0].item() if value is not None
                                                         and value.numel() else 0.0)
            return F.pad(x, torch_pads, value=fill)
        return F.pad(x, torch_pads, mode=torch_mode)

    return fn


@op("DepthToSpace")
def _depth_to_space(spec: NodeSpec) -> Fn:
    b = int(spec.attr("blocksize"))
    crd = spec.attr("mode", "DCR") == "CRD"

    def fn(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if crd:
            return F.pixel_shuffle(x, b)
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, c // (b * b), h * b, w * b)

    return fn


@op("SpaceToDepth")
def _space_to_depth(spec: NodeSpec) -> Fn:
    b = int(spec.attr("blocksize"))
    if spec.attr("mode", "DCR") == "CRD":
        return lambda x: F.pixel_unshuffle(x, b)

    def fn(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)

    return fn


# ----------------------------------------------------------------------------------------------------- reductions


def _reduce(spec: NodeSpec, fn: Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]) -> Fn:
    keepdims = bool(spec.attr("keepdims", 1))
    noop = bool(spec.attr("noop_with_empty_axes", 0))
    axes = _axes_arg(spec, 1)

    def apply(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
        if not dims:
            if noop:
                return x
            dims = list(range(x.dim()))
        return fn(x, tuple(d % x.dim() for d in dims), keepdims)

    if axes is None:
        return lambda x, a: apply(x, ints(a))
    return lambda x, *_: apply(x, axes)


def _extreme(x: torch.Tensor, dims: tuple[int, ...], keep: bool, fn: Fn, empty: float) -> torch.Tensor:
    """amax/amin, with ONNX's identity element (-inf/inf, or the type's limit) over empty axes."""
    if all(x.shape[d] for d in dims):
        return fn(x, dims, keepdim=keep)
    shape = [1 if d in dims else n for d, n in enumerate(x.shape)] if keep else \
        [n for d, n in enumerate(x.shape) if d not in dims]
    if x.dtype == torch.bool:
        return torch.full(shape, empty > 0, dtype=x.dtype, device=x.device)  # any() / all()
    if not x.is_floating_point():
        info = torch.iinfo(x.dtype)
        empty = info.min if empty < 0 else info.max
    return torch.full(shape, empty, dtype=x.dtype, device=x.device)


def _prod(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


_REDUCERS: dict[str, Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]] = {
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMax": lambda x, d, k: _extreme(x, d, k, torch.amax, float("-inf")),
    "ReduceMin": lambda x, d, k: _extreme(x, d, k, torch.amin, float("inf")),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt((x * x).sum(d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(x.sum(d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _reduce_builder(spec: NodeSpec) -> Fn:
    return _reduce(spec, _REDUCERS[spec.node.op_type])


for _name in _REDUCERS:
    op(_name, static=(1,))(_reduce_builder)


@op("ArgMax", "ArgMin")
def _argmax(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 0))
    keep = bool(spec.attr("keepdims", 1))
    last = bool(spec.attr("select_last_index", 0))
    fn = torch.argmax if spec.node.op_type == "ArgMax" else torch.argmin

    def apply(x: torch.Tensor) -> torch.Tensor:
        if not last:
            return fn(x, axis, keepdim=keep)
        a = axis % x.dim()
        return x.shape[a] - 1 - fn(x.flip(a), a, keepdim=keep)

    return apply


@op("TopK", static=(1,))
def _topk(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", -1))
    largest = bool(spec.attr("largest", 1))
    ordered = bool(spec.attr("sorted", 1))

    def fn(x: torch.Tensor, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        count = int(spec.attr("k")) if spec.opset < 10 else ints(k)[0]
        values, indices = torch.sort(x, stable=True, dim=axis, descending=largest)  # ties: lower index first, as ORT
        return values.narrow(axis, 0, count), indices.narrow(axis, 0, count)

    return fn


@op("CumSum", static=(1,))
def _cumsum(spec: NodeSpec) -> Fn:
    exclusive = bool(spec.attr("exclusive", 0))
    reverse = bool(spec.attr("reverse", 0))

    def fn(x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        a = ints(axis)[0] % x.dim()
        y = x.flip(a) if reverse else x
        out = torch.cumsum(y, a)
        if exclusive:
            out = out - y
        return out.flip(a) if reverse else out

    return fn


# --------------------------------------------------------------------------------------------------- quantization


def _qparams(spec: NodeSpec) -> tuple[int, int, int]:
    axis = int(spec.attr("axis", 1))
    if spec.attr("block_size", 0):
        raise spec.unsupported("blocked quantization (block_size)")
    zp = spec.const(2) if spec.has(2) else None
    elem = spec.attr("output_dtype")
    if zp is not None and zp.dtype.kind not in "iu":
        raise spec.unsupported(f"zero point of type {zp.dtype}")
    qmin, qmax = quant.qrange(zp, elem if elem else None)
    return axis, qmin, qmax


@op("QuantizeLinear", static=(1, 2))
def _quantize_linear(spec: NodeSpec) -> Fn:
    axis, qmin, qmax = _qparams(spec)
    dynamic_zp = spec.has(2) and spec.const(2) is None

    def fn(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
        stochastic = MODE.training and MODE.stochastic
        lo, hi = qmin, qmax
        if dynamic_zp and zp is not None and not zp.is_floating_point():
            info = torch.iinfo(zp.dtype)
            lo, hi = info.min, info.max
        return quant.quantize(x, scale.to(x.dtype), zp, lo, hi, axis, stochastic)

    return fn


@op("DequantizeLinear", static=(1, 2))
def _dequantize_linear(spec: NodeSpec) -> Fn:
    axis, qmin, qmax = _qparams(spec)
    if spec.qweight is not None:  # input 0 is a float parameter standing for the integer weight
        info = np.iinfo(spec.qweight)  # the integer type is the weight's, whatever the zero point says
        qmin, qmax = int(info.min), int(info.max)
        def weight(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
            stochastic = MODE.training and MODE.stochastic
            return quant.fake_quant(w, scale.to(w.dtype), zp, qmin, qmax, axis, stochastic)

        return weight

    def fn(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
        return quant.dequantize(x, scale, zp, axis)

    return fn


#: Operators folded at build time when all their inputs are build-time constants (none of them trainable).
FOLDABLE = frozenset({
    "Shape", "Size", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Reshape", "ConstantOfShape",
    "Range", "Add", "Sub", "Mul", "Div", "Equal", "Where", "Expand", "Identity", "Transpose", "Flatten", "Neg",
    "Abs", "Sqrt", "Floor", "Ceil", "Max", "Min", "ReduceProd", "Not", "And", "Less", "Greater", "Tile", "Split",
    "DequantizeLinear", "Sum", "Pow", "Sign",
})

#: Operators whose outputs are shape arithmetic when all their inputs are (cached per input-shape signature).
SHAPE_ARITHMETIC = frozenset({
    "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Reshape", "ConstantOfShape", "Range", "Add", "Sub",
    "Mul", "Div", "Equal", "Where", "Expand", "Identity", "Neg", "Abs", "Floor", "Ceil", "Max", "Min", "ReduceProd",
    "Not", "And", "Less", "Greater", "Sum", "Sqrt", "Mod", "Flatten", "Transpose", "Tile", "Split", "Sign",
})

#: op type -> inputs whose values decide output shapes (if one comes from data, shapes depend on data).
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Resize": (1, 2, 3), "Upsample": (1,),
    "Pad": (1, 3), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "TopK": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
    "ReduceL1": (1,), "ReduceL2": (1,), "ReduceSumSquare": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,),
}

#: Operators whose output shape depends on input values even with fixed shape inputs.
DATA_DEPENDENT_SHAPES = frozenset({"NonZero", "Unique", "Compress", "NonMaxSuppression"})

#: Control-flow operators: named in the error message.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
