"""A training loop of your own with Accelerate and Arturo, with gradient accumulation.

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``: its ``step()``
does nothing while gradients accumulate, and it does not forward Arturo's own methods, so
``unwrap_optimizer`` reaches the Arturo inside for ``stats()``.

    python examples/accelerate_loop.py --steps 20
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

from arturo import Arturo
from arturo.integrations import unwrap_optimizer


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args(argv)

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulate)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    x = torch.randn(32 * args.steps * args.accumulate, 16)
    y = x[:, :4].sum(dim=1, keepdim=True).tanh()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    optimizer = Arturo(model.parameters())  # the unit-free defaults
    # Linear warmup of the KL bound ε, stepped once per optimizer step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, step / args.warmup)
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    steps = 0
    for inputs, targets in loader:
        with accelerator.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()  # a no-op until the last batch of each accumulation
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            steps += 1
            if steps % 5 == 0 or steps == args.steps:  # stats() reads the device: log sparsely
                stats = unwrap_optimizer(optimizer).stats()[0]
                accelerator.print(f"step {steps} loss {loss.item():.4f} {stats}")
            if steps == args.steps:
                break
    return unwrap_optimizer(optimizer).stats()


if __name__ == "__main__":
    main()
