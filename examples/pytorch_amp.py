"""Plain PyTorch: Arturo with automatic mixed precision and gradient accumulation.

- ``bf16`` (CPU or CUDA): autocast alone. A step whose gradient holds NaN or ±inf is skipped
  by Arturo itself (``nonfinite="skip"``) and counted in ``stats()``.
- ``fp16``: autocast with a ``GradScaler``. ``scaler.step(optimizer)`` unscales the gradients
  and calls ``optimizer.step()`` only when they are finite; Arturo's KL bound is about the
  unscaled gradients, so never step on scaled ones.

    python examples/pytorch_amp.py --steps 20 --amp bf16
"""

from __future__ import annotations

import argparse

import torch

from arturo import Arturo


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    parser.add_argument("--accumulate", type=int, default=2)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)
    ).to(device)
    optimizer = Arturo(model.parameters())  # the unit-free defaults
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device, enabled=args.amp == "fp16")

    for step in range(args.steps):
        for _ in range(args.accumulate):
            x = torch.randn(32, 16, device=device)
            y = x[:, :4].sum(dim=1, keepdim=True).tanh()
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            # Divide so that the step sees the mean gradient over the accumulated batches.
            scaler.scale(loss / args.accumulate).backward()
        scaler.step(optimizer)  # with the scaler disabled, just optimizer.step()
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        warmup.step()
        if (step + 1) % 5 == 0 or step + 1 == args.steps:  # stats() syncs: log sparsely
            print(f"step {step + 1} loss {loss.item():.4f} {optimizer.stats()[0]}")
    return optimizer.stats()


if __name__ == "__main__":
    main()
