"""Multi-process scenarios for tests/distributed, one process per rank.

Run as ``python workers.py OUTDIR SCENARIO[:ARG...] ...`` with ``RANK`` and ``WORLD_SIZE`` in the
environment and a fresh file path in ``ARTURO_TEST_STORE`` (``dist_launch.launch`` does
this). The process group rendezvous goes through that file, so no TCP port has to be chosen.
Several scenarios share one launch because starting a rank (importing torch, and
torch._dynamo for DDP and FSDP) costs seconds, far more than the scenarios themselves. A
scenario raises when a check fails; rank 0 builds the single-process reference itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from arturo import Arturo  # noqa: E402
from arturo.distributed import partial_sum_reducer  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
GLOBAL_BATCH = 24  # divisible by 1, 2, 3, 4 ranks
STEPS = 20
IN, HIDDEN, OUT = 6, 5, 3  # HIDDEN and OUT rows do not split evenly over 2 ranks


def init(outdir: Path, backend: str = "gloo") -> None:
    # A file rendezvous (path chosen by the launcher): no TCP port to pick or collide on.
    if dist.is_initialized():  # an earlier scenario of this launch did it
        return
    dist.init_process_group(
        backend,
        init_method=f"file://{os.environ['ARTURO_TEST_STORE']}",
        rank=RANK,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )


def make_model(
    seed: int = 0, dtype: torch.dtype = torch.float32, uneven: bool = False
) -> nn.Module:
    torch.manual_seed(seed)
    if uneven:
        # Fewer rows than ranks in the last layer: rank 1 holds empty shards of it.
        layers = [nn.Linear(IN, 3), nn.Tanh(), nn.Linear(3, 1)]
    else:
        layers = [nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, HIDDEN), nn.Tanh()]
        layers.append(nn.Linear(HIDDEN, OUT))
    return nn.Sequential(*layers).to(dtype)


def make_optimizer(
    model: nn.Module, foreach: bool | None = None, units: str = "absolute"
) -> Arturo:
    # Two trust regions (G = 2), so the all-reduced partial sums are a [2, 2] tensor.
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    # In relative units ε is per coordinate: the same group bounds as in absolute units
    # (numel() of a DTensor counts all shards).
    per = (lambda ps: sum(p.numel() for p in ps)) if units == "relative" else (lambda ps: 1)
    return Arturo(
        [
            {"params": weights, "lr": 0.05 / per(weights)},
            {"params": biases, "lr": 0.02 / per(biases)},
        ],
        weight_decay=1e-3,
        foreach=foreach,
        units=units,
    )


def global_batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g, dtype=dtype)
    y = torch.randn(GLOBAL_BATCH, OUT, generator=g, dtype=dtype)
    return x, y


def local_batch(step: int, rank: int, world: int, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    x, y = global_batch(step, dtype)
    n = GLOBAL_BATCH // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (out - y[:, : out.shape[1]]).square().mean()


def train(model, opt, steps, *, start=0, rank=0, world=1, dtype=torch.float32, hook=None):
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, *local_batch(step, rank, world, dtype)).backward()
        if hook is not None:
            hook(step)
        opt.step()


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for DTensors: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def full_state(model: nn.Module, opt: Arturo) -> dict[str, torch.Tensor]:
    """Params, per-parameter state and group state, all as whole tensors, keyed by name."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = full(p.detach())
        for key, value in opt.state[p].items():
            out[f"{name}/{key}"] = full(value)
    for i, group in enumerate(opt.param_groups):
        for key in ("eta", "kl", "skipped_steps"):
            out[f"group{i}/{key}"] = group[key].detach().clone()
    return out


def assert_close(actual: dict, expected: dict, rtol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), (what, sorted(actual.keys() ^ expected.keys()))
    for key, want in expected.items():
        got = actual[key]
        assert got.dtype == want.dtype, (what, key, got.dtype, want.dtype)
        assert got.shape == want.shape, (what, key, got.shape, want.shape)
        if rtol == 0:
            assert torch.equal(got, want), (what, key, got, want)
            continue
        scale = want.double().abs().max().item() if want.numel() else 0.0
        err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
        assert err <= rtol * max(scale, 1e-30), (
            f"{what}: {key} differs by {err:.3g} (scale {scale:.3g})"
        )


