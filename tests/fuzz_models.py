"""Hypothesis strategies for random conv nets as ONNX models, for property tests of passes and the bridge.

``conv_nets()`` draws a :class:`FuzzNet`: a stem conv, then blocks drawn from plain conv (+BN, +activation),
depthwise, grouped, residual, concat (two branches), squeeze-and-excitation, optional max/average pooling, and a
head (GlobalAveragePool -> Flatten -> Gemm, or MatMul + Add, optionally two layers), at an opset from 11 to 17,
with weights as initializers or Constant nodes (PaddlePaddle style) and named or unnamed nodes. The model passes
the full ONNX checker and runs in ONNX Runtime (input ``input`` [N, 3, H, W], output ``logits`` [N, classes]).

Everything random is drawn from hypothesis (the structure) or from a drawn seed (the weights), so a failing example
shrinks and replays. Usage::

    from hypothesis import given
    from fuzz_models import conv_nets, FUZZ_SETTINGS

    @FUZZ_SETTINGS
    @given(net=conv_nets())
    def test_something(net): ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from onnx_builders import GraphBuilder

#: Bounded and deterministic: the same examples on every run, no deadline (ORT/session start-up varies).
FUZZ_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BLOCKS = ("conv", "depthwise", "grouped", "residual", "concat", "se", "pool")
ACTIVATIONS = ("relu", "relu6", "hardswish", "swish", "leaky", "none")


@dataclass
class FuzzNet:
    model: onnx.ModelProto
    opset: int
    size: int
    classes: int
    blocks: list[str] = field(default_factory=list)

    @property
    def input_name(self) -> str:
        return "input"

    def feeds(self, batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"input": rng.standard_normal((batch, 3, self.size, self.size)).astype(np.float32)}

    def describe(self) -> str:
        return f"opset {self.opset}, {self.size}x{self.size}, blocks: {', '.join(self.blocks)}"


class _Net:
    """Build state: the GraphBuilder, the current value and its channel count and spatial size."""

    def __init__(self, builder: GraphBuilder, opset: int, size: int):
        self.b = builder
        self.opset = opset
        self.size = size

    def activation(self, x: str, kind: str) -> str:
        b = self.b
        if kind == "relu":
            return b.node("Relu", [x])
        if kind == "relu6":
            return b.node("Clip", [x, b.weight(b.fresh("lo"), np.array(0.0, np.float32)),
                                   b.weight(b.fresh("hi"), np.array(6.0, np.float32))])
        if kind == "hardswish":
            if self.opset >= 14:
                return b.node("HardSwish", [x])
            return b.node("Mul", [x, b.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])
        if kind == "swish":
            return b.node("Mul", [x, b.node("Sigmoid", [x])])
        if kind == "leaky":
            return b.node("LeakyRelu", [x], alpha=0.1)
        return x

    def conv(self, x: str, cin: int, cout: int, kernel: int, groups: int, bn: bool, act: str,
             stride: int = 1) -> str:
        y = self.b.conv(x, cin, cout, kernel, bias=not bn, groups=groups, strides=[stride, stride])
        if bn:
            y = self.b.batchnorm(y, cout)
        return self.activation(y, act)


@st.composite
def conv_nets(draw: st.DrawFn, opsets: Sequence[int] = tuple(range(11, 18)), max_blocks: int = 4,
              sizes: Sequence[int] = (8, 12, 16), blocks: Sequence[str] = BLOCKS) -> FuzzNet:
    """A random conv classifier (see the module docstring)."""
    opset = draw(st.sampled_from(list(opsets)))
    size = draw(st.sampled_from(list(sizes)))
    classes = draw(st.integers(2, 10))
    seed = draw(st.integers(0, 2**16))
    weights_as = draw(st.sampled_from(["initializer", "initializer", "constant"]))
    named = draw(st.booleans())
    builder = GraphBuilder("fuzz", opset=opset, seed=seed, named=named, weights_as=weights_as)
    net = _Net(builder, opset, size)
    x = builder.input("input", ["N", 3, size, size])
    channels = draw(st.sampled_from([4, 8, 12, 16]))
    x = net.conv(x, 3, channels, 3, 1, draw(st.booleans()), draw(st.sampled_from(ACTIVATIONS[:4])))
    used = ["stem"]
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(st.sampled_from(list(blocks)))
        bn = draw(st.booleans())
        act = draw(st.sampled_from(ACTIVATIONS))
        if kind == "conv":
            cout = draw(st.sampled_from([4, 8, 12, 16]))
            kernel = draw(st.sampled_from([1, 3]))
            stride = 2 if net.size >= 8 and draw(st.booleans()) else 1
            x = net.conv(x, channels, cout, kernel, 1, bn, act, stride)
            net.size = (net.size + 1) // 2 if stride == 2 else net.size
            channels = cout
        elif kind == "depthwise":
            x = net.conv(x, channels, channels, 3, channels, bn, act)
        elif kind == "grouped":
            groups = draw(st.sampled_from([g for g in (2, 4) if channels % g == 0]))
            cout = channels * draw(st.sampled_from([1, 2]))
            x = net.conv(x, channels, cout, 3, groups, bn, act)
            channels = cout
        elif kind == "residual":
            y = net.conv(x, channels, channels, 3, 1, bn, act)
            y = net.conv(y, channels, channels, draw(st.sampled_from([1, 3])), 1, bn, "none")
            x = net.activation(builder.node("Add", [x, y]), draw(st.sampled_from(["relu", "none"])))
        elif kind == "concat":
            left_c, right_c = draw(st.sampled_from([2, 4, 8])), draw(st.sampled_from([2, 4, 8]))
            left = net.conv(x, channels, left_c, 1, 1, bn, act)
            right = net.conv(x, channels, right_c, 3, 1, bn, act)
            x = builder.node("Concat", [left, right], axis=1)
            channels = left_c + right_c
        elif kind == "se":
            squeezed = max(1, channels // 4)
            s = builder.node("GlobalAveragePool", [x])
            s = builder.node("Relu", [builder.conv(s, channels, squeezed, 1)])
            s = builder.node("Sigmoid", [builder.conv(s, squeezed, channels, 1)])
            x = builder.node("Mul", [x, s])
        elif kind == "pool":
            if net.size < 4:
                continue
            op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            x = builder.node(op, [x], kernel_shape=[2, 2], strides=[2, 2])
            net.size //= 2
        used.append(kind + ("+bn" if bn and kind not in ("se", "pool") else ""))
    x = builder.node("GlobalAveragePool", [x])
    x = builder.node("Flatten", [x])
    hidden = draw(st.sampled_from([0, 0, 16]))
    head = draw(st.sampled_from(["gemm", "matmul"]))
    for cin, cout in ([(channels, hidden), (hidden, classes)] if hidden else [(channels, classes)]):
        w = builder.weight(builder.fresh("fc_w"), (cout, cin) if head == "gemm" else (cin, cout), scale=0.5)
        bias = builder.weight(builder.fresh("fc_b"), (cout,), scale=0.1)
        if head == "gemm":
            x = builder.node("Gemm", [x, w, bias], transB=1)
        else:
            x = builder.node("Add", [builder.node("MatMul", [x, w]), bias])
        if cout != classes:
            x = builder.node("Relu", [x])
    used.append(f"{head}_head" + ("x2" if hidden else ""))
    builder.nodes[-1].output[0] = "logits"
    builder.output("logits", ["N", classes])
    model = builder.build()
    onnx.checker.check_model(model, full_check=True)
    return FuzzNet(model, opset, size, classes, used)


def corrupt(data: bytes, flips: Sequence[tuple[int, int]], truncate_at: int | None) -> bytes:
    """``data`` with byte ``i`` xor-ed by ``mask`` for each (i, mask) (i taken modulo the length), then cut."""
    buffer = bytearray(data)
    for index, mask in flips:
        buffer[index % len(buffer)] ^= mask or 1
    if truncate_at is not None:
        buffer = buffer[: truncate_at % (len(buffer) + 1)]
    return bytes(buffer)


@st.composite
def corruptions(draw: st.DrawFn, max_flips: int = 8) -> tuple[list[tuple[int, int]], int | None]:
    """Random byte flips and an optional truncation point for :func:`corrupt`."""
    flips = draw(st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), max_size=max_flips))
    truncate_at = draw(st.one_of(st.none(), st.integers(0, 2**20)))
    return flips, truncate_at
