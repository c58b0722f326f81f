"""Median ``optimizer.step()`` time of arturo next to torch.optim, measured in one process.

Three parameter sets (shapes only; gradients are fixed random tensors):

- ``cnn``: the paper's Fashion-MNIST CNN-F, 0.39M parameters in 10 tensors;
- ``resnet34``: torchvision's ResNet-34 layout with 10 classes, 21.3M parameters in 110
  tensors, built from the standard [3, 4, 6, 3] BasicBlock layout;
- ``gpt2``: GPT-2 small (HF/nanoGPT layout, tied head), 124.4M parameters. That layout has 148
  tensors; the published figures (BENCHMARKS.md) say 145. Time is set by bytes, not by the
  last three small tensors.

Rows: arturo with the foreach and the fused (torch.compile) implementations, Adam(foreach),
AdamW(fused=True) where this torch has it for the device, SGD with momentum (foreach). Ratios
are to Adam(foreach); the fused arturo row also gives its ratio to AdamW(fused). The fused
row's compile time is the wall time of its first step. Memory: persistent optimizer state in
bytes per parameter, and temporaries of one step in parameter-sized buffers (CUDA: peak of
``max_memory_allocated`` above the steady state; CPU: every byte allocated during the step,
summed, from the profiler's memory events -- an upper bound on the peak).

Examples::

    python benchmarks/step_time.py --device cpu --sets cnn resnet34 --repeats 20
    python benchmarks/step_time.py --device cuda --repeats 30 --json runs/step_time_cuda.json
    python benchmarks/step_time.py --device cuda --inductor combo_kernels=1   # CUDA variant
    python benchmarks/step_time.py --epoch --epoch-batches 40   # + fmnist_cnn epoch time

The machine's other load shows in the numbers: on a shared CPU, compare medians from
several runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config
from torch import Tensor

from arturo import Arturo

Shape = tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Parameter sets
# ---------------------------------------------------------------------------------------------


def cnn_f_shapes() -> list[Shape]:
    """CNN-F (BENCHMARKS.md): three unpadded 3x3 convs, then 1152 -> 256 -> 10, with biases."""
    convs = [(32, 1), (64, 32), (128, 64)]
    shapes: list[Shape] = []
    for out_c, in_c in convs:
        shapes += [(out_c, in_c, 3, 3), (out_c,)]
    return shapes + [(256, 1152), (256,), (10, 256), (10,)]


def resnet34_shapes(num_classes: int = 10, in_channels: int = 3) -> list[Shape]:
    """torchvision's resnet34 parameter shapes: stem, [3, 4, 6, 3] BasicBlocks, fc."""
    shapes: list[Shape] = [(64, in_channels, 7, 7), (64,), (64,)]  # conv1, bn1 weight/bias
    in_planes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            shapes += [(planes, in_planes, 3, 3), (planes,), (planes,)]  # conv1, bn1
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]  # conv2, bn2
            if s != 1 or in_planes != planes:
                shapes += [(planes, in_planes, 1, 1), (planes,), (planes,)]  # downsample
            in_planes = planes
    return shapes + [(num_classes, 512), (num_classes,)]


def gpt2_small_shapes(
    vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12
) -> list[Shape]:
    """GPT-2 small: token/position embeddings, 12 blocks, final LayerNorm; head tied."""
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, c_attn, c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, c_fc, c_proj
    return shapes + [(d,), (d,)]


SETS: dict[str, tuple[str, Callable[[], list[Shape]]]] = {
    "cnn": ("CNN-F", cnn_f_shapes),
    "resnet34": ("ResNet-34", resnet34_shapes),
    "gpt2": ("GPT-2 small", gpt2_small_shapes),
}


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------


def _sgd(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)


OPTIMIZERS: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "arturo (foreach)": lambda p: Arturo(p, foreach=True, fused=False),
    "arturo (fused)": lambda p: Arturo(p, fused=True),
    "Adam (foreach)": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    "AdamW (fused)": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
    "SGD+momentum": _sgd,
}
BASELINE = "Adam (foreach)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, Tensor):
                total += v.numel() * v.element_size()
    return total


