"""FSDP2 with NCCL on one GPU, in a world of size 1 (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_launch import check, launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_nccl_available()), reason="needs NCCL"),
]


def test_fsdp2_nccl_world_of_one_matches_single_process(tmp_path):
    log = launch(tmp_path, 1, "gpu_smoke")
    check(tmp_path, 1, "gpu_smoke", log)
