"""The example zoo: small torch classifiers in the style of common vision networks.

Every net takes ``[N, 3, 32, 32]`` float images (normalized, the same convention as ``onnxopt/examples/digits_*.npz``)
and returns ``[N, 10]`` logits. They are small enough to train on a laptop CPU in a minute or two, yet have the
structures onnxopt's passes work on: Conv -> BatchNorm pairs, depthwise convolutions, ReLU6, residual adds, channel
split/concat/shuffle, MaxPool and a fully connected head.

:class:`MobileNetV2Digits` is the shipped example model (``examples/build_default_model.py``); every net here is
trained the same way by ``examples/build_zoo.py`` into the example zoo (``onnxopt/zoo/models/``). The benchmarks and
tests export them (some scaled down through the constructors' keywords) with :func:`export_onnx`.

This module imports torch at top level; nothing else under ``onnxopt/`` imports it (``onnxopt.zoo`` itself does not).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

NUM_CLASSES = 10
IN_CHANNELS = 3
IMAGE_SIZE = 32


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv without bias + BatchNorm (+ activation): the shape most model-zoo exports have, and what BN folding eats."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion (skipped when expand == 1), 3x3 depthwise, linear 1x1 projection, and a
    residual add when stride and channel count allow it."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


#: (expansion, output channels, repeats, first stride) per stage, MobileNetV2's table scaled down for 32x32 inputs.
MOBILENETV2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),   # 32x32
    (6, 24, 2, 2),   # 16x16
    (6, 32, 3, 2),   # 8x8
    (6, 64, 2, 2),   # 4x4
    (6, 96, 1, 1),   # 4x4
)


class PooledHead(nn.Module):
    """Base of the nets that end ``features`` -> global average pool -> Dropout -> Linear ``classifier``."""

    def _set_head(self, layers: list[nn.Module], head: int, num_classes: int, dropout: float) -> None:
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(self.dropout(x))


class MobileNetV2Digits(PooledHead):
    """MobileNetV2-style net for 32x32 inputs: stride-1 stem, 9 inverted residual blocks (5 with residual adds),
    1x1 head conv, global average pool, Linear. About 0.2 M parameters and 12 M MACs per 32x32 image."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = IN_CHANNELS, stem: int = 16,
                 stages: Sequence[tuple[int, int, int, int]] = MOBILENETV2_STAGES, head: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(in_channels, stem, 3, 1, act=nn.ReLU6)]
        cin = stem
        for expand, cout, repeats, stride in stages:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(conv_bn(cin, head, 1, act=nn.ReLU6))
        self._set_head(layers, head, num_classes, dropout)


# --------------------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetDigits(nn.Module):
    """CIFAR-style ResNet (16/32/64 channels, two basic blocks per stage by default) with a stride-2 stem."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = IN_CHANNELS,
                 widths: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (2, 2, 2)):
        super().__init__()
        self.stem = conv_bn(in_channels, widths[0], 3, 2)
        layers: list[nn.Module] = []
        cin = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for i in range(count):
                layers.append(BasicBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channel groups (Reshape -> Transpose -> Reshape in ONNX)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split channels in half (stride 1) or run two branches (stride 2), concat, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        branch = cout // 2
        right_in = cin // 2 if stride == 1 else cin
        self.right = nn.Sequential(
            conv_bn(right_in, branch, 1),
            conv_bn(branch, branch, 3, stride, groups=branch, act=None),
            conv_bn(branch, branch, 1),
        )
        self.left = (
            nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, branch, 1))
            if stride == 2
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.left is None:
            left, right = x.chunk(2, dim=1)
        else:
            left, right = self.left(x), x
        return channel_shuffle(torch.cat([left, self.right(right)], dim=1), 2)


class ShuffleNetV2Digits(nn.Module):
    """ShuffleNetV2-style net: conv stem + MaxPool-free 32x32 start, three stages of shuffle units, 1x1 head."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = IN_CHANNELS,
                 widths: Sequence[int] = (48, 96, 192), repeats: Sequence[int] = (2, 3, 2), head: int = 256):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, 24, 3, 1), nn.MaxPool2d(3, 2, 1))  # 16x16
        units: list[nn.Module] = []
        cin = 24
        for width, count in zip(widths, repeats):
            for i in range(count):
                units.append(ShuffleUnit(cin, width, 2 if i == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*units)
        self.head = conv_bn(cin, head, 1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------------------------ VGG


class VGGDigits(nn.Module):
    """Tiny VGG: stages of 3x3 conv + BN + ReLU followed by 2x2 MaxPool, then Flatten and a two-layer MLP head
    (the one net here whose parameters sit mostly in fully connected layers)."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = IN_CHANNELS,
                 stages: Sequence[Sequence[int]] = ((16,), (32, 32), (64, 64)), hidden: int = 128,
                 dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for stage in stages:
            for width in stage:
                layers.append(conv_bn(cin, width, 3))
                cin = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** len(stages)
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(cin * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# -------------------------------------------------------------------------------------------------------- MnasNet


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global average pool, 1x1 reduce + ReLU, 1x1 expand + Sigmoid, channel-wise scale."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        squeezed = max(8, channels // reduction)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class MBConv(nn.Module):
    """MnasNet's mobile inverted bottleneck: 1x1 expansion + ReLU, ``kernel`` x ``kernel`` depthwise + ReLU, optional
    squeeze-and-excitation, linear 1x1 projection, residual add when stride and channel count allow it."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, se: bool = False):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, kernel, stride, groups=hidden),
        ]
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


#: (expansion, output channels, repeats, first stride, depthwise kernel) per stage: MnasNet-A1's pattern of 3x3 and
#: 5x5 depthwise kernels with expansions 3 and 6, scaled down for 32x32 inputs.
MNASNET_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 24, 2, 2, 3),   # 16x16
    (3, 40, 2, 2, 5),   # 8x8
    (6, 64, 2, 2, 3),   # 4x4
    (6, 96, 1, 1, 5),   # 4x4
)


