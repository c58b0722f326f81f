"""The workloads' small models (CNN-F and the ResNet block come from ``arturo_bench.models``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..models import BasicBlock

__all__ = ["mlp", "TinyResNet", "CharTransformer", "RowGRU", "autoencoder"]


def mlp(widths: list[int], *, out_activation: nn.Module | None = None) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (flattening the input)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    if out_activation is not None:
        layers.append(out_activation)
    return nn.Sequential(*layers)


def autoencoder() -> nn.Sequential:
    """784 -> 128 -> 32 -> 128 -> 784, pixels in [0, 1] out."""
    return mlp([784, 128, 32, 128, 784], out_activation=nn.Sigmoid())


class TinyResNet(nn.Module):
    """A 3x3 stem and three stages of one BasicBlock each (16/32/64 channels, strides 1/2/2),
    BatchNorm throughout, global average pooling and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.Sequential(
            BasicBlock(16, 16), BasicBlock(16, 32, stride=2), BasicBlock(32, 64, stride=2)
        )
        self.head = nn.Linear(64, num_classes)
        # torchvision's initialisation, as for the paper's ResNets.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """A decoder-only character language model with learned positions: (B, T) token ids ->
    (B, T, vocab) next-token logits."""

    def __init__(
        self, vocab: int, *, d_model: int = 64, heads: int = 4, layers: int = 2, context: int = 64
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(context, d_model) * 0.02)
        self.blocks = nn.Sequential(*[_Block(d_model, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


class RowGRU(nn.Module):
    """Reads an image one row per time step; classifies from the last hidden state."""

    def __init__(self, row_size: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.gru = nn.GRU(row_size, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        _, last = self.gru(images)  # images: (B, rows, row_size)
        return self.head(last[-1])
