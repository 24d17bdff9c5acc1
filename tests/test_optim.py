"""The lean optimizers follow torch.optim's trajectories (same model, seed, data order)."""

from __future__ import annotations

import pytest
import torch

from hpo.models import mlp
from hpo.objectives.optim import LeanOptimizer

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
