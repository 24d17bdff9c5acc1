"""Models hpo builds: an MLP, a small CNN (1-D or 2-D), and a one-layer transformer for modular arithmetic.

Only this module and ``hpo.objectives`` import torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def mlp(in_features: int, layers: list[int], out_features: int, activation: str = "relu") -> nn.Sequential:
    """``[in, *layers, out]`` with ``activation`` between layers and none on the output (losses add it).

    The lesson's model is ``mlp(2, [10], 1)`` with the ``mse`` loss (sigmoid output).
    """
    mods: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in layers:
        mods += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    mods.append(nn.Linear(width, out_features))
    return nn.Sequential(*mods)


def cnn(
    input_shape: tuple[int, ...], channels: list[int], out_features: int, activation: str = "relu"
) -> nn.Sequential:
    """Conv -> activation -> max-pool per entry of ``channels``, then global average pooling and a linear head.

    ``input_shape`` is ``(C, L)`` for sequences (MNIST-1D) or ``(C, H, W)`` for images.
    """
    two_d = len(input_shape) == 3
    conv, pool, gap = (
        (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d) if two_d else (nn.Conv1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d)
    )
    mods: list[nn.Module] = []
    width = input_shape[0]
    size = min(input_shape[1:])
    for c in channels:
        mods += [conv(width, c, kernel_size=3, padding=1), ACTIVATIONS[activation]()]
        if size >= 4:
            mods.append(pool(2))
            size //= 2
        width = c
    mods += [gap(1), nn.Flatten(), nn.Linear(width, out_features)]
    return nn.Sequential(*mods)


class OperandMLP(nn.Module):
    """The grokking MLP: two one-hot operands concatenated (2p inputs), hidden layers, p outputs."""

    def __init__(self, p: int, layers: list[int], activation: str = "relu") -> None:
        super().__init__()
        self.p = p
        self.net = mlp(2 * p, layers, p, activation)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        onehot = torch.zeros(pairs.shape[0], 2 * self.p, device=pairs.device)
        onehot.scatter_(1, pairs[:, :1], 1.0)
        onehot.scatter_(1, pairs[:, 1:] + self.p, 1.0)
        return self.net(onehot)


class ModularTransformer(nn.Module):
    """The interpretability study's model: tokens ``a b =``, learned positions, attention + MLP blocks, no
    LayerNorm, read out at the ``=`` position."""

    def __init__(self, p: int, d_model: int = 128, n_heads: int = 4, d_mlp: int = 512, n_layers: int = 1) -> None:
        super().__init__()
        self.p = p
        self.embed = nn.Embedding(p + 1, d_model)
        self.pos = nn.Parameter(torch.randn(3, d_model) / math.sqrt(d_model))
        self.attn = nn.ModuleList(
            nn.MultiheadAttention(d_model, n_heads, bias=True, batch_first=True) for _ in range(n_layers)
        )
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, d_mlp), nn.ReLU(), nn.Linear(d_mlp, d_model)) for _ in range(n_layers)
        )
        self.unembed = nn.Linear(d_model, p, bias=False)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        eq = torch.full((pairs.shape[0], 1), self.p, dtype=pairs.dtype, device=pairs.device)
        h = self.embed(torch.cat([pairs, eq], dim=1)) + self.pos
        for attn, mlp_block in zip(self.attn, self.mlps):
            h = h + attn(h, h, h, need_weights=False)[0]
            h = h + mlp_block(h)
        return self.unembed(h[:, -1])
