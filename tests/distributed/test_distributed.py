"""Arturo under torch.distributed on CPU (gloo, 2 processes): DDP, FSDP2, HSDP and DCP.

Rank 0 trains the same model single-process on the global batch and compares: 1e-5 relative
to each tensor's largest entry, after 20 steps. Starting ranks costs seconds (imports), so
the scenarios run in three launches shared by the tests of this module:

1. two ranks: DDP, FSDP2, uneven FSDP2, HSDP, non-finite skip; DCP save of an FSDP2 model;
2. one rank: DCP load of that checkpoint into a plain model; DCP save of the plain model;
3. two ranks: DCP load of the one-rank checkpoint into an FSDP2 model.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from dist_launch import check, launch

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]

TWO_RANKS = (
    "reducer",
    "ddp",
    "fsdp:0",
    "fsdp:1",
    "fsdp:1:0",
    "fsdp:1:1:relative",
    "fsdp_mixed_precision",
    "hsdp",
    "fsdp_nonfinite",
    "dcp_save:from2:1",
)
ONE_RANK = ("dcp_load:from2:0", "dcp_save:from1:0")
TWO_RANKS_AGAIN = ("dcp_load:from1:1",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every scenario once; map each scenario to (outdir, world size, ranks' output)."""
    outdir = tmp_path_factory.mktemp("distributed")
    results = {}
    for world, scenarios in ((2, TWO_RANKS), (1, ONE_RANK), (2, TWO_RANKS_AGAIN)):
        log = launch(outdir, world, *scenarios)
        results.update({s: (outdir, world, log) for s in scenarios})
    return results


def _check(runs, scenario):
    outdir, world, log = runs[scenario]
    check(outdir, world, scenario, log)


def test_partial_sum_reducer_layouts(runs):
    _check(runs, "reducer")


def test_ddp_matches_single_process_and_ranks_agree(runs):
    _check(runs, "ddp")


def test_fsdp2_matches_single_process_with_sharded_fp32_state(runs):
    _check(runs, "fsdp:0")


def test_fsdp2_uneven_and_empty_shards(runs):
    _check(runs, "fsdp:1")


def test_fsdp2_uneven_and_empty_shards_single_tensor_path(runs):
    _check(runs, "fsdp:1:0")


def test_fsdp2_relative_units_reduce_each_tensors_sum_of_squares(runs):
    _check(runs, "fsdp:1:1:relative")


def test_fsdp2_mixed_precision_keeps_fp32_sharded_state(runs):
    _check(runs, "fsdp_mixed_precision")


def test_hsdp_reduces_over_the_shard_dim_only(runs):
    _check(runs, "hsdp")


def test_fsdp2_nonfinite_grad_on_one_rank_skips_the_step_everywhere(runs):
    _check(runs, "fsdp_nonfinite")


def test_dcp_saved_on_two_ranks_loads_on_one_with_all_state(runs):
    _check(runs, "dcp_save:from2:1")
    _check(runs, "dcp_load:from2:0")


def test_dcp_saved_on_one_rank_loads_on_two_with_all_state(runs):
    _check(runs, "dcp_save:from1:0")
    _check(runs, "dcp_load:from1:1")
