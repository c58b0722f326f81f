"""The Arturo class as a torch.optim optimizer: the contract every user relies on."""

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arturo import Arturo, NonFiniteGradientError, SparseGradientError
from arturo import optimizer as arturo_optimizer

# The implementations every contract test runs on.
IMPLS = [
    pytest.param({"foreach": False}, id="single"),
    pytest.param({"foreach": True}, id="foreach"),
]


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        dtype
    )


def batch(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=gen).to(dtype)
    y = torch.randint(0, 3, (16,), generator=gen)
    return x, y


def train(model, opt, steps, start=0, sched=None):
    for i in range(start, start + steps):
        x, y = batch(i, next(model.parameters()).dtype)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        k: v.clone()
        for s in opt.state.values()
        for k, v in s.items()
        if isinstance(v, torch.Tensor)
    }
    state_lists = [[v.clone() for v in s.values()] for s in opt.state.values()]
    groups = [
        {
            k: (v.clone() if isinstance(v, torch.Tensor) else v)
            for k, v in g.items()
            if k != "params"
        }
        for g in opt.param_groups
    ]
    return params, state_lists, groups, state


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------
# Validation and unsupported input
# ------------------------------------------------------------------------------------------

BAD_HYPERPARAMETERS = [
    ("lr", -0.1),
    ("lr", math.nan),
    ("lr", math.inf),
    ("weight_decay", -1e-3),
    ("reg_weight", math.nan),
    ("reg_weight", -1.0),
    ("prior_precision", -1.0),
    ("init_variance", 0.0),
    ("precision_inertia", -0.5),
    ("filter_init_cov", 0.0),
    ("filter_process_noise", -1e-3),
    ("filter_measurement_noise", 0.0),
    ("init_curvature", math.nan),
    ("newton_steps", 0),
    ("newton_steps", 1),
    ("newton_steps", 2.5),
    ("foreach", "yes"),
    ("fused", 1),
    ("outlier_threshold", 1.0),
    ("outlier_threshold", math.nan),
    ("nonfinite", "ignore"),
]


@pytest.mark.parametrize(("name", "value"), BAD_HYPERPARAMETERS)
def test_invalid_hyperparameter_raises_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=rf"Invalid {name}: {value!r}"):
        Arturo(make_model().parameters(), **{name: value})


def test_prior_must_make_curvature_positive():
    with pytest.raises(ValueError, match=r"reg_weight \* prior_precision"):
        Arturo(make_model().parameters(), reg_weight=0.0)
    with pytest.raises(ValueError, match=r"reg_weight \+ precision_inertia"):
        Arturo(make_model().parameters(), reg_weight=0.0, precision_inertia=0.0)


def test_rejected_param_group_is_not_added():
    model = make_model()
    opt = Arturo(list(model[0].parameters()))
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_gradient_raises_a_clear_error(impl):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Arturo(emb.parameters(), **impl)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(SparseGradientError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("impl", IMPLS)
def test_complex_parameter_behaves_as_its_real_and_imaginary_parts(impl):
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64, generator=gen))
    xr = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_z, opt_r = Arturo([z], **impl), Arturo([xr], **impl)
    for _ in range(3):
        g = torch.randn(5, 2, generator=gen)
        z.grad, xr.grad = torch.view_as_complex(g.clone()), g.clone()
        opt_z.step()
        opt_r.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), xr.detach(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Non-finite gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_gradient_skips_the_whole_step(impl, bad):
    model = make_model()
    opt = Arturo(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}],
        **impl,
    )
    train(model, opt, 2)
    before = snapshot(model, opt)
    x, y = batch(5)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model[2].bias.grad[1] = bad  # one entry, in one group: the step of every group is skipped
    opt.step()
    after = snapshot(model, opt)
    assert_same(before[0], after[0])
    for s0, s1 in zip(before[1], after[1], strict=True):
        assert_same(s0, s1)
    for g0, g1 in zip(before[2], after[2], strict=True):
        assert torch.equal(g0["eta"], g1["eta"])
    assert [s["skipped_steps"] for s in opt.stats()] == [1, 1]
    train(model, opt, 1, start=6)  # and training goes on normally
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("impl", IMPLS)
def test_skipped_first_step_does_not_initialise_the_filter(impl):
    # A parameter whose first gradient is non-finite must start from its first finite one.
    model_a, model_b = make_model(), make_model()
    opt_a, opt_b = Arturo(model_a.parameters(), **impl), Arturo(model_b.parameters(), **impl)
    for p in model_a.parameters():
        p.grad = torch.full_like(p, math.nan)
    opt_a.step()
    train(model_a, opt_a, 3)
    train(model_b, opt_b, 3)
    assert_same(list(model_a.parameters()), list(model_b.parameters()))


