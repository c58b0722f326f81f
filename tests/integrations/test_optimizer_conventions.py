"""Conventions that training frameworks rely on, checked on the optimizer alone: extra
param-group keys, a warmup that starts at ε = 0, checkpoints read with ``weights_only=True``,
and the refusal of flat-parameter sharding (FSDP1, DeepSpeed ZeRO)."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch

from arturo import Arturo


def _params() -> list[torch.nn.Parameter]:
    return [
        torch.nn.Parameter(torch.linspace(-1.0, 1.0, 12).reshape(3, 4)),
        torch.nn.Parameter(torch.full((4,), 0.3)),
    ]


def _grads(n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    # The first gradient is large, so a step that wrongly consumed it (filter, outlier scale)
    # would leave a visible trace.
    scales = [40.0] + [1.0] * (n - 1)
    return [[torch.randn(3, 4, generator=gen) * s, torch.randn(4, generator=gen)] for s in scales]


def _assert_same_state(a: Arturo, b: Arturo) -> None:
    """Bitwise equality of the per-parameter state and of each group's η, KL, scale, skips."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for key, entry in sa["state"].items():
        assert entry.keys() == sb["state"][key].keys()
        for name, value in entry.items():
            assert torch.equal(value, sb["state"][key][name]), (key, name)
    for ga, gb in zip(sa["param_groups"], sb["param_groups"], strict=True):
        for name in ("eta", "kl", "grad_scale", "skipped_steps"):
            assert torch.equal(ga[name], gb[name]), name


def _step(opt: Arturo, params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


# ---------------------------------------------------------------------------------------------
# Extra param-group keys
# ---------------------------------------------------------------------------------------------


def test_unknown_group_keys_are_kept_and_ignored():
    extra = {"lr_scale": 2.0, "name": "decay", "layer_id": 3}
    plain_params, keyed_params = _params(), _params()
    plain = Arturo([{"params": plain_params}], lr=0.05)
    keyed = Arturo([{"params": keyed_params, **extra}], lr=0.05)
    for grads in _grads(3):
        _step(plain, plain_params, grads)
        _step(keyed, keyed_params, grads)
    for p, q in zip(plain_params, keyed_params, strict=True):
        assert torch.equal(p, q)  # ignored: the step is the same as without them
    _assert_same_state(plain, keyed)
    saved = keyed.state_dict()
    assert {k: saved["param_groups"][0][k] for k in extra} == extra  # kept
    restored = Arturo([{"params": _params()}], lr=0.05)
    restored.load_state_dict(saved)
    assert {k: restored.param_groups[0][k] for k in extra} == extra


# ---------------------------------------------------------------------------------------------
# Warmup from ε = 0
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_first_step_at_zero_lr_then_warmup_equals_starting_at_first_nonzero_lr(foreach, tensor_lr):
    """transformers' linear warmup makes the first step's ε exactly 0. That step must leave
    no trace, so the run continues exactly as one that starts at the first non-zero ε."""
    base, warmup = 0.05, 4
    grads = _grads(6)

    def run(first_step: int) -> tuple[Arturo, list[torch.nn.Parameter]]:
        params = _params()
        # Two groups as a framework would make them (weight decay / none).
        opt = Arturo(
            [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}],
            lr=torch.tensor(base) if tensor_lr else base,
            weight_decay=0.01,
            foreach=foreach,
        )
        for t in range(first_step, len(grads)):
            factor = min(1.0, t / warmup)  # get_linear_schedule_with_warmup's warmup part
            for group in opt.param_groups:
                group["lr"] = torch.tensor(base * factor) if tensor_lr else base * factor
            _step(opt, params, grads[t])
        return opt, params

    with_zero, params_a = run(first_step=0)
    from_first, params_b = run(first_step=1)
    for p, q in zip(params_a, params_b, strict=True):
        assert torch.equal(p, q)
    _assert_same_state(with_zero, from_first)
    assert all(s["skipped_steps"] == 0 for s in with_zero.stats())


def test_zero_lr_step_creates_state_but_changes_nothing():
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = Arturo(params, lr=0.0)
    _step(opt, params, _grads(1)[0])
    fresh = Arturo(_params(), lr=0.0)
    for p, q in zip(params, before, strict=True):
        assert torch.equal(p, q)
        assert float(opt.state[p]["step"]) == 0.0
    # The state equals the initial state a fresh optimizer would create.
    for p, q in zip(params, fresh.param_groups[0]["params"], strict=True):
        init = fresh._init_state(q, fresh.param_groups[0])
        for name, value in init.items():
            assert torch.equal(opt.state[p][name], value), name


# ---------------------------------------------------------------------------------------------
# Checkpoints read with weights_only=True
# ---------------------------------------------------------------------------------------------


