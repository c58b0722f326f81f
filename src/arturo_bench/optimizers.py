"""Build a torch optimizer from its config (see ``arturo_bench.configs``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .configs import AdamConfig, AdamWConfig, ArturoConfig, IVONConfig, SGDConfig

__all__ = ["build_optimizer", "OptionalDependencyError"]


class OptionalDependencyError(ImportError):
    """An optimizer's package is not installed; the message says how to install it."""


def build_optimizer(cfg: Any, params: Iterable[Tensor], *, num_train: int) -> torch.optim.Optimizer:
    """The optimizer for ``cfg``. ``num_train`` is the training-set size (IVON's default ESS)."""
    params = list(params)
    if isinstance(cfg, ArturoConfig):
        try:
            from arturo import Arturo
        except ImportError as exc:  # pragma: no cover - arturo ships in this repo
            raise OptionalDependencyError(
                "arturo is not importable; install this repo: pip install -e ."
            ) from exc
        # Every config field but the harness's own (gamma): a new field cannot be forgotten.
        return Arturo(params, **cfg.optimizer_kwargs())
    if isinstance(cfg, AdamConfig):
        wd = cfg.weight_decay if cfg.apply_weight_decay else 0.0
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=wd)
    if isinstance(cfg, AdamWConfig):
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
        )
    if isinstance(cfg, SGDConfig):
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if isinstance(cfg, IVONConfig):
        try:
            import ivon
        except ImportError as exc:
            raise OptionalDependencyError(
                "--optimizers ivon needs the IVON package: pip install -c constraints.txt "
                "-e '.[ivon]'  (or: pip install ivon-opt)"
            ) from exc
        return ivon.IVON(
            params,
            lr=cfg.lr,
            ess=cfg.ess if cfg.ess > 0 else float(num_train),
            hess_init=cfg.hess_init,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            weight_decay=cfg.weight_decay,
            mc_samples=cfg.mc_samples,
            clip_radius=cfg.clip_radius,
        )
    raise TypeError(f"no optimizer for config {cfg!r}")