def test_nonfinite_raise_mode_raises_and_changes_nothing():
    model = make_model()
    opt = Arturo(model.parameters(), nonfinite="raise")
    train(model, opt, 1)
    before = snapshot(model, opt)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[0].weight.grad[0, 0] = math.nan
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    after = snapshot(model, opt)
    assert_same(before[0], after[0])


# ------------------------------------------------------------------------------------------
# torch.optim behaviour
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_params_without_grad_are_skipped(impl):
    model = make_model()
    frozen = list(model[2].parameters())
    opt = Arturo([{"params": model[0].parameters()}, {"params": frozen, "lr": 0.01}], **impl)
    frozen_before = [p.detach().clone() for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    train(model, opt, 3)
    assert all(p not in opt.state for p in frozen)
    assert_same(frozen_before, frozen)
    stats = opt.stats()
    assert stats[1]["eta"] == 0.0 and stats[1]["kl"] == 0.0
    assert stats[0]["kl"] > 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_closure_runs_with_grad_enabled_and_returns_the_loss(impl):
    model = make_model()
    opt = Arturo(model.parameters(), **impl)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert opt.stats()[0]["kl"] > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_lr_scheduler_drives_the_kl_bound(impl):
    model = make_model()
    opt = Arturo(model.parameters(), lr=0.05, units="absolute", **impl)  # KL bound = lr
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.01)
    train(model, opt, 4, sched=sched)
    s = opt.stats()[0]
    assert s["kl_bound"] == pytest.approx(0.05 * 0.01)
    assert s["kl"] <= s["kl_bound"] * (1 + 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_add_param_group_later(impl):
    model = make_model()
    opt = Arturo(model[0].parameters(), **impl)
    train(model, opt, 1)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.02})
    train(model, opt, 2, start=1)
    # The added group takes the optimizer's units; in relative ones its bound is ε·d.
    size = sum(p.numel() for p in model[2].parameters())
    per_lr = size if opt.defaults["units"] == "relative" else 1
    assert len(opt.stats()) == 2
    assert opt.stats()[1]["kl_bound"] == pytest.approx(0.02 * per_lr, rel=1e-6)
    assert all(p in opt.state for p in model.parameters())


def test_deepcopy_of_model_and_optimizer_together():
    model = make_model()
    opt = Arturo(model.parameters())
    train(model, opt, 2)
    model2, opt2 = copy.deepcopy((model, opt))
    train(model, opt, 2, start=2)
    train(model2, opt2, 2, start=2)
    assert_same(list(model.parameters()), list(model2.parameters()))


