"""Median ``optimizer.step()`` time of arturo next to torch.optim, measured in one process.

Three parameter sets (shapes only; gradients are fixed random tensors):

- ``cnn``: the paper's Fashion-MNIST CNN-F, 0.39M parameters in 10 tensors;
- ``resnet34``: torchvision's ResNet-34 layout with 10 classes, 21.3M parameters in 110
  tensors, built from the standard [3, 4, 6, 3] BasicBlock layout;
- ``gpt2``: GPT-2 small (HF/nanoGPT layout, tied head), 124.4M parameters. That layout has 148
  tensors; the published figures (docs/published.md) say 145. Time is set by bytes, not by the
  last three small tensors.

Rows: arturo with the foreach and the fused (torch.compile) implementations, Adam(foreach),
AdamW(fused=True) where this torch has it for the device, SGD with momentum (foreach). Ratios
are to Adam(foreach); the fused arturo row also gives its ratio to AdamW(fused). The fused
row's compile time is the wall time of its first step. Memory: persistent optimizer state in
bytes per parameter, and temporaries of one step in parameter-sized buffers (CUDA: peak of
``max_memory_allocated`` above the steady state; CPU: every byte allocated during the step,
summed, from the profiler's memory events -- an upper bound on the peak).

Protocol: all optimizers of a set live in one process and are stepped **interleaved**, one
step each per round (the order rotating from round to round), so that the machine's other
load falls on all of them alike; after the first step (state, compilation) and ``--warmup``
rounds, each row is the median of ``--repeats`` (at least 15) timed steps. ``--threads 1 2``
runs the whole measurement once per thread count, each in a fresh process (Inductor
specialises its CPU loops on the thread count), and ends with the fused ÷ Adam(foreach)
ratios side by side. ``--passes`` adds the fused step's time per pass. On the CPU, glibc is
told to keep freed memory (:func:`pin_malloc`), so that no optimizer's time depends on whether
its temporaries happen to page-fault in this process.

Examples::

    python benchmarks/step_time.py --device cpu --sets cnn resnet34 --threads 1 2
    python benchmarks/step_time.py --sets resnet34 --optimizers "arturo (fused)" \
        "Adam (foreach)" --threads 1 --passes --inductor dual:reorder_for_locality=1
    python benchmarks/step_time.py --device cuda --repeats 30 --json runs/step_time_cuda.json
    python benchmarks/step_time.py --device cuda --inductor combo_kernels=1   # CUDA variant
    python benchmarks/step_time.py --epoch --epoch-batches 40   # + fmnist_cnn epoch time

The machine's other load shows in the numbers: on a shared CPU, compare medians from
several runs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
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
    """CNN-F (docs/published.md): three unpadded 3x3 convs, then 1152 -> 256 -> 10, with biases."""
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
    "arturo (foreach)": lambda p: Arturo(p, units="absolute", foreach=True, fused=False),
    "arturo (fused)": lambda p: Arturo(p, units="absolute", fused=True),
    "arturo (foreach, relative)": lambda p: Arturo(p, units="relative", foreach=True),
    "arturo (fused, relative)": lambda p: Arturo(p, units="relative", fused=True),
    "Adam (foreach)": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    "AdamW (fused)": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
    "SGD+momentum": _sgd,
}
BASELINE = "Adam (foreach)"


def pin_malloc() -> bool:
    """Keeps freed memory in the process (glibc's ``mallopt``), for the whole run.

    By default glibc returns a large freed block at the top of the heap to the OS, so an
    optimizer that allocates parameter-sized temporaries every step (Adam(foreach): one buffer
    per parameter) page-faults them in again every step. Whether it does depends on the
    process's allocation history: Adam(foreach) took 37 ms or 70 ms per ResNet-34 step in
    otherwise identical runs (18,500 minor faults per step in the slow ones). Fixed thresholds
    give every run the fault-free figure, the stricter baseline for arturo's fused step, which
    allocates nothing. ``--malloc default`` skips this.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        # 32 MiB is the largest mmap threshold glibc accepts; blocks below it come from the
        # heap, which is then never trimmed.
        return bool(
            libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
        )
    except (OSError, AttributeError):  # not glibc
        return False


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


class _TimedPass:
    """Wraps one pass of the fused step and records its wall time per call."""

    def __init__(self, fn: Callable, device: torch.device, log: list[float]) -> None:
        self.fn, self.device, self.log = fn, device, log

    def __call__(self, *args: object) -> object:
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.fn(*args)
        _sync(self.device)
        self.log.append(time.perf_counter() - t0)
        return out


def _time_passes(device: torch.device) -> dict[str, list[float]]:
    """Times every call of the fused passes from now on; returns the logs, by pass name."""
    from arturo._kernels import compiled

    passes = compiled.fused_passes(device.type)
    logs: dict[str, list[float]] = {}
    for name in compiled.PASS_NAMES:
        logs[name] = []
        fn = getattr(passes, name)
        if isinstance(fn, _TimedPass):  # a second parameter set in the same process
            fn = fn.fn
        setattr(passes, name, _TimedPass(fn, device, logs[name]))
    return logs


def time_set(
    names: list[str],
    shapes: list[Shape],
    device: torch.device,
    repeats: int,
    warmup: int,
    passes: bool = False,
) -> tuple[list[dict[str, object]], dict[str, dict[str, float]]]:
    """Rows of the optimizers ``names`` on one parameter set, stepped interleaved (see the
    module docstring), and the fused step's median time per pass call (with ``passes``)."""
    gen = torch.Generator().manual_seed(0)
    init = [0.02 * torch.randn(s, generator=gen) for s in shapes]
    grads = [1e-3 * torch.randn(s, generator=gen) for s in shapes]
    numel = sum(p.numel() for p in init)
    rows = {name: {"optimizer": name} for name in names}
    live: dict[str, torch.optim.Optimizer] = {}
    logs: dict[str, list[float]] = {}
    for name in names:
        params = [p.to(device, copy=True) for p in init]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(device, copy=True)
        try:
            opt = OPTIMIZERS[name](params)
            _sync(device)
            t0 = time.perf_counter()
            opt.step()  # creates state; compiles the fused passes
            _sync(device)
            rows[name]["first_step_s"] = time.perf_counter() - t0
        except (RuntimeError, ValueError) as exc:  # e.g. no fused AdamW for this device
            rows[name]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        live[name] = opt
    for _ in range(warmup):
        for opt in live.values():
            opt.step()
    if passes and "arturo (fused)" in live:
        logs = _time_passes(device)
    order = list(live)
    times: dict[str, list[float]] = {name: [] for name in order}
    for i in range(repeats):
        k = i % len(order)
        for name in order[k:] + order[:k]:
            _sync(device)
            t0 = time.perf_counter()
            live[name].step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    per_pass = {
        name: {"median_ms": 1e3 * statistics.median(log), "calls_per_step": len(log) / repeats}
        for name, log in logs.items()
        if log
    }
    if logs:
        for log in logs.values():
            log.clear()
    for name, opt in live.items():
        median = statistics.median(times[name])
        rows[name].update(
            median_ms=1e3 * median,
            min_ms=1e3 * min(times[name]),
            compile_s=(
                max(rows[name]["first_step_s"] - median, 0.0)
                if "fused" in name and "arturo" in name
                else None
            ),
            state_bytes_per_param=_state_bytes(opt) / numel,
            temporaries_param_buffers=_temporaries_bytes(opt, device) / (4 * numel),
        )
    del live
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [rows[name] for name in names], per_pass


def configure_inductor(device: torch.device, items: list[str]) -> dict[str, dict[str, object]]:
    """Builds the fused passes for ``device`` with ``[PASS:]KEY=VALUE`` Inductor options on
    top of arturo's own (every pass, or the named one); returns the options of each pass."""
    from arturo._kernels import compiled

    options = compiled.pass_options(device.type)
    defaults = torch._inductor.config.get_config_copy()
    for item in items:
        name, _, value = item.partition("=")
        target, _, key = name.rpartition(":")
        if key not in defaults:
            raise ValueError(f"--inductor {item}: no Inductor option {key!r}")
        if target and target not in compiled.PASS_NAMES:
            raise ValueError(f"--inductor {item}: no pass {target!r} in {compiled.PASS_NAMES}")
        kind = type(defaults[key])  # options are type-checked: cast to the option's type
        if kind is bool:
            cast: object = value.lower() in ("1", "true", "yes")
        elif kind in (int, float):
            cast = kind(value)
        elif defaults[key] is None:  # e.g. cpp.simdlen: a number when set
            try:
                cast = int(value)
            except ValueError:
                cast = value
        else:
            cast = value
        for name in [target] if target else compiled.PASS_NAMES:
            options[name][key] = cast
    compiled._PASSES[device.type] = compiled.FusedPasses(options)
    return options


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
        ("arturo (absolute)", lambda p: Arturo(p, units="absolute")),
        ("arturo (fused, absolute)", lambda p: Arturo(p, units="absolute", fused=True)),
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


def print_passes(per_pass: dict[str, dict[str, float]]) -> None:
    if not per_pass:
        return
    print("\n| fused pass | median per call | calls per step | per step |")
    print("|---|---|---|---|")
    total = 0.0
    for name, r in per_pass.items():
        step_ms = r["median_ms"] * r["calls_per_step"]
        total += step_ms
        print(f"| {name} | {r['median_ms']:.2f} ms | {r['calls_per_step']:g} | {step_ms:.1f} ms |")
    print(f"| all passes |  |  | {total:.1f} ms |")


def print_side_by_side(runs: list[dict[str, object]]) -> None:
    """fused ÷ Adam(foreach) of every set, one column group per thread count."""
    threads = [run["environment"]["threads"] for run in runs]
    sets = [key for key in SETS if any(key in run for run in runs)]
    print("\n### arturo (fused) against Adam (foreach), by thread count\n")
    head = " | ".join(f"fused, {t} thr | Adam(foreach), {t} thr | ratio, {t} thr" for t in threads)
    print(f"| parameter set | {head} |")
    print("|---|" + "---|---|---|" * len(runs))
    for key in sets:
        cells = []
        for run in runs:
            rows = {r["optimizer"]: r for r in run.get(key, [])}
            fused, adam = rows.get("arturo (fused)", {}), rows.get(BASELINE, {})
            if "median_ms" in fused and "median_ms" in adam:
                ratio = fused["median_ms"] / adam["median_ms"]
                cells.append(
                    f"{fused['median_ms']:.1f} ms | {adam['median_ms']:.1f} ms | {ratio:.2f}×"
                )
            else:
                cells.append("n/a | n/a | n/a")
        print(f"| {SETS[key][0]} | " + " | ".join(cells) + " |")


def _per_thread_count(args: argparse.Namespace) -> int:
    """Runs this script once per ``--threads`` value, each in a fresh process, then prints
    the side-by-side summary."""
    runs = []
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            out = Path(tmp) / f"threads_{threads}.json"
            cmd = [sys.executable, __file__, "--device", args.device, "--sets", *args.sets]
            cmd += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
            cmd += ["--optimizers", *args.optimizers, "--threads", str(threads)]
            cmd += [f"--inductor={item}" for item in args.inductor]
            cmd += ["--passes"] if args.passes else []
            cmd += ["--malloc", args.malloc]
            cmd += ["--json", str(out)]
            if args.epoch:
                cmd += ["--epoch"]
                if args.epoch_batches:
                    cmd += ["--epoch-batches", str(args.epoch_batches)]
            print(f"\n## {threads} thread{'s' if threads > 1 else ''}", flush=True)
            rc = subprocess.run(cmd, check=False).returncode
            status = status or rc
            if rc == 0:
                runs.append(json.loads(out.read_text()))
    if runs:
        print_side_by_side(runs)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs, indent=2))
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device")
    parser.add_argument(
        "--sets", nargs="+", choices=list(SETS), default=list(SETS), help="parameter sets"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds after the first")
    parser.add_argument(
        "--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS)
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch.set_num_threads; several values: one fresh process each, then a summary",
    )
    parser.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="[PASS:]KEY=VALUE",
        help="Inductor option for the fused passes on --device, all of them or the named one "
        "(filter, dual, apply, gradient_checks), e.g. combo_kernels=1 (repeatable)",
    )
    parser.add_argument(
        "--passes", action="store_true", help="also time each pass of the fused step"
    )
    parser.add_argument(
        "--malloc",
        choices=["pinned", "default"],
        default="pinned",
        help="pinned: glibc keeps freed memory (no page faults per step; see pin_malloc)",
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
    if args.threads and len(args.threads) > 1:
        return _per_thread_count(args)
    if args.threads:
        torch.set_num_threads(args.threads[0])
    malloc = "default"
    if args.malloc == "pinned" and device.type == "cpu":
        malloc = "pinned" if pin_malloc() else "default (mallopt unavailable)"
    options = None
    if args.inductor:
        try:
            options = configure_inductor(device, args.inductor)
        except ValueError as exc:
            parser.error(str(exc))

    env = _environment(device) | {"malloc": malloc}
    print(f"# optimizer.step() time, median of {args.repeats} interleaved steps")
    if args.repeats < 15:
        print(f"(--repeats {args.repeats}: fewer than the 15 steps of the protocol)")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    if options:
        print(f"Inductor options of the fused passes: {options}")
    results: dict[str, object] = {"environment": env, "args": vars(args) | {"json": str(args.json)}}
    for key in args.sets:
        label, make_shapes = SETS[key]
        shapes = make_shapes()
        rows, per_pass = time_set(
            args.optimizers, shapes, device, args.repeats, args.warmup, args.passes
        )
        print_table(label, shapes, rows)
        print_passes(per_pass)
        results[key] = rows
        if per_pass:
            results[f"{key}_passes"] = per_pass
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
