"""The fused step on CUDA: no host sync, agreement with the reference, peak memory.

Run with ``pytest -m gpu`` on a machine with a CUDA device (skipped elsewhere by
tests/conftest.py); scripts/gpu_check.sh runs these and the benchmark in one go.
"""

from __future__ import annotations

import pytest
import torch

from arturo import Arturo

pytestmark = pytest.mark.gpu

# A small layout with two groups, a skipped parameter and a bf16 one, as in test_fused.py.
SHAPES_0 = ((64, 33), (64,), (5,))
SHAPES_1 = ((16, 8, 3, 3), (300,))
SKIPPED = 2


def _params(device: str = "cuda") -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    g0 = [torch.randn(s, generator=gen).to(device) for s in SHAPES_0]
    g1 = [torch.randn(s, generator=gen).to(device) for s in SHAPES_1]
    g1[0] = g1[0].bfloat16()
    return [g0, g1]


def _make(groups: list[list[torch.Tensor]], **kw) -> Arturo:
    return Arturo(
        [{"params": groups[0]}, {"params": groups[1], "lr": 0.02, "weight_decay": 0.1}], **kw
    )


def _set_grads(groups: list[list[torch.Tensor]], k: int, nonfinite: bool = False) -> None:
    gen = torch.Generator().manual_seed(100 + k)
    for gi, group in enumerate(groups):
        for i, p in enumerate(group):
            if gi == 0 and i == SKIPPED:
                p.grad = None
                continue
            noise = torch.randn(p.shape, generator=gen).to(p.device)
            p.grad = (0.5 * p.float() + 0.1 * noise).to(p.dtype)
    if nonfinite:
        groups[1][1].grad[7] = float("inf")


@pytest.mark.parametrize("units", ["absolute", "relative"])
def test_fused_cuda_matches_reference_and_never_syncs(units):
    ref_params, fused_params = _params(), _params()
    ref = _make(ref_params, foreach=False, units=units)
    fused = _make(fused_params, fused=True, units=units)
    for k in range(5):
        for groups in (ref_params, fused_params):
            _set_grads(groups, k, nonfinite=k == 2)
        ref.step()
        if k == 0:
            fused.step()  # compiles (compilation itself may sync)
        else:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fused.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for pa, pb in zip(sum(ref_params, []), sum(fused_params, []), strict=True):
            atol = 0 if pa.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=atol)
            if ref.state.get(pa):
                for key in ref.state[pa]:
                    torch.testing.assert_close(
                        ref.state[pa][key], fused.state[pb][key], rtol=1e-5, atol=1e-6, msg=key
                    )
    assert fused.stats()[1]["skipped_steps"] == 1
    assert fused.state.get(fused_params[0][SKIPPED]) is None


def test_default_on_cuda_is_fused_and_lr_changes_do_not_recompile():
    groups = _params()
    opt = _make(groups)  # fused=None: fused on CUDA
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    _set_grads(groups, 0)
    opt.step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(1, 4):
            sched.step()
            _set_grads(groups, k)
            opt.step()
    from arturo._kernels import compiled

    assert "cuda" in compiled._PASSES  # the fused passes ran


def test_fused_cuda_peak_temporaries_under_two_parameter_buffers():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).cuda() for s in ((1024, 1024), (4096,), (512, 512))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Arturo(params, fused=True)
    opt.step()
    opt.step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    assert peak < 2 * param_bytes, f"peak temporaries {peak / param_bytes:.2f} parameter buffers"
