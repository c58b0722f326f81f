"""Per-tensor gradient RMS of the Fashion-MNIST CNN (CNN-F) while arturo trains it with the
published settings: the scales the relative mode measures (docs/defaults.md).

    python benchmarks/gradient_scales.py [--steps 300] [--report 0 10 100 300]

Needs Fashion-MNIST (arturo-bench fetch-data, or Debian's dataset-fashion-mnist).
"""

from __future__ import annotations

import argparse
import math

import torch

from arturo import Arturo
from arturo_bench.data import load_fashion_mnist, prepare_batch
from arturo_bench.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--report", type=int, nargs="+", default=[0, 10, 100, 300])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = load_fashion_mnist()
    model = build_model("cnn_f", num_classes=10, in_channels=1)
    opt = Arturo(model.parameters(), units="absolute")
    print(f"parameters: {sum(p.numel() for p in model.parameters())}")
    for step in range(args.steps + 1):
        idx = torch.randint(0, len(data.train_y), (args.batch,))
        x = prepare_batch(data.name, data.train_x[idx])
        loss = torch.nn.functional.cross_entropy(model(x), data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        if step in args.report:
            rms = [p.grad.square().mean().sqrt().item() for p in model.parameters()]
            geo = math.exp(sum(math.log(r) for r in rms) / len(rms))
            print(
                f"step {step}: loss {loss.item():.3f}, gradient RMS per tensor "
                f"{min(rms):.2g} to {max(rms):.2g}, geometric mean {geo:.3g}"
            )
        opt.step()


if __name__ == "__main__":
    main()
