"""Small torch networks in the style of common vision models, exported to ONNX by test fixtures.

Each net takes ``[N, 3, 32, 32]`` images and returns ``[N, 10]`` logits. They are deliberately tiny (export and a
forward pass take well under a second) but contain the structures that onnxopt's passes must handle: BatchNorm after
Conv, depthwise convolutions, ReLU6, residual adds, channel split/concat/shuffle, LayerNorm, MatMul and Softmax.

torch is imported by whoever imports this module; import it only inside fixtures so that test collection works
without torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

NUM_CLASSES = 10
INPUT_SHAPE = (1, 3, 32, 32)


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU):
    """Conv (no bias, as exporters see it from most model zoos) + BatchNorm + optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1, act=nn.ReLU6),
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, cout, 1, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Tiny(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.ReLU6),
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4),
            conv_bn(32, 64, 1, act=nn.ReLU6),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class BasicBlock(nn.Module):
    """ResNet basic block with a 1x1 conv+BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetTiny(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 1)
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split channels (stride 1) or branch twice (stride 2), concat, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
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


class ShuffleNetV2Tiny(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.Sequential(ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1), ShuffleUnit(48, 96, 2))
        self.head = conv_bn(96, 128, 1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class TransformerBlockTiny(nn.Module):
    """Patch embedding + one pre-norm transformer block (hand-written attention: MatMul, Softmax) + mean pooling."""

    def __init__(self, dim: int = 32, heads: int = 4, patch: int = 4, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (32 // patch) ** 2, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # [N, T, D]
        n, t, d = tokens.shape
        q, k, v = self.qkv(self.norm1(tokens)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        mixed = (attn @ v).transpose(1, 2).reshape(n, t, d)
        tokens = tokens + self.proj(mixed)
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(self.norm_out(tokens).mean(dim=1))


#: name -> (constructor, ONNX opset used for export)
NETS: dict[str, tuple[type[nn.Module], int]] = {
    "mobilenetv2": (MobileNetV2Tiny, 11),
    "resnet": (ResNetTiny, 13),
    "shufflenetv2": (ShuffleNetV2Tiny, 13),
    "transformer": (TransformerBlockTiny, 17),
}


def randomize_norm_stats(module: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms, so that folding them is a real test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                c = layer.num_features
                layer.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
                layer.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                layer.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                layer.bias.copy_(torch.randn(c, generator=generator) * 0.1)


def build(name: str, seed: int = 0) -> nn.Module:
    """A deterministic, eval-mode instance of net ``name``."""
    constructor, _ = NETS[name]
    torch.manual_seed(seed)
    net = constructor()
    randomize_norm_stats(net, seed)
    return net.eval()


def export(name: str, path: str | Path, *, seed: int = 0, opset: int | None = None) -> Path:
    """Export net ``name`` with the TorchScript exporter, keeping BatchNormalization nodes and a dynamic batch dim."""
    net = build(name, seed)
    opset = opset or NETS[name][1]
    path = Path(path)
    example = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))
    torch.onnx.export(
        net,
        (example,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        # PRESERVE + no constant folding keeps Conv -> BatchNormalization pairs as the exporter saw them; the default
        # (EVAL) would fuse them, leaving nothing for onnxopt's own folding to do.
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    return path
