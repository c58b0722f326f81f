"""Arturo with torch.distributed.checkpoint's state-dict helpers, in one process.

``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` create missing optimizer state
by stepping once with zero gradients and ``lr = 0``. For arTuRO that must be no step at all:
ε = 0 would put the dual's root at η = ∞ (a warm start that freezes training), and a zero
"first gradient" would seed the filter's intercept.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from arturo import Arturo


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
        opt.zero_grad(set_to_none=True)
        (model(x) - y).square().mean().backward()
        opt.step()


def test_state_dict_before_the_first_step_is_a_clean_start():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = make_model()
    fresh = copy.deepcopy(model)
    opt = Arturo(model.parameters(), lr=0.05)
    opt_fresh = Arturo(fresh.parameters(), lr=0.05)
    osd = get_optimizer_state_dict(model, opt)  # steps once with lr = 0 to create state
    params = zip(model.parameters(), fresh.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in params)
    assert osd["param_groups"][0]["eta"].item() == 0.0
    assert all(s["step"].item() == 0 for s in osd["state"].values())
    train(model, opt, 3)
    train(fresh, opt_fresh, 3)
    stats = opt.stats()[0]
    assert math.isfinite(stats["eta"])
    assert stats["kl"] >= 0.9 * stats["kl_bound"]  # real steps, up to the trust region
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)  # as if the checkpoint had never been taken
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt_fresh.state[q][key]), key


def test_get_and_set_state_dict_resume_exactly():
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = make_model()
    opt = Arturo(
        [
            {"params": [model[0].weight, model[2].weight]},
            {"params": [model[0].bias, model[2].bias], "lr": 0.02},
        ],
        lr=0.05,
    )
    train(model, opt, 3)
    model_sd, optim_sd = get_state_dict(model, opt)
    model_sd, optim_sd = copy.deepcopy(model_sd), copy.deepcopy(optim_sd)

    model2 = make_model(seed=1)
    opt2 = Arturo(
        [
            {"params": [model2[0].weight, model2[2].weight]},
            {"params": [model2[0].bias, model2[2].bias], "lr": 0.02},
        ],
        lr=0.05,
    )
    set_state_dict(model2, opt2, model_state_dict=model_sd, optim_state_dict=optim_sd)
    train(model, opt, 3, start=3)
    train(model2, opt2, 3, start=3)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key
    for g, h in zip(opt.param_groups, opt2.param_groups, strict=True):
        for key in ("eta", "kl", "skipped_steps", "lr"):
            assert torch.equal(torch.as_tensor(g[key]), torch.as_tensor(h[key])), key
