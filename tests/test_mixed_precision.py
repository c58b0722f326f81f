"""Mixed precision: low-precision params with fp32 state, autocast + GradScaler, accumulation."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from arturo import Arturo

STATE_KEYS = (
    "grad_intercept",
    "curvature",
    "filter_cov_bb",
    "filter_cov_bh",
    "filter_cov_hh",
    "precision",
)
GROUP_KEYS = ("eta", "kl", "skipped_steps")


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def data(step: int, n: int = 32, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randn(n, 3, generator=g).to(dtype)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).float() - y.float()).square().mean()


def train(model, opt, steps, start=0, dtype=torch.float32):
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        mse(model, *data(step, dtype=dtype)).backward()
        opt.step()


def snapshot(model: nn.Module, opt: Arturo) -> dict[str, torch.Tensor]:
    out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for key, value in opt.state[p].items():
            out[f"{n}/{key}"] = value.clone()
    for i, group in enumerate(opt.param_groups):
        for key in GROUP_KEYS:
            out[f"group{i}/{key}"] = group[key].clone()
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def assert_fp32_state(model: nn.Module, opt: Arturo) -> None:
    for p in model.parameters():
        for key in STATE_KEYS:
            assert opt.state[p][key].dtype == torch.float32, (p.dtype, key)


# ---------------------------------------------------------------------------------------------
# Low-precision parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [False, True])
def test_low_precision_params_train_with_fp32_state(dtype, foreach):
    model = make_model(dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = Arturo(model.parameters(), lr=0.05, foreach=foreach)
    train(model, opt, 5, dtype=dtype)
    assert_fp32_state(model, opt)
    for p, old in zip(model.parameters(), before, strict=True):
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert not torch.equal(p, old)
    assert opt.stats()[0]["skipped_steps"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_state_dict_round_trip_stays_fp32_and_resumes_exactly(dtype):
    model = make_model(dtype=dtype)
    opt = Arturo(model.parameters(), lr=0.05)
    train(model, opt, 3, dtype=dtype)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    model2 = make_model(seed=1, dtype=dtype)
    opt2 = Arturo(model2.parameters(), lr=0.05)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert_fp32_state(model2, opt2)
    assert_bitwise_equal(snapshot(model2, opt2), snapshot(model, opt))

    train(model, opt, 3, start=3, dtype=dtype)
    train(model2, opt2, 3, start=3, dtype=dtype)
    assert_bitwise_equal(snapshot(model2, opt2), snapshot(model, opt))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_state_through_the_distributed_state_dict_helpers(dtype):
    """get/set_optimizer_state_dict (the DCP helpers) keep fp32 state of bf16/fp16 params."""
    # Imported here: torch.distributed.checkpoint takes seconds to import.
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = make_model(dtype=dtype)
    opt = Arturo(model.parameters(), lr=0.05)
    train(model, opt, 3, dtype=dtype)
    osd = get_optimizer_state_dict(model, opt)
    model2 = copy.deepcopy(model)
    opt2 = Arturo(model2.parameters(), lr=0.05)
    set_optimizer_state_dict(model2, opt2, osd)
    assert_fp32_state(model2, opt2)
    assert_bitwise_equal(snapshot(model2, opt2), snapshot(model, opt))


# ---------------------------------------------------------------------------------------------
# torch.amp: autocast and GradScaler
# ---------------------------------------------------------------------------------------------


def _amp_step(model, opt, scaler, step, micro_batches=1):
    opt.zero_grad(set_to_none=True)
    x, y = data(step, n=32)
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = mse(model, xs, ys) / micro_batches
        scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def test_gradscaler_skips_overflowing_steps_and_leaves_state_untouched():
    model = make_model()
    opt = Arturo(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(3):
        _amp_step(model, opt, scaler, step)
    assert_fp32_state(model, opt)
    before = snapshot(model, opt)
    scale = scaler.get_scale()

    # A loss scale far past fp16's range: the fp16 backward overflows to inf.
    scaler.update(new_scale=2.0**40)
    _amp_step(model, opt, scaler, 3)
    assert scaler.get_scale() < 2.0**40  # the scaler saw the inf and backed off
    assert_bitwise_equal(snapshot(model, opt), before)  # Arturo never stepped

    scaler.update(new_scale=scale)
    _amp_step(model, opt, scaler, 4)
    after = snapshot(model, opt)
    assert not torch.equal(after["param/0.weight"], before["param/0.weight"])
    assert after["0.weight/step"].item() == 4
    assert opt.stats()[0]["skipped_steps"] == 0


def test_inf_grads_without_a_scaler_are_skipped_by_arturo_itself():
    """fp16 params cannot use GradScaler (it refuses to unscale fp16 grads); Arturo's own
    non-finite check then cancels the step, with no host sync."""
    model = make_model(dtype=torch.float16)
    opt = Arturo(model.parameters(), lr=0.05)
    train(model, opt, 2, dtype=torch.float16)
    before = snapshot(model, opt)
    opt.zero_grad(set_to_none=True)
    (mse(model, *data(2, dtype=torch.float16)) * 1e30).backward()  # inf in fp16 grads
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    after = snapshot(model, opt)
    assert after.pop("group0/skipped_steps").item() == 1
    assert after.pop("group0/kl").item() == 0.0
    before.pop("group0/skipped_steps"), before.pop("group0/kl")
    assert_bitwise_equal(after, before)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
def test_gradient_accumulation_equals_one_big_batch(foreach):
    """k micro-batches of loss/k, accumulated, then one step == one step on the whole batch
    (float64, so only the summation order of the gradient differs)."""
    k = 4
    big = make_model(dtype=torch.float64)
    small = copy.deepcopy(big)
    opt_big = Arturo(big.parameters(), lr=0.05, foreach=foreach)
    opt_small = Arturo(small.parameters(), lr=0.05, foreach=foreach)
    for step in range(10):
        x, y = data(step, n=32, dtype=torch.float64)
        opt_big.zero_grad(set_to_none=True)
        mse(big, x, y).backward()
        opt_big.step()
        opt_small.zero_grad(set_to_none=True)
        for xs, ys in zip(x.chunk(k), y.chunk(k), strict=True):
            (mse(small, xs, ys) / k).backward()
        opt_small.step()
    a, b = snapshot(small, opt_small), snapshot(big, opt_big)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-12, msg=key)


def test_gradient_accumulation_with_autocast_and_gradscaler():
    model = make_model()
    ref = copy.deepcopy(model)
    opt = Arturo(model.parameters(), lr=0.05)
    opt_ref = Arturo(ref.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler_ref = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(5):
        _amp_step(model, opt, scaler, step, micro_batches=4)
        _amp_step(ref, opt_ref, scaler_ref, step, micro_batches=1)
    assert_fp32_state(model, opt)
    # fp16 autocast rounds each micro-batch differently, so only close, not equal.
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)
