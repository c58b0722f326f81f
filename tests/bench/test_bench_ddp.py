"""``torchrun --nproc_per_node 2 -m arturo_bench run ...``: DDP on CPU with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import arturo_bench
from arturo_bench.cli import main
from arturo_bench.distributed import DistEnv
from arturo_bench.runs import RunStore

TINY = ["--set", "batch_size=32", "--set", "test_batch_size=16", "--no-progress"]
SRC = Path(arturo_bench.__file__).resolve().parents[1]  # the code under test, in subprocesses


@pytest.mark.parametrize("n", [0, 1, 5, 32, 33])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_batch_slices_cut_like_tensor_split(n, world):
    parts = [DistEnv(rank, world).batch_slice(10, 10 + n) for rank in range(world)]
    want = torch.arange(10, 10 + n).tensor_split(world)
    for part, w in zip(parts, want, strict=True):
        assert list(range(part.start, part.stop)) == w.tolist()


def metrics(out: Path, opt: str) -> list[dict]:
    return RunStore(out / "fmnist_cnn" / opt / "seed0").metrics()


@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_torchrun_ddp_run_matches_single_process(tmp_path: Path, fmnist_dir: Path) -> None:
    # adam with lr=0: nothing moves, so the losses check the batch slicing and the sums over
    # ranks; arturo trains under DDP.
    args = ["run", "fmnist_cnn", *TINY, "--data-dir", str(fmnist_dir), "--epochs", "1"]
    args += ["--optimizers", "adam", "arturo", "--set", "adam.lr=0", "--device", "cpu"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*args, "--out", str(single)]) == 0

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "arturo_bench", *args, "--out", str(ddp)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC))
    if sys.platform == "linux":  # gloo on loopback: no need for a resolvable hostname
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/1") == 2  # one line per optimizer: rank 0 only
    assert "DDP on 2 ranks" in proc.stdout

    (a,), (b,) = metrics(single, "adam"), metrics(ddp, "adam")
    assert b["steps"] == a["steps"] == 2
    assert b["test_loss"] == a["test_loss"] and b["test_acc"] == a["test_acc"]
    # Over all ranks' slices; only the dropout masks differ from the single process.
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-2)
    (row,) = metrics(ddp, "arturo")
    assert row["kl"] <= row["kl_bound"] * (1 + 1e-4) and row["train_loss"] > 0
    d = ddp / "fmnist_cnn" / "arturo" / "seed0"
    starts = json.loads((d / "env.json").read_text())["starts"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2  # written once, by rank 0
    assert not list(d.glob(".*.tmp"))
