"""Test accuracy of an MLP on scikit-learn's digits when the loss is multiplied by a constant:
arturo in absolute and relative units (each with its defaults) against AdamW (torch's
defaults). The example of issue 12: a user's loss in other units than the CNN the published
settings were tuned on.

    python benchmarks/loss_scale.py [--scales 0.01 1 100] [--epochs 30] [--seeds 0 1 2]

Prints one row per optimizer and scale: mean ± std of the final test accuracy over seeds.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from arturo import Arturo

OPTIMIZERS = {
    "arturo (absolute)": lambda p: Arturo(p, units="absolute"),
    "arturo (relative)": lambda p: Arturo(p, units="relative"),
    "AdamW": lambda p: torch.optim.AdamW(p),
}


def digits(seed: int) -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed)
    return (
        torch.tensor(x_tr, dtype=torch.float32),
        torch.tensor(y_tr),
        torch.tensor(x_te, dtype=torch.float32),
        torch.tensor(y_te),
    )


def accuracy(name: str, scale: float, seed: int, epochs: int, batch: int = 32) -> float:
    x_tr, y_tr, x_te, y_te = digits(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = OPTIMIZERS[name](model.parameters())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y_tr), generator=gen).split(batch):
            opt.zero_grad()
            (nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]) * scale).backward()
            opt.step()
    with torch.no_grad():
        return (model(x_te).argmax(1) == y_te).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.01, 1.0, 100.0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| optimizer | " + " | ".join(f"loss × {s:g}" for s in args.scales) + " |")
    print("|---|" + "---|" * len(args.scales))
    for name in OPTIMIZERS:
        cells = []
        for scale in args.scales:
            accs = [accuracy(name, scale, seed, args.epochs) for seed in args.seeds]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.4f} ± {std:.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
