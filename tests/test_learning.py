"""Arturo learns on real data: scikit-learn's digits (8x8 images, ships inside the wheel)."""

import pytest
import torch
from sklearn.datasets import load_digits

from arturo import Arturo


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def fit(model, opt, data, epochs, sched=None, batch_size=128):
    x, y = data
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if sched is not None:
            sched.step()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "units, floor",
    # measured: 0.900 (relative), 0.954 (absolute); Adam(lr=1e-3) reaches 0.906 in this budget
    [("relative", 0.88), ("absolute", 0.93)],
)
def test_the_defaults_of_each_units_learn_digits(digits, foreach, units, floor):
    model = mlp()
    opt = Arturo(model.parameters(), units=units, foreach=foreach)
    untrained = fit(model, opt, digits, epochs=0)
    accuracy = fit(model, opt, digits, epochs=10)
    assert untrained < 0.2  # chance level is 0.1
    assert accuracy > floor


def test_param_groups_with_multistep_lr(digits):
    model = mlp()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") else decay).append(p)
    opt = Arturo(
        [
            {"params": decay, "weight_decay": 1e-3},
            {"params": no_decay, "weight_decay": 0.0, "lr": 0.02},
        ],
        units="absolute",  # the published ε and κ, and a group's KL bound is its lr
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[8], gamma=0.006)
    accuracy = fit(model, opt, digits, epochs=10, sched=sched)
    assert accuracy > 0.9
    stats = opt.stats()
    assert stats[0]["kl_bound"] == pytest.approx(0.08567456308209788 * 0.006)
    assert stats[1]["kl_bound"] == pytest.approx(0.02 * 0.006)
    for s in stats:
        assert s["kl"] <= s["kl_bound"] * (1 + 1e-5)
