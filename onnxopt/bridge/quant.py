"""Fake quantization for QuantizeLinear/DequantizeLinear with a straight-through estimator.

A QuantizeLinear output is carried as a float tensor holding the integer codes, so that the following
DequantizeLinear is plain float arithmetic and autograd sees ``(clamp(round(x / s) + zp) - zp) * s``: the rounding
passes its gradient straight through (STE), the clamp cuts it outside the integer range, and a trainable scale gets
the LSQ gradient (Esser et al. 2019) from the same expression.
"""

from __future__ import annotations

import numpy as np
import torch

#: ONNX integer element type -> (qmin, qmax).
QRANGES: dict[int, tuple[int, int]] = {2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767)}


def qrange(zero_point: np.ndarray | None, elem_type: int | None = None) -> tuple[int, int]:
    """Integer range of the quantized type, taken from the zero point's dtype (uint8 when absent, as ONNX says)."""
    if elem_type is not None and elem_type in QRANGES:
        return QRANGES[elem_type]
    if zero_point is None:
        return QRANGES[2]
    info = np.iinfo(zero_point.dtype)
    return int(info.min), int(info.max)


def round_ste(x: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    """Round half to even (as ONNX does) in the forward pass, identity in the backward pass; stochastic rounding
    (Gupta et al. 2015) rounds up with probability equal to the fractional part."""
    if stochastic:
        rounded = torch.floor(x + torch.rand_like(x))
    else:
        rounded = torch.round(x)
    return x + (rounded - x).detach()


def per_axis(param: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape a 1-D per-axis scale or zero point so that it broadcasts along ``axis`` of ``x``."""
    if param.dim() != 1 or x.dim() == 0:
        return param
    axis = axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
             axis: int = 1, stochastic: bool = False) -> torch.Tensor:
    """QuantizeLinear as float codes: ``clamp(round(x / scale) + zero_point, qmin, qmax)`` with STE rounding."""
    scale = per_axis(scale, x, axis)
    codes = round_ste(x / scale, stochastic)
    if zero_point is not None:
        codes = codes + per_axis(zero_point, x, axis).to(codes.dtype)
    return torch.clamp(codes, qmin, qmax)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               axis: int = 1) -> torch.Tensor:
    """DequantizeLinear: ``(codes - zero_point) * scale`` on float codes (int inputs are converted first)."""
    scale = per_axis(scale, codes, axis)
    if not codes.is_floating_point():
        codes = codes.to(scale.dtype)
    if zero_point is not None:
        codes = codes - per_axis(zero_point, codes, axis).to(codes.dtype)
    return codes * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
               axis: int = 1, stochastic: bool = False) -> torch.Tensor:
    """Quantize then dequantize in float (what a trainable weight behind DequantizeLinear goes through)."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, axis, stochastic), scale, zero_point, axis)


def requantize_array(weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int,
                     dtype: np.dtype) -> np.ndarray:
    """The integer initializer for a trained float weight, with the original scale and zero point."""
    info = np.iinfo(dtype)
    scale = scale.astype(np.float32)
    zp = np.zeros((), np.int64) if zero_point is None else zero_point.astype(np.int64)
    if scale.ndim == 1 and weight.ndim > 0:
        shape = [1] * weight.ndim
        shape[axis % weight.ndim] = -1
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if zp.ndim == 1 else zp
    codes = np.rint(weight.astype(np.float32) / scale) + zp
    return np.clip(codes, info.min, info.max).astype(dtype)
