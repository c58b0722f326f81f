"""Re-fit the posterior's sampling temperature of finished calibration runs with the library's
``arturo.fit_sampling_temperature`` (a grid scan, then golden-section search) and set it beside
the temperature the harness recorded (a plain golden-section search over the same range).

    python benchmarks/posterior_temperature.py RUN_DIR [RUN_DIR ...] [--samples 32]

RUN_DIR is an arturo run of ``arturo-bench run --eval-samples K`` with its checkpoint, e.g.
results/uncertainty/fmnist_cnn/arturo-relative/seed1. The temperature is fitted on the run's
validation split; the test set only scores the result. Needs the run's dataset.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from arturo import fit_sampling_temperature, predict
from arturo.posterior import mean_nll
from arturo_bench.configs import apply_overrides, get_experiment, optimizer_config, scale_epochs
from arturo_bench.data import load_dataset, prepare_batch
from arturo_bench.models import build_model
from arturo_bench.optimizers import build_optimizer
from arturo_bench.resume import restore
from arturo_bench.runs import RunStore
from arturo_bench.train import run_config

# The settings a calibration run's config.json may differ in from its experiment's defaults.
RUN_FIELDS = ("val_split", "eval_samples", "train_subset", "test_subset", "milestones")


def load_run(run_dir: Path):
    """The run's model and optimizer at its last saved epoch, its data split and history."""
    saved = json.loads((run_dir / "config.json").read_text())
    exp = scale_epochs(get_experiment(saved["name"]), saved["epochs"])
    overrides = [
        f"{k}={','.join(map(str, saved[k])) if isinstance(saved[k], list) else saved[k]}"
        for k in RUN_FIELDS
    ]
    exp = apply_overrides(exp, overrides)
    name, seed = saved["optimizer"], saved["seed"]
    data = load_dataset(exp.dataset, None).hold_out(exp.val_split)
    data = data.subset(exp.train_subset, exp.test_subset)
    torch.manual_seed(seed)
    model = build_model(exp.model, num_classes=data.num_classes, in_channels=data.in_channels)
    cfg = optimizer_config(exp, name)
    opt = build_optimizer(cfg, model.parameters(), num_train=len(data.train_y))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(exp.milestones), gamma=cfg.gamma)
    # restore() checks the rebuilt config against config.json, so a mismatch cannot pass.
    config = run_config(exp, name, seed, quick=False)
    history = restore(RunStore(run_dir), config, model, opt, sched)
    return model.eval(), opt, data, history


def batched(model: torch.nn.Module, batch_size: int = 1000):
    """``model`` applied in batches: predict() takes any callable."""
    return lambda x: torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    print("| run | harness T | library T | test NLL, T = 1 | test NLL, library T | fit (s) |")
    print("|---|---|---|---|---|---|")
    for run_dir in args.runs:
        model, opt, data, history = load_run(run_dir)
        fn, n = batched(model), len(data.train_y)
        x_val, x_test = prepare_batch(data.name, data.val_x), prepare_batch(data.name, data.test_x)
        start = time.perf_counter()
        t = fit_sampling_temperature(
            fn, opt, x_val, data.val_y, samples=args.samples, dataset_size=n,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        fit_s = time.perf_counter() - start
        nll = []
        for temperature in (1.0, t):
            gen = torch.Generator().manual_seed(1)
            probs = predict(fn, opt, x_test, samples=args.samples, generator=gen,
                            dataset_size=n, temperature=temperature)  # fmt: skip
            nll.append(mean_nll(probs, data.test_y))
        harness_t = history[-1].get("bma_temperature", float("nan"))
        cells = [run_dir, f"{harness_t:.3g}", f"{t:.3g}", f"{nll[0]:.4f}", f"{nll[1]:.4f}"]
        print("| " + " | ".join(map(str, [*cells, f"{fit_s:.0f}"])) + " |", flush=True)


if __name__ == "__main__":
    main()
