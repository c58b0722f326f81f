"""Arturo in a PyTorch Lightning module, under automatic optimization.

``configure_optimizers`` returns Arturo with two param groups and a per-step warmup of the
KL bound ε; Lightning accumulates gradients over two batches and calls
``optimizer.step(closure=...)``, whose closure Arturo runs once. Runs at ``32-true`` or
``bf16-mixed`` precision.

    python examples/lightning_automatic.py --steps 20 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch

from arturo import Arturo
from arturo.integrations import unwrap_optimizer
from arturo.integrations.lightning import ArturoStatsCallback


class Regressor(pl.LightningModule):
    def __init__(self, warmup_steps: int = 4) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.LayerNorm(64), torch.nn.GELU(), torch.nn.Linear(64, 1)
        )
        self.warmup_steps = warmup_steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        # Weights with decay, biases and norms without. How such a split meets the trust
        # region: docs/integrations.md, "Param groups and the trust region".
        decay = [p for p in self.parameters() if p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.ndim <= 1]
        # Relative units (the default): each group's bound is ε times its size, so the two
        # groups together have the budget one group would have.
        optimizer = Arturo(
            [{"params": decay, "weight_decay": 0.6}, {"params": no_decay, "weight_decay": 0.0}]
        )
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, step / self.warmup_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--log-dir", default="lightning_logs", help="where the CSV logs go")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    torch.manual_seed(0)
    x = torch.randn(64 * args.steps, 16)
    y = x[:, :4].sum(dim=1, keepdim=True).tanh()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        accumulate_grad_batches=2,
        log_every_n_steps=5,
        callbacks=[ArturoStatsCallback()],
        logger=pl.loggers.CSVLogger(args.log_dir),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Regressor()
    trainer.fit(module, loader)
    stats = unwrap_optimizer(trainer.optimizers[0]).stats()
    print("final", stats)
    return stats


if __name__ == "__main__":
    main()
