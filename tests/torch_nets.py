"""The torch exports of the test corpus: the example zoo's nets (:mod:`onnxopt.zoo.nets`) scaled down, plus a tiny
transformer block the zoo lacks.

Each net takes ``[N, 3, 32, 32]`` images and returns ``[N, 10]`` logits. They are deliberately tiny (export and a
forward pass take well under a second) but contain the structures that onnxopt's passes must handle: BatchNorm after
Conv, depthwise convolutions, ReLU6, residual adds, channel split/concat/shuffle, LayerNorm, MatMul and Softmax.

torch is imported by whoever imports this module; import it only inside fixtures so that test collection works
without torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from onnxopt.zoo import nets as zoo

NUM_CLASSES = zoo.NUM_CLASSES


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


#: name -> (constructor, ONNX opset used for export). The zoo nets are cut down to a few blocks; the BatchNorm counts
#: (14, 9, 15) are what tests/test_normalize.py expects the normalizer to fold.
NETS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    # stem + 4 inverted residuals with expansion (3 BN each) + head conv
    "mobilenetv2": (functools.partial(zoo.MobileNetV2Digits, stages=((4, 16, 1, 1), (4, 24, 2, 2), (4, 32, 1, 2)),
                                      head=64), 11),
    # stem + one basic block per stage (2, 3, 3 BN: the last two have a conv shortcut)
    "resnet": (functools.partial(zoo.ResNetDigits, blocks=(1, 1, 1)), 13),
    # stem + 3 shuffle units (5, 3, 5 BN) + head conv
    "shufflenetv2": (functools.partial(zoo.ShuffleNetV2Digits, widths=(48, 96), repeats=(2, 1), head=128), 13),
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
    """A deterministic, eval-mode instance of net ``name`` with randomized BatchNorm statistics."""
    constructor, _ = NETS[name]
    torch.manual_seed(seed)
    net = constructor()
    randomize_norm_stats(net, seed)
    return net.eval()


def export(name: str, path: str | Path, *, seed: int = 0, opset: int | None = None) -> Path:
    """Export net ``name`` with the zoo's exporter (BatchNormalization kept, dynamic batch dim) to ``path``."""
    path = Path(path)
    zoo.export_onnx(build(name, seed), path, opset=opset or NETS[name][1])
    return path
