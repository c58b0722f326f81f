"""The fixed problem behind the golden fixture (tests/data/arturo_steps.pt).

Two param groups with different ε and weight decay, one parameter whose loss has negative
curvature in places, a parameter that never gets a gradient, and gradients from a fixed
deterministic function of (step, parameters). ``run`` takes a few steps with one
implementation and returns every parameter and every state and group tensor.

Regenerate the fixture only when a numerical change is intended and documented:
``python tests/golden_problem.py`` (it overwrites the file).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from arturo import Arturo

FIXTURE = Path(__file__).parent / "data" / "arturo_steps.pt"
STEPS = 6
#: The implementations the fixture covers; each keeps its own recorded trajectory.
PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def make_params(dtype: torch.dtype) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    group0 = [torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)]
    group1 = [torch.randn(9, generator=gen), torch.randn(3, generator=gen)]  # [1]: no grad
    return [[p.to(dtype).requires_grad_() for p in g] for g in (group0, group1)]


def loss_fn(params: list[list[torch.Tensor]], step: int) -> torch.Tensor:
    """A small regression on group 0 plus a periodic term on group 1, whose curvature
    −9·cos(3v) is negative for about half the coordinates."""
    (w, c), (v, _unused) = params
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 4, generator=gen).to(w.dtype)
    y = torch.randn(16, 5, generator=gen).to(w.dtype)
    fit = ((x @ w.T + c - y) ** 2).mean()
    periodic = torch.cos(3.0 * v).sum() + 0.05 * (v**2).sum()
    return fit + periodic


def make_optimizer(params: list[list[torch.Tensor]], **impl) -> Arturo:
    return Arturo(
        [
            {"params": params[0], "lr": 0.05, "weight_decay": 0.3},
            {"params": params[1], "lr": 0.02, "weight_decay": 0.0, "init_curvature": -0.05},
        ],
        units="absolute",  # recorded in the published semantics, which must not change
        **impl,
    )


def run(path: str, dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    params = make_params(dtype)
    opt = make_optimizer(params, **PATHS[path])
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_fn(params, step).backward()
        params[1][1].grad = None
        opt.step()
    flat = [p for g in params for p in g]
    state_keys = sorted({k for s in opt.state.values() for k in s})
    return {
        "params": [p.detach().clone() for p in flat],
        **{
            f"state/{k}": [opt.state[p][k].clone() for p in flat if p in opt.state]
            for k in state_keys
        },
        "group/eta": [torch.as_tensor(g["eta"]).clone() for g in opt.param_groups],
        "group/kl": [torch.as_tensor(g["kl"]).clone() for g in opt.param_groups],
    }


def main() -> None:
    torch.set_num_threads(1)
    fixture = {f"{path}/{name}": run(path, dt) for path in PATHS for name, dt in DTYPES.items()}
    torch.save(fixture, FIXTURE)
    assert not any(
        math.isnan(float(t.sum())) for r in fixture.values() for v in r.values() for t in v
    )
    print(f"wrote {FIXTURE} ({len(fixture)} trajectories)")


if __name__ == "__main__":
    main()
