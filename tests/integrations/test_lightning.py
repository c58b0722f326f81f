"""Arturo in PyTorch Lightning on CPU: automatic optimization at 32-true and bf16-mixed with
gradient accumulation, the closure contract, the stats callback, and resuming from a
Lightning checkpoint."""

from __future__ import annotations

import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="the 'lightning' extra is not installed")

from arturo import Arturo  # noqa: E402
from arturo.integrations import unwrap_optimizer  # noqa: E402
from arturo.integrations.lightning import ArturoStatsCallback  # noqa: E402

BATCHES_PER_EPOCH, BATCH = 4, 4


class CountingArturo(Arturo):
    """Arturo that records how often each step calls the closure it was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.closure_calls: list[int | None] = []

    def step(self, closure=None):
        if closure is None:
            self.closure_calls.append(None)
            return super().step()
        calls = []

        def counted():
            calls.append(torch.is_grad_enabled())
            return closure()

        loss = super().step(counted)
        self.closure_calls.append(len(calls))
        assert all(calls), "the closure must run with gradients enabled"
        return loss


class Regressor(pl.LightningModule):
    def __init__(self, warmup: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.warmup = warmup
        self.training_steps = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        # The usual split: weights decayed, biases and norms not.
        decay = [p for n, p in self.named_parameters() if n.endswith("weight") and p.ndim > 1]
        other = [p for n, p in self.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
        opt = CountingArturo(
            [{"params": decay, "weight_decay": 1e-4}, {"params": other, "weight_decay": 0.0}],
            lr=0.05,
        )
        warmup = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, step / self.warmup) if self.warmup else 1.0
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(BATCHES_PER_EPOCH * BATCH, 8, generator=gen)
        y = x[:, :1].sin() + 0.1 * torch.randn(len(x), 1, generator=gen)
        data = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


class RecordingLogger(pl.loggers.Logger):
    """Keeps what Lightning hands its loggers, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))


def make_trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "accumulate_grad_batches": 2,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "deterministic": True,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # Lightning suggests more dataloader workers, and warns about the tiny epochs.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*number of training batches.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")  # inside Lightning, not ours
        warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint.*")
        yield


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed-scaler"])
def test_automatic_optimization_with_accumulation(tmp_path, precision):
    """At 32-true and bf16-mixed Lightning hands step() its closure. With a GradScaler
    (16-mixed; on CPU Lightning turns "16-mixed" into bf16, so the plugin is explicit) it runs
    the closure itself and calls scaler.step(optimizer), which steps without one."""
    module = Regressor()
    logger = RecordingLogger()
    if precision == "16-mixed-scaler":
        from lightning.pytorch.plugins import MixedPrecision

        options = {"precision": None, "plugins": [MixedPrecision("16-mixed", "cpu")]}
    else:
        options = {"precision": precision}
    trainer = make_trainer(
        tmp_path,
        **options,
        max_steps=3,
        logger=logger,
        enable_checkpointing=False,
        callbacks=[ArturoStatsCallback()],
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module)

    opt = unwrap_optimizer(trainer.optimizers[0])
    assert type(opt) is CountingArturo
    assert unwrap_optimizer(module.optimizers()) is opt  # through the LightningOptimizer
    assert trainer.global_step == 3
    assert module.training_steps == 6  # two batches accumulated into each step
    if precision == "16-mixed-scaler":
        assert trainer.precision_plugin.scaler is not None
        assert opt.closure_calls == [None, None, None]
    else:  # every step got a closure and called it exactly once
        assert opt.closure_calls == [1, 1, 1]
    assert all(float(s["step"]) == 2.0 for s in opt.state.values())  # first step had ε = 0
    assert any(not torch.equal(p, q) for p, q in zip(before, module.parameters(), strict=True))
    assert all(s["skipped_steps"] == 0 for s in opt.stats())

    # The callback's statistics reached the logger once per optimizer step, not per batch.
    logged = [(step, m) for step, m in logger.records if "arturo/group0/kl" in m]
    assert [step for step, _ in logged] == [0, 1, 2]
    for _, metrics in logged:
        for name in ("eta", "kl", "kl_bound", "skipped_steps"):
            assert f"arturo/group1/{name}" in metrics
    assert logged[0][1]["arturo/group0/kl"] == 0.0  # the warmup's ε = 0 step
    assert logged[-1][1]["arturo/group0/kl"] > 0.0


def test_callback_logs_only_every_n_steps(tmp_path):
    logger = RecordingLogger()
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        log_every_n_steps=2,
        logger=logger,
        enable_checkpointing=False,
        callbacks=[ArturoStatsCallback(prefix="opt/")],
    )
    trainer.fit(Regressor())
    steps = [step for step, m in logger.records if "opt/group0/eta" in m]
    assert steps == [1, 3]


def test_resume_from_lightning_checkpoint_matches_uninterrupted_run(tmp_path):
    epochs = 3
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}"
    )
    full = Regressor()
    make_trainer(tmp_path / "a", max_epochs=epochs, logger=False, callbacks=[checkpoints]).fit(full)
    first_epoch = tmp_path / "ckpt" / "epoch=0.ckpt"
    assert first_epoch.is_file()

    resumed = Regressor()
    trainer = make_trainer(
        tmp_path / "b", max_epochs=epochs, logger=False, enable_checkpointing=False
    )
    trainer.fit(resumed, ckpt_path=str(first_epoch))
    assert trainer.global_step == epochs * BATCHES_PER_EPOCH // 2

    opt_full = unwrap_optimizer(full.trainer.optimizers[0]).state_dict()
    opt_resumed = unwrap_optimizer(trainer.optimizers[0]).state_dict()
    assert opt_full["state"].keys() == opt_resumed["state"].keys()
    for key, entry in opt_full["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, opt_resumed["state"][key][name]), (key, name)
    for ga, gb in zip(opt_full["param_groups"], opt_resumed["param_groups"], strict=True):
        for name in ("eta", "kl", "grad_scale", "skipped_steps", "lr"):
            assert torch.equal(torch.as_tensor(ga[name]), torch.as_tensor(gb[name])), name
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
