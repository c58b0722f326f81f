"""Launch the multi-process scenarios of dist_workers.py as plain subprocesses."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_workers import result_name

WORKERS = Path(__file__).with_name("dist_workers.py")
TIMEOUT_S = 180  # per launch (a few seconds normally); a hung collective must not hang CI
_launches = itertools.count()


def launch(outdir: Path, world_size: int, *scenarios: str) -> str:
    """Run ``scenarios`` in one launch of ``world_size`` ranks; returns the ranks' output.

    Each rank records ``ok`` or a traceback per scenario in ``outdir``; read them with
    :func:`check`. The ranks are always gone when this returns.
    """
    store = outdir / f"store-{next(_launches)}"  # a fresh rendezvous file per launch
    procs, outputs = [], []
    try:
        for rank in range(world_size):
            env = dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_RANK=str(rank),
                ARTURO_TEST_STORE=str(store),
                OMP_NUM_THREADS="1",  # ranks share the cores: no oversubscription
            )
            if sys.platform == "linux":  # gloo on loopback: no need for a resolvable hostname
                env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKERS), str(outdir), *scenarios],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                out = f"(timed out after {TIMEOUT_S} s)"
            outputs.append(out)
    finally:
        for proc in procs:  # a rank left waiting on a dead peer would hang forever
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return "\n".join(
        f"--- rank {rank} (exit {proc.returncode}) ---\n{out[-3000:]}"
        for rank, (proc, out) in enumerate(zip(procs, outputs, strict=False))
    )


def check(outdir: Path, world_size: int, scenario: str, log: str) -> None:
    """Fail with the traceback(s) unless every rank recorded ``ok`` for ``scenario``."""
    problems = []
    for rank in range(world_size):
        record = outdir / result_name(scenario, rank)
        if not record.exists():
            problems.append(f"rank {rank}: did not run (an earlier scenario failed or hung)")
        elif (text := record.read_text()) != "ok":
            problems.append(f"rank {rank}:\n{text}")
    if problems:
        pytest.fail(f"{scenario} on {world_size} ranks:\n" + "\n".join(problems) + "\n" + log)