@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_holds_all_state(impl):
    model = make_model()
    opt = Arturo(model.parameters(), **impl)
    train(model, opt, 2)
    sd = opt.state_dict()
    assert len(sd["state"]) == len(list(model.parameters()))
    keys = (
        arturo_optimizer.RELATIVE_STATE_KEYS
        if opt.defaults["units"] == "relative"
        else arturo_optimizer.PARAM_STATE_KEYS
    )
    for s in sd["state"].values():
        assert set(s) == set(keys)
        assert float(s["step"]) == 2.0
    for g in sd["param_groups"]:
        assert set(arturo_optimizer.GROUP_STATE_DTYPES) <= set(g)
        assert float(g["eta"]) >= 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_checkpoint_resume_is_bitwise_exact(impl):
    model = make_model()
    opt = Arturo(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}],
        **impl,
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3], gamma=0.1)
    train(model, opt, 3, sched=sched)
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )

    train(model, opt, 4, start=3, sched=sched)  # uninterrupted

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = make_model(seed=123)  # different init, overwritten by the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2 = Arturo(
        [{"params": model2[0].parameters()}, {"params": model2[2].parameters(), "lr": 0.5}],
        **impl,
    )
    opt2.load_state_dict(ckpt["opt"])
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=[3], gamma=0.1)
    sched2.load_state_dict(ckpt["sched"])
    train(model2, opt2, 4, start=3, sched=sched2)

    assert_same(list(model.parameters()), list(model2.parameters()))
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        for k in arturo_optimizer.PARAM_STATE_KEYS:
            assert torch.equal(opt.state[p][k], opt2.state[p2][k])
    assert opt.stats() == opt2.stats()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state_through_load(impl, dtype):
    model = make_model(dtype=dtype)
    opt = Arturo(model.parameters(), **impl)
    train(model, opt, 2)
    for s in opt.state.values():
        assert all(s[k].dtype == torch.float32 for k in arturo_optimizer.PARAM_STATE_KEYS)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = Arturo(model.parameters(), **impl)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        for k in arturo_optimizer.PARAM_STATE_KEYS:
            assert opt2.state[p][k].dtype == torch.float32
            assert torch.equal(opt2.state[p][k], opt.state[p][k])


@pytest.mark.parametrize("impl", IMPLS)
def test_stats_curvature_and_variance(impl):
    model = make_model()
    opt = Arturo(model.parameters(), **impl)
    with pytest.raises(KeyError):
        opt.curvature(model[0].weight)
    train(model, opt, 2)
    (s,) = opt.stats()
    assert set(s) == {"eta", "kl", "kl_bound", "skipped_steps"}
    assert all(isinstance(s[k], float) for k in ("eta", "kl", "kl_bound"))
    w = model[0].weight
    assert opt.curvature(w).shape == w.shape
    h = opt.curvature(w)
    h.fill_(123.0)  # a copy: editing it leaves the optimizer alone
    assert not (opt.curvature(w) == 123.0).any()
    torch.testing.assert_close(opt.variance(w), 1.0 / opt.state[w]["precision"])
    assert (opt.variance(w) > 0).all()


def test_persistent_state_is_at_most_six_fp32_values_per_parameter():
    model = make_model()
    opt = Arturo(model.parameters())
    train(model, opt, 1)
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if v.dim() > 0
    )
    assert state_bytes <= 6 * 4 * n_params
    # no second copy of the weights: no state tensor equals a parameter
    for p in model.parameters():
        assert all(not torch.equal(v, p) for v in opt.state[p].values())