def assert_same_on_all_ranks(tensors: dict[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        gathered = [torch.empty_like(t) for _ in range(WORLD)]
        dist.all_gather(gathered, t.contiguous())
        for other in gathered[1:]:
            assert torch.equal(other, gathered[0]), f"{key} differs between ranks"


@contextlib.contextmanager
def count_all_reduces():
    """Record the numel of every ``dist.all_reduce`` in the block (FSDP2 itself uses
    reduce-scatter and all-gather)."""
    calls: list[int] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original


def reference(
    steps: int, dtype=torch.float32, uneven=False, foreach=None, units="absolute"
) -> dict:
    """Single-process training on the global batch."""
    model = make_model(dtype=dtype, uneven=uneven)
    opt = make_optimizer(model, foreach, units)
    train(model, opt, steps, dtype=dtype)
    return full_state(model, opt)


def shard(model: nn.Module, mesh, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, **kwargs)
    return fully_shard(model, mesh=mesh, **kwargs)


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


def scenario_ddp(outdir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    init(outdir)
    model = make_model()
    ddp = DDP(model)
    opt = make_optimizer(model)
    assert partial_sum_reducer(list(model.parameters())) is None  # DDP: nothing to reduce
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_fn(ddp, *local_batch(step, RANK, WORLD)).backward()  # DDP averages the grads
        opt.step()
    got = full_state(model, opt)
    assert_same_on_all_ranks(got)
    if RANK == 0:
        assert_close(got, reference(STEPS), 1e-5, "DDP vs single process")


def scenario_fsdp(
    outdir: Path, uneven: str = "0", foreach: str = "1", units: str = "absolute"
) -> None:
    """FSDP2 against single-process training; ``foreach="0"``: the single-tensor path;
    ``units="relative"``: each tensor's Σ g² is all-reduced with the gradient check."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    init(outdir)
    uneven_model = uneven == "1"
    impl = foreach == "1"
    mesh = init_device_mesh("cpu", (WORLD,))
    model = shard(make_model(uneven=uneven_model), mesh)
    opt = make_optimizer(model, impl, units)
    train(model, opt, STEPS - 1, rank=RANK, world=WORLD)
    with count_all_reduces() as calls:
        train(model, opt, 1, start=STEPS - 1, rank=RANK, world=WORLD)
    # One all-reduce for the gradient statistics ([G, 2], and in relative units one Σ g² per
    # tensor), then one per dual evaluation of a [G, 2] tensor: a few floats per call.
    groups = len(opt.param_groups)
    relative = sum(len(g["params"]) for g in opt.param_groups if g["units"] == "relative")
    assert calls == [2 * groups + relative] + [2 * groups] * (opt.newton_steps + 1), calls
    for p in model.parameters():
        assert isinstance(p, DTensor)
        for key, value in opt.state[p].items():
            if key in ("step", "grad_sq_avg"):  # 0-dim, the same on every rank
                continue
            # Sharded like the parameter, in the same placement, fp32.
            assert isinstance(value, DTensor) and value.dtype == torch.float32, key
            assert value.placements == p.placements and value.device_mesh == mesh, key
            assert value.to_local().shape == p.to_local().shape, key
    if uneven_model:
        local_rows = [p.to_local().shape[0] for p in model[2].parameters()]
        assert local_rows == ([1, 1] if RANK == 0 else [0, 0]), local_rows
    got = full_state(model, opt)
    if RANK == 0:
        want = reference(STEPS, uneven=uneven_model, foreach=impl, units=units)
        assert_close(got, want, 1e-5, "FSDP2 vs single process")


def scenario_fsdp_mixed_precision(outdir: Path) -> None:
    """fp32 state for bf16 compute (MixedPrecisionPolicy) and for bf16 sharded params."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    init(outdir)
    mesh = init_device_mesh("cpu", (WORLD,))
    want = reference(5) if RANK == 0 else None
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for model, dtype in (
        (shard(make_model(), mesh, mp_policy=policy), torch.float32),
        (shard(make_model(dtype=torch.bfloat16), mesh), torch.bfloat16),
    ):
        opt = make_optimizer(model)
        train(model, opt, 5, rank=RANK, world=WORLD, dtype=dtype)
        for p in model.parameters():
            assert p.dtype == dtype
            for key, value in opt.state[p].items():
                if key != "step":
                    assert value.dtype == torch.float32 and value.placements == p.placements
        got = full_state(model, opt)
        assert all(torch.isfinite(v).all() for v in got.values())
        if RANK == 0 and dtype == torch.float32:  # bf16 compute: close to fp32, not equal
            for n, _ in model.named_parameters():
                torch.testing.assert_close(got[n], want[n], rtol=0.05, atol=0.02)


def scenario_hsdp(outdir: Path) -> None:
    """HSDP meshes (replicate, shard) of shapes (2, 1) and (1, 2): no double counting."""
    from torch.distributed.device_mesh import init_device_mesh

    init(outdir)
    want = reference(STEPS) if RANK == 0 else None
    for shape in ((WORLD, 1), (1, WORLD)):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        model = shard(make_model(), mesh)
        opt = make_optimizer(model)
        train(model, opt, STEPS, rank=RANK, world=WORLD)
        got = full_state(model, opt)
        if RANK == 0:
            assert_close(got, want, 1e-5, f"HSDP {shape} vs single process")


def scenario_fsdp_nonfinite(outdir: Path) -> None:
    """An inf in one rank's shard of one gradient skips the step on every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    init(outdir)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = shard(make_model(), mesh)
    opt = make_optimizer(model)
    train(model, opt, 3, rank=RANK, world=WORLD)
    before = full_state(model, opt)

    def poison(step: int) -> None:
        if RANK == WORLD - 1:
            model[0].weight.grad.to_local()[0, 0] = float("inf")

    train(model, opt, 1, start=3, rank=RANK, world=WORLD, hook=poison)
    after = full_state(model, opt)
    for i in range(len(opt.param_groups)):
        assert after.pop(f"group{i}/skipped_steps").item() == 1
        assert after.pop(f"group{i}/kl").item() == 0.0  # the KL of the step taken: none
        before.pop(f"group{i}/skipped_steps"), before.pop(f"group{i}/kl")
    assert_close(after, before, 0, "state after a skipped step")


def scenario_reducer(outdir: Path) -> None:
    """Which layouts get an all-reduce, over which mesh dims, and which are refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    init(outdir)
    mesh = init_device_mesh("cpu", (WORLD,))
    sharded = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
    replicated = distribute_tensor(torch.ones(4, 3), mesh, [Replicate()])
    assert partial_sum_reducer([torch.ones(3)]) is None
    assert partial_sum_reducer([replicated]) is None  # every rank holds every coordinate
    reduce = partial_sum_reducer([sharded, distribute_tensor(torch.ones(5), mesh, [Shard(0)])])
    got = reduce(torch.tensor([[1.0, float(RANK)]]))
    assert got.tolist() == [[WORLD, sum(range(WORLD))]], got
    for mixed in ([sharded, torch.ones(3)], [sharded, replicated]):
        try:
            partial_sum_reducer(mixed)
        except ValueError as err:
            assert "Arturo" in str(err)
        else:
            raise AssertionError(f"no error for {[type(t).__name__ for t in mixed]}")
    # HSDP: sum over the shard dim (1) only, never over the replicate dim (0).
    for shape, want in (((1, WORLD), WORLD), ((WORLD, 1), 1)):
        mesh2 = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        hsdp = distribute_tensor(torch.ones(4, 3), mesh2, [Replicate(), Shard(0)])
        got = partial_sum_reducer([hsdp])(torch.ones(1))
        assert got.item() == want, (shape, got)


def _make_for(world: int, sharded: bool, seed: int):
    model = make_model(seed=seed)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        model = shard(model, init_device_mesh("cpu", (world,)))
    return model, make_optimizer(model)


def scenario_dcp_save(outdir: Path, name: str, sharded: str) -> None:
    """Train 3 steps, save with DCP; rank 0 also keeps whole-tensor references."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
    )

    init(outdir)
    model, opt = _make_for(WORLD, sharded == "1", seed=0)
    train(model, opt, 3, rank=RANK, world=WORLD)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(outdir / name / "ckpt"))
    saved = full_state(model, opt)
    # The consolidated (full_state_dict) form holds the same whole tensors on rank 0.
    full_osd = get_optimizer_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if RANK == 0:
        for fqn, state in full_osd["state"].items():
            for key, value in state.items():
                assert torch.equal(value, saved[f"{fqn}/{key}"]), (fqn, key)
        for i, group in enumerate(full_osd["param_groups"]):
            assert torch.equal(group["eta"], saved[f"group{i}/eta"])
    train(model, opt, 3, start=3, rank=RANK, world=WORLD)
    continued = full_state(model, opt)
    if RANK == 0:
        torch.save({"saved": saved, "continued": continued}, outdir / name / "reference.pt")


def scenario_dcp_load(outdir: Path, name: str, sharded: str) -> None:
    """Load the DCP checkpoint onto a different world size: all state, exactly; then go on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    init(outdir)
    model, opt = _make_for(WORLD, sharded == "1", seed=1)  # different weights until loaded
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(outdir / name / "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = full_state(model, opt)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == torch.float32, (key, value.dtype)
                assert is_dtensor(value) == is_dtensor(p), (key, type(value))  # sharded like p
    train(model, opt, 3, start=3, rank=RANK, world=WORLD)
    continued = full_state(model, opt)
    if RANK == 0:
        ref = torch.load(outdir / name / "reference.pt")
        assert_close(loaded, ref["saved"], 0, "state loaded by DCP")
        assert_close(continued, ref["continued"], 1e-5, "training continued after DCP load")


def scenario_gpu_smoke(outdir: Path, device: str = "cuda") -> None:
    """FSDP2 with NCCL in a world of size 1 on one GPU (``device="cpu"``: gloo, to try it)."""
    from torch.distributed.device_mesh import init_device_mesh

    if device == "cuda":
        torch.cuda.set_device(0)
    init(outdir, backend="nccl" if device == "cuda" else "gloo")
    mesh = init_device_mesh(device, (WORLD,))
    model = shard(make_model().to(device), mesh)
    opt = make_optimizer(model)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        x, y = local_batch(step, RANK, WORLD)
        loss_fn(model, x.to(device), y.to(device)).backward()
        opt.step()
    for p in model.parameters():
        assert opt.state[p]["precision"].to_local().device.type == device
    got = {k: v.cpu() for k, v in full_state(model, opt).items()}
    assert all(torch.isfinite(v).all() for v in got.values())
    assert_close(got, reference(STEPS), 1e-4, f"FSDP2 on {device} vs single process on CPU")


def main() -> None:
    """Run each scenario in turn, recording ``ok`` or the traceback per scenario and rank.

    After a failure this rank exits at once: its peers then fail fast ("connection closed")
    instead of pairing their next collectives with the wrong ones, and the launcher reports
    what ran and what did not.
    """
    outdir, *scenarios = sys.argv[1:]
    outdir = Path(outdir)
    for spec in scenarios:
        name, *args = spec.split(":")
        record = outdir / result_name(spec, RANK)
        try:
            SCENARIOS[name](outdir, *args)
        except BaseException:
            record.write_text(traceback.format_exc())
            sys.stdout.flush()
            os._exit(1)
        record.write_text("ok")
    if dist.is_initialized():
        dist.destroy_process_group()


def result_name(spec: str, rank: int) -> str:
    return f"result-{spec.replace(':', '-')}-rank{rank}.txt"


SCENARIOS = {
    name.removeprefix("scenario_"): fn
    for name, fn in globals().items()
    if name.startswith("scenario_")
}

if __name__ == "__main__":
    main()