def test_state_dict_round_trips_through_weights_only_load():
    grads = _grads(5)
    params = _params()
    groups = [{"params": params[:1], "name": "decay"}, {"params": params[1:], "weight_decay": 0}]
    uninterrupted = Arturo(groups, lr=0.05)
    for g in grads:
        _step(uninterrupted, params, g)

    params_b = _params()
    opt = Arturo(
        [{**groups[0], "params": params_b[:1]}, {**groups[1], "params": params_b[1:]}], lr=0.05
    )
    for g in grads[:2]:
        _step(opt, params_b, g)
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "model": [p.detach() for p in params_b]}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    params_c = [torch.nn.Parameter(t.clone()) for t in checkpoint["model"]]
    resumed = Arturo(
        [{"params": params_c[:1], "name": "decay"}, {"params": params_c[1:], "weight_decay": 0}],
        lr=0.05,
    )
    resumed.load_state_dict(checkpoint["optimizer"])
    for g in grads[2:]:
        _step(resumed, params_c, g)
    for p, q in zip(params, params_c, strict=True):
        assert torch.equal(p, q)
    _assert_same_state(uninterrupted, resumed)


# ---------------------------------------------------------------------------------------------
# Flat-parameter sharding is refused
# ---------------------------------------------------------------------------------------------


def _fake_flat_parameter(marker: str) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(8))
    setattr(p, marker, True)
    return p


@pytest.mark.parametrize("marker", ["_is_flat_param", "_fsdp_flattened"])
def test_fsdp1_flat_parameter_is_refused_at_construction(marker):
    with pytest.raises(RuntimeError, match="FSDP2"):
        Arturo([_fake_flat_parameter(marker)])


def test_fake_flat_parameter_is_what_fsdp1_calls_one():
    # Ties the marker the optimizer checks to FSDP1's own class test.
    flat_param = pytest.importorskip("torch.distributed.fsdp._flat_param")
    assert isinstance(_fake_flat_parameter("_is_flat_param"), flat_param.FlatParameter)


def test_flat_parameter_refused_in_add_param_group_and_group_not_kept():
    params = _params()
    opt = Arturo(params)
    with pytest.raises(RuntimeError, match="FSDP2"):
        opt.add_param_group({"params": [_fake_flat_parameter("_is_flat_param")]})
    assert len(opt.param_groups) == 1
    _step(opt, params, _grads(1)[0])  # the optimizer still works


@pytest.mark.distributed
def test_real_fsdp1_on_gloo_is_refused():
    """FSDP1 in one process on gloo, with and without use_orig_params (a subprocess, so this
    test process never holds a process group)."""
    script = textwrap.dedent(
        """
        import os, tempfile, warnings
        warnings.filterwarnings("ignore")
        import torch, torch.distributed as dist
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from arturo import Arturo
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
        try:
            for orig in (False, True):
                model = FSDP(
                    torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
                    device_id=torch.device("cpu"),
                    use_orig_params=orig,
                )
                try:
                    Arturo(model.parameters())
                except RuntimeError as exc:
                    assert "FSDP2" in str(exc), exc
                    print("refused", orig)
        finally:
            dist.destroy_process_group()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["refused False", "refused True"]


def test_parameters_replaced_by_flat_partition_are_refused_at_step():
    """DeepSpeed ZeRO-1/2 style: after construction, each group's params become one flat
    per-rank partition. The step must refuse before running anything, closure included."""
    params = _params()
    opt = Arturo(params, lr=0.05)
    partition = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in params])[:8])
    partition.grad = torch.ones_like(partition)
    opt.param_groups[0]["params"] = [partition]
    calls = []
    with pytest.raises(RuntimeError, match="FSDP2"):
        opt.step(lambda: calls.append(1))
    assert calls == []
    assert not opt.state


def test_same_shaped_replacement_before_any_step_is_accepted():
    """Accelerate swaps parameters for FSDP2's DTensor ones, or for copies on another device,
    of the same shapes and before the first step: that must keep working."""
    params = _params()
    opt = Arturo(params, lr=0.05)
    moved = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt.param_groups[0]["params"] = moved
    grads = _grads(2)
    _step(opt, moved, grads[0])
    reference_params = _params()
    reference = Arturo(reference_params, lr=0.05)
    _step(reference, reference_params, grads[0])
    for p, q in zip(moved, reference_params, strict=True):
        assert torch.equal(p, q)
    # Replaced again, now that the state belongs to `moved`: refused.
    opt.param_groups[0]["params"] = [torch.nn.Parameter(p.detach().clone()) for p in moved]
    with pytest.raises(RuntimeError, match="state belongs to the old"):
        _step(opt, opt.param_groups[0]["params"], grads[1])


def test_group_added_without_add_param_group_is_refused():
    params = _params()
    opt = Arturo(params[:1])
    opt.param_groups.append({**opt.param_groups[0], "params": params[1:]})
    with pytest.raises(RuntimeError, match="add_param_group"):
        _step(opt, params, _grads(1)[0])


@pytest.mark.parametrize("how", ["deepcopy", "load_state_dict"])
def test_copies_and_reloads_keep_stepping(how):
    params = _params()
    opt = Arturo(params, lr=0.05)
    grads = _grads(2)
    _step(opt, params, grads[0])
    if how == "deepcopy":
        params, opt = copy.deepcopy((params, opt))
    else:
        state = opt.state_dict()
        opt = Arturo(params, lr=0.05)
        opt.load_state_dict(state)
    _step(opt, params, grads[1])
    assert float(opt.state[params[0]]["step"]) == 2.0