# ------------------------------------------------------------------------------------------
# Implementations agree; no host sync
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_foreach_and_single_tensor_paths_agree(dtype, rtol):
    results = []
    for foreach in (False, True):
        model = make_model(dtype=dtype)
        opt = Arturo(
            [
                {"params": model[0].parameters(), "weight_decay": 1e-2},
                {"params": model[2].parameters(), "lr": 0.01, "init_curvature": -0.5},
            ],
            foreach=foreach,
        )
        model[2].bias.requires_grad_(False)  # a param without grad in the mix
        train(model, opt, 6)
        results.append((model, opt))
    (m1, o1), (m2, o2) = results
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=rtol, atol=rtol * 1e-3)
        for k, v in o1.state.get(p1, {}).items():
            torch.testing.assert_close(v, o2.state[p2][k], rtol=rtol, atol=rtol * 1e-3)
    for s1, s2 in zip(o1.stats(), o2.stats(), strict=True):
        assert s1["eta"] == pytest.approx(s2["eta"], rel=rtol * 10, abs=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_step_never_reads_device_values_on_the_host(impl):
    # Meta tensors have no values: any .item(), bool() or Python branch on a tensor raises.
    params = [
        torch.nn.Parameter(torch.empty(3, 4, device="meta")),
        torch.nn.Parameter(torch.empty(5, device="meta", dtype=torch.bfloat16)),
    ]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = Arturo([{"params": params[:1]}, {"params": params[1:], "lr": 0.01}], **impl)
    opt.step()
    opt.step()
    assert opt.state[params[0]]["curvature"].device.type == "meta"


# ------------------------------------------------------------------------------------------
# The trust region, end to end
# ------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lr=st.floats(1e-6, 10.0),
    init_curvature=st.floats(-5.0, 5.0),
    grad_scale=st.floats(1e-3, 1e3),
    foreach=st.booleans(),
)
def test_every_step_stays_inside_the_trust_region(seed, lr, init_curvature, grad_scale, foreach):
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
        for s in [(4, 3), (7,)]
    ]
    wd = 1e-3
    # Absolute units, whose formulas this transcribes (tests/test_spec.py covers both units).
    opt = Arturo(
        params,
        lr=lr,
        units="absolute",
        weight_decay=wd,
        init_curvature=init_curvature,
        foreach=foreach,
    )
    for _ in range(3):
        for p in params:
            p.grad = grad_scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        theta = [p.detach().clone() for p in params]
        lam = [opt.state[p]["precision"].clone() if p in opt.state else None for p in params]
        opt.step()
        lam = [
            l if l is not None else opt.state[p]["precision"].new_full(p.shape, 100.0)
            for l, p in zip(lam, params, strict=True)
        ]
        mu = [t * (1 - lr * wd) for t in theta]
        kl = 0.5 * sum(
            float((l * (p.detach() - m) ** 2).sum())
            for l, p, m in zip(lam, params, mu, strict=True)
        )
        # The unconstrained (η = 0) step from the updated filter state.
        prior = opt.defaults["reg_weight"] * opt.defaults["prior_precision"]
        kl_newton = 0.0
        for p, l, m in zip(params, lam, mu, strict=True):
            s = opt.state[p]
            g_model = (s["curvature"] + prior) * m + s["grad_intercept"]
            a = s["curvature"].clamp_min(0) + prior
            kl_newton += 0.5 * float((l * (g_model / a) ** 2).sum())
        stats = opt.stats()[0]
        assert kl <= lr * (1 + 1e-5)
        assert kl == pytest.approx(stats["kl"], rel=1e-6, abs=1e-30)
        if stats["eta"] > 0:
            assert kl >= 0.9 * lr
        if kl_newton <= lr * (1 - 1e-9):
            assert stats["eta"] == 0.0
        if kl_newton >= lr * (1 + 1e-9):
            assert stats["eta"] > 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_lr_step_creates_state_but_changes_nothing(impl):
    # torch.distributed.checkpoint initialises optimizer state this way (lr=0, zero grads).
    model_a, model_b = make_model(), make_model()
    opt_a, opt_b = Arturo(model_a.parameters(), **impl), Arturo(model_b.parameters(), **impl)
    for p in model_a.parameters():
        p.grad = torch.zeros_like(p)
    opt_a.param_groups[0]["lr"] = 0.0
    opt_a.step()
    opt_a.param_groups[0]["lr"] = opt_b.param_groups[0]["lr"]
    assert all(float(opt_a.state[p]["step"]) == 0 for p in model_a.parameters())
    train(model_a, opt_a, 3)
    train(model_b, opt_b, 3)
    assert_same(list(model_a.parameters()), list(model_b.parameters()))


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_tensor_lr_step_creates_state_but_changes_nothing(impl):
    # DCP's get_state_dict steps a fresh optimizer once with lr=torch.tensor(0.) and zero
    # grads; before, a tensor lr ran the filter on that zero "first gradient".
    model_a, model_b = make_model(), make_model()
    opt_a = Arturo(model_a.parameters(), lr=torch.tensor(0.05), **impl)
    opt_b = Arturo(model_b.parameters(), lr=torch.tensor(0.05), **impl)
    for p in model_a.parameters():
        p.grad = torch.zeros_like(p)
    opt_a.param_groups[0]["lr"].fill_(0.0)
    opt_a.step()
    assert all(float(opt_a.state[p]["step"]) == 0 for p in model_a.parameters())
    assert opt_a.stats()[0]["skipped_steps"] == 0
    opt_a.param_groups[0]["lr"].fill_(0.05)
    train(model_a, opt_a, 3)
    train(model_b, opt_b, 3)
    assert_same(list(model_a.parameters()), list(model_b.parameters()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_zero_lr_is_per_group_and_resets_the_reported_kl(impl, as_tensor):
    model = make_model()
    lr = torch.tensor(0.05) if as_tensor else 0.05
    opt = Arturo(
        [{"params": model[0].parameters(), "lr": lr}, {"params": model[2].parameters()}],
        **impl,
    )
    train(model, opt, 2)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    moving = [p.detach().clone() for p in model[2].parameters()]
    opt.param_groups[0]["lr"] = torch.tensor(0.0) if as_tensor else 0.0
    train(model, opt, 1, start=2)
    assert_same(frozen, list(model[0].parameters()))
    assert not torch.equal(moving[0], model[2].weight)
    s0, s1 = opt.stats()
    assert s0["kl"] == 0.0 <= s0["kl_bound"] and s1["kl"] > 0.0
    assert s0["skipped_steps"] == s1["skipped_steps"] == 0


# ------------------------------------------------------------------------------------------
# Dispatch and optimizer-level options
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "foreach", "fused", "triton", "expected"),
    [
        ("cpu", None, None, True, "foreach"),
        ("cpu", False, None, True, "single"),
        ("cpu", True, None, True, "foreach"),
        ("cpu", None, True, True, "fused"),
        ("cpu", None, False, True, "foreach"),
        ("cpu", False, False, True, "single"),
        ("cuda", None, None, True, "fused"),
        ("cuda", None, None, False, "foreach"),
        ("cuda", False, None, True, "single"),  # before: the compiled path
        ("cuda", True, None, True, "foreach"),
        ("cuda", None, False, True, "foreach"),
        ("meta", None, None, True, "single"),
    ],
)
def test_dispatch_follows_the_flags_exactly(monkeypatch, device, foreach, fused, triton, expected):
    from arturo._kernels import compiled

    monkeypatch.setattr(
        compiled, "fused_available", lambda d: d.type == "cpu" or (d.type == "cuda" and triton)
    )
    got = arturo_optimizer.choose_implementation(torch.device(device), foreach, fused)
    assert got == expected


