"""The fused (torch.compile) step against the single-tensor reference, on CPU.

Compiling is the slow part on a 2-core CPU (several seconds per pass), so every test here uses
the same small parameter layout: the compiled passes are built once and reused (Dynamo's guards
match), and only tests that change the layout on purpose (float64, the recompile fallback)
compile again. The CUDA versions, with sync detection and peak memory, are in tests/gpu/.
"""

from __future__ import annotations

import copy

import pytest
import torch

from arturo import Arturo
from arturo import functional as F
from arturo._kernels import compiled as C
from arturo.optimizer import PARAM_STATE_KEYS

# Two groups with different hyperparameters; group 0 has a parameter that never gets a
# gradient; group 1 mixes a bf16 parameter (fp32 state) with an fp32 one.
SHAPES = (((6, 5), torch.float32), ((6,), torch.float32), ((3,), torch.float32))
SHAPES_1 = (((4, 3, 2), torch.bfloat16), ((7,), torch.float32))
SKIPPED = 2  # index in group 0
GROUP_1 = dict(
    lr=0.02, weight_decay=0.1, reg_weight=0.2, filter_measurement_noise=1.0, init_curvature=-0.05
)


def _params(dtype: torch.dtype | None = None) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        [torch.randn(s, generator=gen).to(dtype or dt) for s, dt in shapes]
        for shapes in (SHAPES, SHAPES_1)
    ]


def _clone(groups: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[p.detach().clone() for p in g] for g in groups]


def _make(groups: list[list[torch.Tensor]], **kw) -> Arturo:
    return Arturo([{"params": groups[0]}, {"params": groups[1], **GROUP_1}], **kw)


def _set_grads(groups: list[list[torch.Tensor]], k: int, nonfinite: bool = False) -> None:
    """Noisy gradients of a separable quadratic with mixed-sign curvature, the same for every
    copy of the parameters at step ``k``."""
    gen = torch.Generator().manual_seed(100 + k)
    for gi, group in enumerate(groups):
        for i, p in enumerate(group):
            if gi == 0 and i == SKIPPED:
                p.grad = None
                continue
            curv = torch.linspace(-0.5, 2.0, p.numel(), dtype=torch.float64).reshape(p.shape)
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = (curv * p.double() + 0.1 * noise).to(p.dtype)
    if nonfinite:
        groups[1][1].grad[3] = float("nan")


def _snapshot(opt: Arturo, groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    out = [p.detach().clone() for g in groups for p in g]
    for g in groups:
        for p in g:
            out += [v.clone() for v in opt.state[p].values()] if opt.state.get(p) else []
    out += [g["eta"].clone() for g in opt.param_groups]  # the KL reads 0 on a skipped step
    return out


def _assert_same_state(
    a: Arturo,
    ga: list[list[torch.Tensor]],
    b: Arturo,
    gb: list[list[torch.Tensor]],
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> None:
    for pa, pb in zip(sum(ga, []), sum(gb, []), strict=True):
        assert pa.dtype == pb.dtype
        torch.testing.assert_close(
            pa, pb, rtol=rtol, atol=atol if pa.dtype != torch.bfloat16 else 0
        )
        assert bool(a.state.get(pa)) == bool(b.state.get(pb))
        if a.state.get(pa):
            for key in PARAM_STATE_KEYS:
                sa, sb = a.state[pa][key], b.state[pb][key]
                wide = pa.dtype == torch.float64 and key != "step"  # the count is fp32
                assert sa.dtype == sb.dtype == (torch.float64 if wide else torch.float32), key
                torch.testing.assert_close(sa, sb, rtol=rtol, atol=atol, msg=key)
    for sa, sb in zip(a.stats(), b.stats(), strict=True):
        for key in ("eta", "kl"):
            assert sa[key] == pytest.approx(sb[key], rel=rtol, abs=atol), key
        assert sa["skipped_steps"] == sb["skipped_steps"]


def test_fused_matches_reference_over_steps_groups_skips_bf16_and_nonfinite():
    ref_params, fused_params = _params(), _params()
    ref, fused = _make(ref_params, foreach=False), _make(fused_params, fused=True)
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ref, fused)]
    for k in range(6):
        nonfinite = k == 3
        for groups in (ref_params, fused_params):
            _set_grads(groups, k, nonfinite=nonfinite)
        before = _snapshot(fused, fused_params)
        # After the first step nothing may recompile: not the LR schedule (ε is a tensor),
        # not the skipped step (the "keep" flag is a tensor).
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            ref.step()
            fused.step()
        if nonfinite:
            after = _snapshot(fused, fused_params)
            for x, y in zip(before, after, strict=True):
                assert torch.equal(x, y)  # bitwise: params, state and η
        _assert_same_state(ref, ref_params, fused, fused_params)
        for s in sched:
            s.step()
    assert fused.stats()[1]["skipped_steps"] == 1
    assert fused.state.get(fused_params[0][SKIPPED]) is None  # never had a gradient
    assert fused.param_groups[0]["lr"] < ref.defaults["lr"]  # the schedule did change ε