class MnasNetDigits(PooledHead):
    """MnasNet-style net for 32x32 inputs: stride-1 stem, a separable conv (3x3 depthwise + 1x1), MBConv stages with
    3x3 / 5x5 depthwise kernels (squeeze-and-excitation off unless ``se=True``), 1x1 head, average pool, Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = IN_CHANNELS, stem: int = 16,
                 stages: Sequence[tuple[int, int, int, int, int]] = MNASNET_STAGES, head: int = 256,
                 se: bool = False, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [
            conv_bn(in_channels, stem, 3, 1),
            conv_bn(stem, stem, 3, 1, groups=stem),
            conv_bn(stem, stem, 1, act=None),
        ]
        cin = stem
        for expand, cout, repeats, stride, kernel in stages:
            for i in range(repeats):
                layers.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand, se=se))
                cin = cout
        layers.append(conv_bn(cin, head, 1))
        self._set_head(layers, head, num_classes, dropout)


# ------------------------------------------------------------------------------------------------------- registry

#: name -> constructor; every constructor takes (num_classes, in_channels) keywords and builds a 32x32 classifier.
NETS: dict[str, Callable[..., nn.Module]] = {
    "mobilenetv2": MobileNetV2Digits,
    "mnasnet": MnasNetDigits,
    "resnet": ResNetDigits,
    "shufflenetv2": ShuffleNetV2Digits,
    "vgg": VGGDigits,
}


def build(name: str, *, seed: int = 0, num_classes: int = NUM_CLASSES, in_channels: int = IN_CHANNELS,
          **options: object) -> nn.Module:
    """A freshly initialized net ``name`` (``options``: its constructor's keywords, e.g. widths); the seed makes its
    initial weights reproducible."""
    if name not in NETS:
        raise KeyError(f"unknown net '{name}' (known: {', '.join(NETS)})")
    torch.manual_seed(seed)
    return NETS[name](num_classes=num_classes, in_channels=in_channels, **options)


def count_params(net: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def count_macs(net: nn.Module, in_channels: int = IN_CHANNELS, size: int = IMAGE_SIZE) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one ``size`` x ``size`` image (BN, pooling, adds and
    activations are not counted, as is usual)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() // output.shape[0] * (module.in_channels // module.groups) * kernel

    def linear_hook(module: nn.Linear, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    handles = []
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, in_channels, size, size))
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    return total


# --------------------------------------------------------------------------------------------------------- export


def export_onnx(net: nn.Module, path: str | Path | None = None, *, opset: int = 13,
                example_shape: Sequence[int] = (1, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), input_name: str = "input",
                output_name: str = "logits") -> bytes:
    """Export ``net`` in eval mode with the TorchScript exporter, a dynamic batch dim and every BatchNormalization
    node kept; returns the ONNX bytes (also written to ``path`` when given).

    Checked with torch 2.13: only the defaults (``TrainingMode.EVAL`` with constant folding) fuse every Conv -> BN
    pair; ``training=PRESERVE`` or ``do_constant_folding=False`` alone keeps all BatchNormalization nodes. Both are
    set: PRESERVE exports the module's own (eval) mode, so BN has its single inference output and Dropout becomes
    Identity, and without folding the graph is what the exporter saw (Clip bounds stay Constant nodes). That leaves
    onnxopt's own BN folding something to do.

    The result must pass the ONNX checker's full check (``onnx.checker.ValidationError`` otherwise); RuntimeError when
    a BatchNormalization node was lost or a Dropout node remains.
    """
    import onnx

    example = torch.zeros(*example_shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            net.eval(),
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
        )
    data = buffer.getvalue()
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    batchnorms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    expected = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    if len(batchnorms) != expected or any(len(n.output) != 1 for n in batchnorms):
        raise RuntimeError(f"export kept {len(batchnorms)} inference-mode BatchNormalization nodes, "
                           f"expected {expected}")
    if any(n.op_type == "Dropout" for n in model.graph.node):
        raise RuntimeError("export contains Dropout: the graph is not in eval mode")
    if path is not None:
        Path(path).write_bytes(data)
    return data
