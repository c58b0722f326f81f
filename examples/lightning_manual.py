"""Arturo in a PyTorch Lightning module under manual optimization, accumulating gradients
over two batches by hand.

``self.optimizers()`` is a ``LightningOptimizer``: call ``step()`` on it (Lightning counts
the step and handles precision), and reach Arturo's own methods through
``unwrap_optimizer``.

    python examples/lightning_manual.py --steps 20
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch

from arturo import Arturo
from arturo.integrations import unwrap_optimizer
from arturo.integrations.lightning import ArturoStatsCallback

ACCUMULATE = 2


class ManualRegressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.manual_backward(loss / ACCUMULATE)  # the step sees the mean gradient
        if (batch_idx + 1) % ACCUMULATE == 0:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()
            self.lr_schedulers().step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        optimizer = Arturo(self.parameters())  # the unit-free defaults
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))
        return {"optimizer": optimizer, "lr_scheduler": warmup}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    torch.manual_seed(0)
    x = torch.randn(32 * ACCUMULATE * args.steps, 16)
    y = x[:, :4].sum(dim=1, keepdim=True).tanh()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=args.steps,  # counts optimizer steps under manual optimization too
        log_every_n_steps=5,
        callbacks=[ArturoStatsCallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = ManualRegressor()
    trainer.fit(module, loader)
    stats = unwrap_optimizer(module.optimizers()).stats()
    print("final", stats, "global_step", trainer.global_step)
    return stats


if __name__ == "__main__":
    main()