def test_fused_state_dict_round_trip():
    params = _params()
    opt = _make(params, fused=True)
    for k in range(2):
        _set_grads(params, k)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())

    resumed_params = _clone(params)
    resumed = _make(resumed_params, fused=True)
    resumed.load_state_dict(saved)
    # The reference path reads the same checkpoint.
    ref_params = _clone(params)
    ref = _make(ref_params, foreach=False)
    ref.load_state_dict(saved)
    for k in range(2, 4):
        for groups in (params, resumed_params, ref_params):
            _set_grads(groups, k)
        opt.step()
        resumed.step()
        ref.step()
    _assert_same_state(opt, params, resumed, resumed_params, rtol=0, atol=0)  # bitwise
    _assert_same_state(ref, ref_params, resumed, resumed_params)


@pytest.mark.slow
def test_fused_float64_matches_reference():
    ref_params, fused_params = _params(torch.float64), _params(torch.float64)
    ref, fused = _make(ref_params, foreach=False), _make(fused_params, fused=True)
    for k in range(3):
        for groups in (ref_params, fused_params):
            _set_grads(groups, k)
        ref.step()
        fused.step()
        _assert_same_state(ref, ref_params, fused, fused_params, rtol=1e-12, atol=1e-15)


def test_fused_step_allocates_no_parameter_sized_temporaries():
    """The fused passes allocate nothing parameter-sized: everything allocated during a step,
    summed (an upper bound on the peak of temporaries), stays far below one parameter
    buffer. Measured with the profiler's CPU memory events; the foreach path allocates four
    parameter-sized buffers per step here, the reference dozens."""
    params = _params()
    opt = _make(params, fused=True)
    _set_grads(params, 0)
    opt.step()  # compile (and create state) outside the measurement
    big = torch.randn(1 << 18)  # 1 MiB parameter, so that temporaries would show
    big_opt = Arturo([big], fused=True)
    big.grad = torch.randn_like(big)
    big_opt.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        big_opt.step()
    # Allocations are charged to the op that made them ("[memory]" events are frees).
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events() if e.name != "[memory]")
    assert 0 < allocated < big.numel() * big.element_size() // 4, f"{allocated} B allocated"


def test_fused_validation():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="fused"):
        Arturo(p, fused="yes")
    with pytest.raises(ValueError, match="exclusive"):
        Arturo(p, fused=True, foreach=True)
    with pytest.raises(ValueError, match="fused"):
        Arturo(p).add_param_group({"params": [torch.zeros(2)], "fused": 1.5})


def test_default_on_cpu_is_not_fused(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("fused path used")

    monkeypatch.setattr(C, "fused_passes", fail)
    p = torch.ones(3, requires_grad=True)
    opt = Arturo([p])
    p.grad = torch.ones(3)
    opt.step()
    assert float(opt.state[p]["step"]) == 1.0


def test_past_the_recompile_limit_a_pass_runs_uncompiled(monkeypatch):
    monkeypatch.setattr(C, "RECOMPILE_LIMIT", 1)

    def double_(xs: list[torch.Tensor]) -> None:
        for x in xs:
            x.mul_(2.0)

    one = C._Pass(double_, None)
    a, b = torch.ones(2), torch.ones(3)
    one([a])
    with pytest.warns(RuntimeWarning, match="uncompiled"):
        one([b])  # a new shape needs a second compilation
    one([b])
    assert torch.equal(a, torch.full((2,), 2.0)) and torch.equal(b, torch.full((3,), 4.0))


def test_fused_step_via_functional_matches_reference():
    """``functional.arturo_step(impl="fused")`` is a drop-in for the other implementations."""
    results = []
    for impl in ("single", "fused"):
        groups = _params()
        opt = _make(groups)  # only to build state and group tensors
        _set_grads(groups, 0)
        tensors = [opt._collect_group(g) for g in opt.param_groups]
        hps = [opt._hyperparams(g) for g in opt.param_groups]
        lrs = torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float32)
        res = F.arturo_step(
            tensors,
            hps,
            lrs=lrs,
            etas=torch.zeros(2),
            grad_scales=torch.zeros(2),
            newton_steps=3,
            impl=impl,
        )
        results.append((res, [p.clone() for g in groups for p in g]))
    (ra, pa), (rb, pb) = results
    torch.testing.assert_close(ra.eta, rb.eta, rtol=1e-5, atol=0)
    torch.testing.assert_close(ra.kl, rb.kl, rtol=1e-5, atol=0)
    torch.testing.assert_close(ra.grad_scale, rb.grad_scale, rtol=1e-6, atol=0)
    for x, y in zip(pa, pb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7 if x.dtype != torch.bfloat16 else 0)


@pytest.mark.slow
def test_fused_complex_empty_and_noncontiguous_params_match_reference():
    def run(**kw) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [
            torch.randn(3, 2, dtype=torch.complex64),  # stepped as view_as_real
            torch.randn(0),
            torch.randn(4, 5).t(),  # non-contiguous
        ]
        opt = Arturo(params, **kw)
        for k in range(3):
            gen = torch.Generator().manual_seed(k)
            for p in params:
                p.grad = 0.5 * p + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            opt.step()
        return params

    for x, y in zip(run(foreach=False), run(fused=True), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
