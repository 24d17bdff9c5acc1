"""Models hpo builds: an MLP, a small CNN (1-D or 2-D), and a one-layer transformer for modular arithmetic.

Only this module and ``hpo.objectives`` import torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


ACTIVATION_FNS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": nn.functional.gelu}


class MLP(nn.Module):
    """``[in, *layers, out]`` with ``activation`` between layers and none on the output (losses add it).

    Its layers are ordinary ``nn.Linear`` modules (same parameters, same initialisation, same order as an
    ``nn.Sequential`` of them), but ``forward`` calls ``F.linear`` on them directly: for the tiny models of the lesson
    the per-module call overhead is a large share of a training step.
    """

    def __init__(self, in_features: int, layers: list[int], out_features: int, activation: str = "relu") -> None:
        super().__init__()
        sizes = [in_features, *layers, out_features]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.activation = activation
        self._act = ACTIVATION_FNS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            x = x.flatten(1)
        *hidden, last = self.linears
        for layer in hidden:
            x = self._act(nn.functional.linear(x, layer.weight, layer.bias))
        return nn.functional.linear(x, last.weight, last.bias)


def mlp(in_features: int, layers: list[int], out_features: int, activation: str = "relu") -> MLP:
    """The MLP hpo trains; the lesson's model is ``mlp(2, [10], 1)`` with the ``mse`` loss (sigmoid output)."""
    return MLP(in_features, layers, out_features, activation)


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
    """The grokking MLP: two one-hot operands concatenated (2p inputs), hidden ``layers``, p outputs.

    The first layer is an ordinary ``nn.Linear(2p, width)`` (same parameters and initialisation as on the one-hot
    vector), but it is applied by looking up the two columns the one-hot vector selects instead of multiplying by a
    mostly-zero matrix: the same function, without the ``2p x width`` product per example.
    """

    def __init__(self, p: int, layers: list[int], activation: str = "relu") -> None:
        super().__init__()
        self.p = p
        sizes = [*layers, p]
        self.first = nn.Linear(2 * p, sizes[0])
        rest: list[nn.Module] = []
        for i in range(1, len(sizes)):
            rest += [ACTIVATIONS[activation](), nn.Linear(sizes[i - 1], sizes[i])]
        self.rest = nn.Sequential(*rest)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        w = self.first.weight.t()  # (2p, width): row k is what one-hot input k adds
        h = w[pairs[:, 0]] + w[pairs[:, 1] + self.p] + self.first.bias
        return self.rest(h)


class ModularTransformer(nn.Module):
    """The interpretability study's model: tokens ``a b =``, learned positions, causal attention + ReLU MLP blocks,
    no LayerNorm, unembedding read out at the ``=`` position; initialised as that study does (normal weights scaled
    by ``1/sqrt(d_model)``, zero MLP biases, no biases in attention or unembedding).

    Exact shortcuts keep it fast on a CPU: the first layer's inputs depend only on (token, position), so its
    queries, keys and values are computed once per vocabulary entry and position and looked up; only the ``=``
    position is read out, so the last layer computes attention, MLP and residual there alone; and attention over
    three positions is done with element-wise products rather than batched matrix products.
    """

    def __init__(self, p: int, d_model: int = 128, n_heads: int = 4, d_mlp: int = 512, n_layers: int = 1) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.p, self.d_model, self.n_heads, self.n_layers = p, d_model, n_heads, n_layers
        scale = 1 / math.sqrt(d_model)

        def weights(*shape: int) -> nn.ParameterList:
            return nn.ParameterList(nn.Parameter(torch.randn(*shape) * scale) for _ in range(n_layers))

        self.embed = nn.Parameter(torch.randn(p + 1, d_model) * scale)
        self.pos = nn.Parameter(torch.randn(3, d_model) * scale)
        self.w_q, self.w_k, self.w_v = weights(d_model, d_model), weights(d_model, d_model), weights(d_model, d_model)
        self.w_o = weights(d_model, d_model)
        self.w_in, self.w_out = weights(d_model, d_mlp), weights(d_mlp, d_model)
        self.b_in = nn.ParameterList(nn.Parameter(torch.zeros(d_mlp)) for _ in range(n_layers))
        self.b_out = nn.ParameterList(nn.Parameter(torch.zeros(d_model)) for _ in range(n_layers))
        self.unembed = nn.Parameter(torch.randn(d_model, p + 1) / math.sqrt(p + 1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (n, tq, d) with tq = 1 (the last position) or 3 (causal); k, v: (n, 3, d)."""
        n, tq, d = q.shape
        h = self.n_heads
        qh, kh, vh = q.view(n, tq, 1, h, -1), k.view(n, 1, 3, h, -1), v.view(n, 1, 3, h, -1)
        scores = (qh * kh).sum(-1) / math.sqrt(d // h)  # (n, tq, 3, h)
        if tq > 1:
            future = torch.ones(tq, 3, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future[None, :, :, None], float("-inf"))
        weights = scores.softmax(dim=2)
        return (weights[..., None] * vh).sum(2).reshape(n, tq, d)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        n = pairs.shape[0]
        eq = torch.full((n, 1), self.p, dtype=pairs.dtype, device=pairs.device)
        tokens = torch.cat([pairs, eq], dim=1)
        positions = torch.arange(3, device=pairs.device)
        table = self.embed[:, None, :] + self.pos[None]  # (vocab, 3, d): every first-layer input there is
        h = table[tokens, positions]
        for i in range(self.n_layers):
            last = i == self.n_layers - 1
            src = table if i == 0 else h
            q, k, v = (src @ w[i] for w in (self.w_q, self.w_k, self.w_v))
            if i == 0:
                q, k, v = (t[tokens, positions] for t in (q, k, v))
            if last:
                h, q = h[:, -1:], q[:, -1:]
            h = h + self._attend(q, k, v) @ self.w_o[i]
            h = h + torch.relu(h @ self.w_in[i] + self.b_in[i]) @ self.w_out[i] + self.b_out[i]
        return (h[:, -1] @ self.unembed)[:, : self.p]
