"""The lean training path follows torch's: LeanOptimizer's trajectories equal torch.optim's, and the MLP's
written-out backward pass (MLPGradients) gives autograd's gradients (same model, seed, data order)."""

from __future__ import annotations

import pytest
import torch

from hpo.models import mlp
from hpo.objectives.optim import LeanOptimizer
from hpo.objectives.training import Loss, MLPGradients

CASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}, {}),
    "sgd wd": (torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.01}, {"weight_decay": 0.01}),
    "sgd_momentum": (
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
        {"momentum": 0.9, "weight_decay": 1e-3},
    ),
    "adam": (torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99)}, {"betas": (0.8, 0.99)}),
    "adam wd": (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}, {"weight_decay": 0.1}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.5}, {"weight_decay": 0.5}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.003, "weight_decay": 0.01}, {"weight_decay": 0.01}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lean_optimizer_matches_torch_optim(case: str) -> None:
    cls, torch_kwargs, lean_kwargs = CASES[case]
    kind = {"sgd wd": "sgd", "adam wd": "adam"}.get(case, case)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 2, generator=gen), torch.randint(0, 2, (256, 1), generator=gen).float()
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        models.append(mlp(2, [16, 16], 1))
    ref_model, lean_model = models
    initial = [p.detach().clone() for p in lean_model.parameters()]
    ref = cls(ref_model.parameters(), **torch_kwargs)
    lean = LeanOptimizer(list(lean_model.parameters()), kind, lr=torch_kwargs["lr"], **lean_kwargs)
    for step in range(50):
        xb, yb = x[(step * 16) % 256 :][:16], y[(step * 16) % 256 :][:16]
        for model, opt in ((ref_model, ref), (lean_model, lean)):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb).backward()
            opt.step()
    for a, b in zip(ref_model.parameters(), lean_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(lean_model.parameters(), initial, strict=True))  # it trained


# --------------------------------------------------------------------------- the MLP's written-out backward pass

LOSSES = {"mse": (1, "float"), "bce": (1, "float"), "cross_entropy": (5, "class")}


def _batch(loss: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n_out, kind = LOSSES[loss]
    x = torch.randn(n, 3, generator=gen)
    y = torch.randint(0, 2, (n, 1), generator=gen).float() if kind == "float" else torch.randint(0, n_out, (n,))
    return x, y


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_mlp_gradients_equal_autograd(loss: str, activation: str) -> None:
    """Same loss value and gradients as autograd through the model and hpo's Loss, layer by layer."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = mlp(3, [7, 5], LOSSES[loss][0], activation)
    x, y = _batch(loss, 24, gen)
    value = Loss(loss, 2 if loss != "cross_entropy" else 5)(model(x), y)
    value.backward()
    manual_value, grads = MLPGradients(model, loss)(x, y)
    torch.testing.assert_close(manual_value, value.detach(), rtol=1e-6, atol=1e-7)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert g.shape == p.shape
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_training_with_written_out_gradients_follows_autograd(kind: str) -> None:
    """200 steps of the lesson's model (mse on a sigmoid): the same trajectory either way, to float rounding."""
    gen = torch.Generator().manual_seed(1)
    x, y = _batch("mse", 3200, gen)
    x = x[:, :2].contiguous()
    models = []
    for _ in range(2):
        torch.manual_seed(2)
        models.append(mlp(2, [10], 1))
    auto, manual = models
    opt_a = LeanOptimizer(list(auto.parameters()), kind, lr=0.05)
    opt_m = LeanOptimizer(list(manual.parameters()), kind, lr=0.05)
    grads = MLPGradients(manual, "mse")
    loss = Loss("mse", 2)
    for i in range(0, 3200, 16):
        xb, yb = x[i : i + 16], y[i : i + 16]
        opt_a.zero_grad()
        loss(auto(xb), yb).backward()
        opt_a.step()
        opt_m.step(grads(xb, yb)[1])
    for a, m in zip(auto.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-5)