def _temporaries_bytes(opt: torch.optim.Optimizer, device: torch.device) -> int:
    """Bytes of temporaries of one step (see the module docstring for how)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        opt.step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        opt.step()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events() if e.name != "[memory]")


def time_optimizer(
    name: str, shapes: list[Shape], device: torch.device, repeats: int, warmup: int
) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    params = [(0.02 * torch.randn(s, generator=gen)).to(device) for s in shapes]
    for p in params:
        p.grad = (1e-3 * torch.randn(p.shape, generator=gen)).to(device)
    numel = sum(p.numel() for p in params)
    row: dict[str, object] = {"optimizer": name}
    try:
        opt = OPTIMIZERS[name](params)
        _sync(device)
        t0 = time.perf_counter()
        opt.step()  # creates state; compiles the fused passes
        _sync(device)
        first = time.perf_counter() - t0
    except (RuntimeError, ValueError) as exc:  # e.g. no fused AdamW for this device
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return row
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    row.update(
        median_ms=1e3 * median,
        min_ms=1e3 * min(times),
        first_step_s=first,
        compile_s=max(first - median, 0.0) if "fused" in name and "arturo" in name else None,
        state_bytes_per_param=_state_bytes(opt) / numel,
        temporaries_param_buffers=_temporaries_bytes(opt, device) / (4 * numel),
    )
    del opt, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------
# End-to-end fmnist_cnn epoch (needs the arturo_bench harness)
# ---------------------------------------------------------------------------------------------


def epoch_time(device: torch.device, batches: int | None) -> list[dict[str, object]]:
    """Wall time of one fmnist_cnn training epoch (batch 255) per optimizer, same data order.

    Uses the harness's CNN-F and Fashion-MNIST loader; falls back to random images of the
    same size when the dataset is missing (the time does not depend on the pixels).
    """
    try:
        from arturo_bench.data import load_fashion_mnist
        from arturo_bench.models import CNNF
    except ImportError as exc:
        raise SystemExit(
            f"--epoch needs the arturo_bench harness (pip install -e .): {exc}"
        ) from exc
    try:
        data = load_fashion_mnist()
        x_all, y_all, source = data.train_x, data.train_y, data.source
    except FileNotFoundError:
        gen = torch.Generator().manual_seed(0)
        x_all = torch.randint(0, 256, (60000, 1, 28, 28), generator=gen, dtype=torch.uint8)
        y_all = torch.randint(0, 10, (60000,), generator=gen)
        source = "random images (Fashion-MNIST not found)"
    x_all, y_all = x_all.to(device), y_all.to(device)
    n_batches = len(y_all) // 255 + (len(y_all) % 255 > 0)
    n = min(n_batches, batches) if batches else n_batches
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for name, make in (
        ("arturo (default)", lambda p: Arturo(p)),
        ("arturo (fused)", lambda p: Arturo(p, fused=True)),
        ("Adam", lambda p: torch.optim.Adam(p, lr=1e-3)),
    ):
        torch.manual_seed(0)
        model = CNNF().to(device)
        opt = make(list(model.parameters()))

        def train_batch(i: int, model=model, opt=opt) -> None:
            idx = order[i * 255 : (i + 1) * 255]
            x = x_all[idx].float() / 255.0
            loss = torch.nn.functional.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        train_batch(0)  # compiles the fused passes; not part of the epoch time
        _sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(1, n):
            train_batch(i)
        _sync(device)
        per_batch = (time.perf_counter() - t0) / max(n - 1, 1)
        rows.append(
            {
                "optimizer": name,
                "epoch_s": per_batch * n_batches,
                "batches_timed": n - 1,
                "first_batch_s": warm,
                "data": source,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _environment(device: torch.device) -> dict[str, object]:
    env: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        env["cpu"] = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln), ""
        )
    except OSError:
        env["cpu"] = platform.processor()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        env["git"] = sha
    except OSError:
        pass
    return env


def _fmt(value: object, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(label: str, shapes: list[Shape], rows: list[dict[str, object]]) -> None:
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    print(f"\n### {label}: {numel / 1e6:.2f}M parameters, {len(shapes)} tensors\n")
    base = next((r for r in rows if r["optimizer"] == BASELINE and "median_ms" in r), None)
    fused_adamw = next(
        (r for r in rows if r["optimizer"] == "AdamW (fused)" and "median_ms" in r), None
    )
    print(
        "| optimizer | median step | min step | × Adam(foreach) | × AdamW(fused) | compile "
        "| state B/param | step temporaries (param buffers) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['optimizer']} | {r['error']} |  |  |  |  |  |  |")
            continue
        med = r["median_ms"]
        vs_base = med / base["median_ms"] if base else None
        vs_fused = med / fused_adamw["median_ms"] if fused_adamw else None
        compile_s = r.get("compile_s")
        print(
            f"| {r['optimizer']} | {med:.3f} ms | {r['min_ms']:.3f} ms | {_fmt(vs_base, '.2f')} "
            f"| {_fmt(vs_fused, '.2f')} | {_fmt(compile_s, '.1f') + ' s' if compile_s else ''} "
            f"| {r['state_bytes_per_param']:.1f} | {r['temporaries_param_buffers']:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device")
    parser.add_argument(
        "--sets", nargs="+", choices=list(SETS), default=list(SETS), help="parameter sets"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument(
        "--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS)
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Inductor option for the fused CUDA passes, e.g. combo_kernels=1 (repeatable)",
    )
    parser.add_argument(
        "--epoch", action="store_true", help="also time a fmnist_cnn epoch: arturo vs Adam"
    )
    parser.add_argument(
        "--epoch-batches",
        type=int,
        default=None,
        help="time only this many batches and scale to the full epoch (236 for Fashion-MNIST)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.inductor:
        from arturo._kernels import compiled

        defaults = torch._inductor.config.get_config_copy()
        for item in args.inductor:
            key, _, value = item.partition("=")
            if key not in defaults:
                parser.error(f"--inductor {item}: no Inductor option {key!r}")
            kind = type(defaults[key])  # options are type-checked: cast to the option's type
            if kind is bool:
                compiled.CUDA_COMPILE_OPTIONS[key] = value.lower() in ("1", "true", "yes")
            elif kind in (int, float):
                compiled.CUDA_COMPILE_OPTIONS[key] = kind(value)
            else:
                compiled.CUDA_COMPILE_OPTIONS[key] = value

    env = _environment(device)
    print(f"# optimizer.step() time, median of {args.repeats} steps")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    if args.inductor:
        print(f"Inductor options for the fused CUDA passes: {args.inductor}")
    results: dict[str, object] = {"environment": env, "args": vars(args) | {"json": str(args.json)}}
    for key in args.sets:
        label, make_shapes = SETS[key]
        shapes = make_shapes()
        rows = [
            time_optimizer(name, shapes, device, args.repeats, args.warmup)
            for name in args.optimizers
        ]
        print_table(label, shapes, rows)
        results[key] = rows
        sys.stdout.flush()
    if args.epoch:
        rows = epoch_time(device, args.epoch_batches)
        adam = next(r for r in rows if r["optimizer"] == "Adam")
        print(f"\n### fmnist_cnn, one training epoch (batch 255), data: {rows[0]['data']}\n")
        print("| optimizer | epoch time | × Adam | first batch (compile) |")
        print("|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['optimizer']} | {r['epoch_s']:.2f} s | {r['epoch_s'] / adam['epoch_s']:.2f} "
                f"| {r['first_batch_s']:.1f} s |"
            )
        if args.epoch_batches:
            print(f"\n(timed {rows[0]['batches_timed']} batches, scaled to the whole epoch)")
        results["epoch"] = rows
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
