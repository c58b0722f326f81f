"""The framework-free part of arturo.integrations, and that ``import arturo`` and
``import arturo.integrations`` never import a framework."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from arturo import Arturo
from arturo.integrations import stats_for_logging, unwrap_optimizer


def test_arturo_imports_no_framework():
    # A fresh process: this one may have imported the frameworks already.
    script = (
        "import sys, arturo, arturo.integrations\n"
        "loaded = [m for m in ('transformers', 'accelerate', 'lightning', 'pytorch_lightning')"
        " if m in sys.modules]\n"
        "print(loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


class _Wrapper:
    """Stands for Accelerate's AcceleratedOptimizer: keeps the optimizer as `.optimizer` and
    forwards unknown attributes, as Lightning's wrapper does."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


def test_unwrap_optimizer_reaches_arturo_through_wrappers():
    opt = Arturo([torch.nn.Parameter(torch.zeros(3))])
    assert unwrap_optimizer(opt) is opt
    assert unwrap_optimizer(_Wrapper(_Wrapper(opt))) is opt
    with pytest.raises(TypeError, match="no arturo.Arturo"):
        unwrap_optimizer(_Wrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)))


def test_stats_for_logging_keys():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    one = stats_for_logging(Arturo(params), prefix="x/")
    assert {"x/eta", "x/kl", "x/kl_bound", "x/skipped_steps"} <= set(one)
    two = stats_for_logging(_Wrapper(Arturo([{"params": params[:1]}, {"params": params[1:]}])))
    assert {"arturo/group0/kl", "arturo/group1/skipped_steps"} <= set(two)
    assert all(isinstance(v, int | float) for v in two.values())
