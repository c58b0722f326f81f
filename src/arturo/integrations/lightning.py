"""Arturo in PyTorch Lightning (the ``lightning`` package).

Arturo needs nothing special in ``configure_optimizers``: return it like any optimizer,
optionally with a per-step LR scheduler, which drives the KL bound ε (docs/integrations.md
has the recipe). Lightning calls ``step(closure=...)``, and Arturo calls the closure exactly
once, as torch.optim's optimizers do. :class:`ArturoStatsCallback` logs
:meth:`~arturo.Arturo.stats` at Lightning's logging steps.

Importing this module imports ``lightning``; ``import arturo`` never does.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "arturo.integrations.lightning needs lightning; install it with "
        "pip install 'arturo[lightning]'"
    ) from exc

from . import stats_for_logging, unwrap_optimizer

__all__ = ["ArturoStatsCallback", "unwrap_optimizer"]


class ArturoStatsCallback(pl.Callback):
    """Logs Arturo's statistics through ``LightningModule.log_dict`` every
    ``Trainer(log_every_n_steps=...)`` optimizer steps.

    Keys are ``arturo/eta``, ``arturo/kl``, ``arturo/kl_bound`` and ``arturo/skipped_steps``
    (``arturo/group{i}/...`` for several param groups; ``arturo/opt{j}/...`` when several of
    the Trainer's optimizers are Arturo). Batches that only accumulate gradients, and steps
    between logging steps, read nothing from the device. Works under automatic and manual
    optimization; optimizers other than Arturo are ignored.
    """

    def __init__(self, prefix: str = "arturo/") -> None:
        self.prefix = prefix
        self._last_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run starts past 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # this batch only accumulated gradients
        self._last_step = step
        every = trainer.log_every_n_steps
        if not every or step % every:
            return
        optimizers = []
        for opt in trainer.optimizers:
            try:
                optimizers.append(unwrap_optimizer(opt))
            except TypeError:
                continue  # not an Arturo
        for j, opt in enumerate(optimizers):
            prefix = self.prefix if len(optimizers) == 1 else f"{self.prefix}opt{j}/"
            pl_module.log_dict(
                stats_for_logging(opt, prefix), on_step=True, on_epoch=False, batch_size=1
            )