def test_fused_without_a_compiler_for_the_device_is_a_clear_error(monkeypatch):
    from arturo._kernels import compiled

    monkeypatch.setattr(compiled, "fused_available", lambda d: False)
    with pytest.raises(RuntimeError, match="fused=True needs"):
        arturo_optimizer.choose_implementation(torch.device("cuda"), None, True)


@pytest.mark.parametrize(
    ("key", "value"), [("foreach", True), ("fused", True), ("newton_steps", 5)]
)
def test_a_group_that_disagrees_on_an_optimizer_option_is_refused(key, value):
    model = make_model()
    with pytest.raises(ValueError, match=f"Invalid {key}.*option of the whole optimizer"):
        Arturo([{"params": model[0].parameters(), key: value}])
    # Agreeing with the optimizer is fine (and the key does not linger in the group).
    opt = Arturo([{"params": model[0].parameters(), key: value}], **{key: value})
    assert key not in opt.param_groups[0]


def test_add_param_group_leaves_the_callers_dict_alone():
    model = make_model()
    group = {"params": list(model[0].parameters()), "lr": 0.02}
    snapshot_keys = dict(group)
    opt = Arturo([group])
    train(model, opt, 2)
    assert group == snapshot_keys  # no defaults, no η written into it
    # Reused for a second optimizer, it starts from scratch: η 0, not the first one's.
    opt2 = Arturo([group])
    assert float(opt2.param_groups[0]["eta"]) == 0.0
    assert float(opt.param_groups[0]["eta"]) > 0.0


def test_deepcopy_and_pickle_keep_the_optimizer_options():
    import pickle

    model = make_model()
    opt = Arturo(model.parameters(), nonfinite="raise", foreach=False, newton_steps=4)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.nonfinite, clone.foreach, clone.fused, clone.newton_steps) == (
            "raise",
            False,
            None,
            4,
        )
        clone.load_state_dict(opt.state_dict())  # an unpickled optimizer reads fresh states
