"""Recovery after a single gradient spike: arturo next to Adam on a linear regression.

A noiseless linear regression (20 features, 1 output, 256 fixed samples, full batch, MSE) is
trained from the same seed with ``Arturo(lr=0.05, units="absolute")`` (the published units,
other arguments default) and with
``torch.optim.Adam(lr=1e-2)``, and with arturo's gradient-outlier check switched off
(``outlier_threshold=math.inf``), which shows what the filter's and the dual's own guards
achieve alone. At one step (``--spike-step``) the loss is multiplied by a
finite factor s before ``backward()``, as a loss-scaling bug or one bad batch would do; the
gradient stays finite, so arturo's non-finite guard does not see it. Each row is one
(optimizer, s) run. "Loss at step k" is the unscaled loss after k optimizer steps; the
spiked step is step number ``--spike-step`` (0-based), so the first loss it affects is the
one at ``spike_step + 1``.

Columns: the loss right after the spike, the loss after the last step, the steps after the
spike until the loss is back below its value at ``spike_step - 1`` for good, i.e. below it
from then to the last step ("never" otherwise: a dip below that climbs back out does not
count), and for arturo the ``skipped_steps`` counter and η of its stats() at the end. A run
whose optimizer stops moving after the spike counts as recovered if it stopped below the
pre-spike loss (Adam at s = 1e30 here), so read the recovery column with the final loss.

Run (a few seconds on one CPU thread)::

    python benchmarks/spike_recovery.py
    python benchmarks/spike_recovery.py --steps 400 --spike-step 50 --scales 1 1e8 1e18

It is a measurement, not a test: nothing is asserted, and NaN or inf losses are reported.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from arturo import Arturo

FEATURES = 20
SAMPLES = 256
ADAM_LR = 1e-2
ARTURO_LR = 0.05
LABELS = {
    "arturo": f"arturo (lr {ARTURO_LR:g})",
    "arturo-nocheck": f"arturo (lr {ARTURO_LR:g}, outlier_threshold=inf)",
    "adam": f"Adam (lr {ADAM_LR:g})",
}


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, FEATURES, generator=gen)
    w = 0.1 * torch.randn(FEATURES, 1, generator=gen)
    return x, x @ w  # noiseless: the loss can go to 0


def train(
    name: str, scale: float, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> dict[str, object]:
    torch.manual_seed(args.seed)  # the same initial weights for every run
    model = torch.nn.Linear(FEATURES, 1)
    if name == "arturo":
        opt: torch.optim.Optimizer = Arturo(model.parameters(), lr=ARTURO_LR, units="absolute")
    elif name == "arturo-nocheck":  # the filter's and the dual's own guards alone
        opt = Arturo(model.parameters(), lr=ARTURO_LR, units="absolute", outlier_threshold=math.inf)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=ADAM_LR)

    def loss_now() -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(x), y)

    losses = []  # losses[k]: after k steps
    for k in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_now()
        losses.append(loss.item())
        (loss * scale if k == args.spike_step else loss).backward()
        opt.step()
    with torch.no_grad():
        losses.append(loss_now().item())

    row: dict[str, object] = {"optimizer": name, "scale": scale, "losses": losses}
    if isinstance(opt, Arturo):
        stats = opt.stats()[0]
        row["skipped"], row["eta"] = stats["skipped_steps"], stats["eta"]
    return row


def recovery(losses: list[float], spike_step: int) -> str:
    """Steps after the spike until the loss is below its value at ``spike_step - 1`` and
    stays there to the end; a NaN loss is never below."""
    before = losses[spike_step - 1]
    above = [k for k in range(spike_step + 1, len(losses)) if not losses[k] < before]
    if not above:
        return "1"
    if above[-1] == len(losses) - 1:
        return "never"
    return str(above[-1] + 1 - spike_step)


def fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--spike-step", type=int, default=20, help="0-based step to spike")
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[1.0, 1e3, 1e6, 1e12, 1e18, 1e30],
        help="loss multipliers at the spike step (1: no spike)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not 1 <= args.spike_step < args.steps:
        parser.error("--spike-step must be in [1, --steps)")
    torch.set_num_threads(args.threads)

    x, y = make_data(args.seed)
    start = time.perf_counter()
    names, scales = ("arturo", "arturo-nocheck", "adam"), args.scales
    rows = [train(name, scale, x, y, args) for name in names for scale in scales]
    s = args.spike_step
    # Every run of one optimizer shares its trajectory up to the spike.
    firsts = rows[:: len(scales)]
    before = ", ".join(f"{n} {fmt(r['losses'][s - 1])}" for n, r in zip(names, firsts, strict=True))
    print(
        f"Linear regression {SAMPLES}x{FEATURES}, full batch, {args.steps} steps, loss x s "
        f"at step {s}, seed {args.seed}; arturo lr={ARTURO_LR} in absolute units (defaults "
        f"otherwise), Adam lr={ADAM_LR}. Loss at step {s - 1}, before any spike: {before}.\n"
    )
    print(
        f"| optimizer | s | loss at step {s + 1} | loss at step {args.steps} "
        f"| steps to recover | skipped steps | final η |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        losses = row["losses"]
        print(
            f"| {LABELS[row['optimizer']]} | {row['scale']:g} | {fmt(losses[s + 1])} "
            f"| {fmt(losses[-1])} | {recovery(losses, s)} "
            f"| {row.get('skipped', '—')} "
            f"| {fmt(row['eta']) if 'eta' in row else '—'} |"
        )
    print(f"\n{len(rows)} runs in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
