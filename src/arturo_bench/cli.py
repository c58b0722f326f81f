"""``arturo-bench``: run the paper's experiments, report on saved runs, fetch data."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import configs
from .configs import QUICK, apply_overrides, get_experiment, scale_epochs
from .data import DataNotFoundError, fetch_fashion_mnist, load_dataset
from .optimizers import OptionalDependencyError
from .runs import RunDirError, run_dir
from .suite import add_arguments as add_suite_arguments
from .suite import listing as suite_listing
from .suite import run_command as run_suite_command

__all__ = ["main", "build_parser"]

# The validation split of the calibration protocol: the last 5000 of Fashion-MNIST's 60k
# training images, a common size for fitting one temperature, leaving 55k to train on.
DEFAULT_VAL_SPLIT = 5000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arturo-bench",
        description="Reproduce the arTuRO paper's experiments side by side with Adam, AdamW, SGD.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="list the experiments and optimizers")

    def add_config_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--epochs",
            type=int,
            help="train this many epochs; milestones scale in proportion (120 at 60/90 -> "
            "40 at 20/30)",
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set arturo.lr=0.05 --set milestones=20,30 "
            "(repeatable; see `arturo-bench show EXPERIMENT` for the keys)",
        )
        p.add_argument(
            "--eval-samples",
            type=int,
            metavar="K",
            help="the calibration protocol (docs/uncertainty.md): hold out a validation split, "
            "record NLL, Brier and ECE every epoch, and at every 10th and the last also the "
            "K-sample model average (arturo, ivon), temperature scaling and the OOD AUROC",
        )
        p.add_argument(
            "--val-split",
            type=int,
            metavar="N",
            help=f"validation images held out of the end of the training set (default with "
            f"--eval-samples: {DEFAULT_VAL_SPLIT}; alone: the protocol without a model average)",
        )

    show = sub.add_parser("show", help="print an experiment's resolved config as JSON")
    show.add_argument("experiment", choices=sorted(configs.EXPERIMENTS))
    add_config_flags(show)

    run = sub.add_parser("run", help="train one experiment with several optimizers and seeds")
    run.add_argument(
        "experiment",
        nargs="?",
        choices=sorted(configs.EXPERIMENTS),
        help="experiment to run (optional with --quick, which uses fmnist_cnn)",
    )
    run.add_argument(
        "--optimizers",
        nargs="+",
        choices=sorted(configs.OPTIMIZERS),
        help="optimizers to compare (default: arturo adam adamw sgd; --quick: arturo adam sgd)",
    )
    run.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="seeds, one run each (default: 0)"
    )
    run.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="training device; auto = cuda when available (default: auto)",
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help=f"a {QUICK['train_subset']}-image Fashion-MNIST subset, {QUICK['epochs']} epochs, "
        "arturo vs adam vs sgd: a few minutes on a laptop CPU",
    )
    run.add_argument("--out", default="runs", help="directory for the runs (default: runs/)")
    run.add_argument(
        "--data-dir",
        help="dataset directory (default: $ARTURO_DATA, else /usr/share/datasets/fashion-mnist "
        "or ~/.cache/arturo-bench/fashion-mnist)",
    )
    run.add_argument(
        "--no-progress", action="store_true", help="no progress bar (epoch lines only)"
    )
    run.add_argument(
        "--restart",
        action="store_true",
        help="start these runs over: delete the files of any earlier run in their directories "
        "(config, metrics, checkpoint) instead of resuming it",
    )
    run.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="train on when an epoch applied a step with a NaN or inf training loss (default: "
        "stop that run, keep its last good epoch, exit with status 3)",
    )
    add_config_flags(run)

    report = sub.add_parser("report", help="markdown table and PNG plots from saved runs")
    report.add_argument("run_dirs", nargs="+", help="run directories, or folders containing them")
    report.add_argument("--out", default="report", help="output directory (default: report/)")
    report.add_argument(
        "--target", type=float, default=0.90, help="test accuracy for 'first epoch reaching'"
    )
    report.add_argument(
        "--at-epochs",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="also tabulate test accuracy at these epochs, e.g. --at-epochs 10 20 40",
    )
    report.add_argument(
        "--paired",
        default=None,
        metavar="OPTIMIZER",
        help="also tabulate final test accuracy minus this optimizer's, seed by seed "
        "(the same seed means the same initial weights and data order), e.g. --paired arturo",
    )

    _add_tune_parser(sub)

    add_suite_arguments(
        sub.add_parser(
            "suite",
            help="the transfer suite: every workload x optimizer x seed, suite.md and a "
            "performance profile (docs/suite.md)",
        )
    )

    data = sub.add_parser("data", help="dataset helpers")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser(
        "fetch", help="download Fashion-MNIST from the official source, verifying MD5"
    )
    fetch.add_argument("dataset", choices=["fashion-mnist"])
    fetch.add_argument(
        "--dest", help="target directory (default: $ARTURO_DATA or ~/.cache/arturo-bench/...)"
    )
    info = data_sub.add_parser("info", help="show where a dataset is found, and its size")
    info.add_argument("dataset", choices=["fmnist", "cifar10", "cifar100"])
    info.add_argument("--data-dir", help="dataset directory")
    return parser


def _add_tune_parser(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser(
        "tune", help="search an optimizer's hyperparameters on workloads (Optuna; docs/tuning.md)"
    )
    tune.add_argument("workload", nargs="?", help="the workload to tune on")
    tune.add_argument(
        "--tune-across",
        nargs="+",
        metavar="WORKLOAD",
        help="instead of WORKLOAD: one configuration for all of these (mean normalised score)",
    )
    tune.add_argument(
        "--optimizer",
        required=True,
        help="arturo (published, absolute units), arturo-relative (unit-free mode), adam, "
        "adamw or sgd",
    )
    tune.add_argument(
        "--trials", type=int, default=20, help="finished trials to add to the study (default: 20)"
    )
    tune.add_argument(
        "--storage", required=True, help="Optuna storage, e.g. sqlite:///tune.db (resumable)"
    )
    tune.add_argument("--quick", action="store_true", help="the workloads' quick budgets")
    tune.add_argument("--seed", type=int, default=0, help="training seed and sampler seed")
    tune.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    tune.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; for more speed run one tune process per core)",
    )
    tune.add_argument("--data-dir", help="dataset directory (Fashion-MNIST workloads)")
    tune.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fix an unsearched config field, e.g. --set weight_decay=0 (repeatable)",
    )
    tune.add_argument(
        "--report",
        action="store_true",
        help="no training: print the best trials, write history and importance PNGs to --out",
    )
    tune.add_argument("--out", help="--report's directory (default: next to the SQLite file)")
    tune.add_argument("--steps", type=int, help=argparse.SUPPRESS)  # tests: a shorter budget
    tune.add_argument("--heartbeat", type=int, default=60, help=argparse.SUPPRESS)


def _resolve_experiment(args: argparse.Namespace, name: str) -> configs.ExperimentConfig:
    exp = get_experiment(name)
    if getattr(args, "quick", False):
        exp = scale_epochs(exp, QUICK["epochs"])
        exp = apply_overrides(
            exp,
            [
                f"train_subset={QUICK['train_subset']}",
                f"test_subset={QUICK['test_subset']}",
                "milestones=" + ",".join(map(str, QUICK["milestones"])),
            ],
        )
    if args.epochs is not None:
        exp = scale_epochs(exp, args.epochs)
    calibration = []
    if args.eval_samples is not None or args.val_split is not None:
        val_split = DEFAULT_VAL_SPLIT if args.val_split is None else args.val_split
        calibration = [f"eval_samples={args.eval_samples or 0}", f"val_split={val_split}"]
    return apply_overrides(exp, calibration + args.overrides)


def _cmd_list() -> int:
    print("experiments:")
    print(f"  {'name':<18} {'data':<9} {'model':<9} {'epochs':>6}  milestones  optimizers")
    for name, exp in configs.EXPERIMENTS.items():
        ms = ",".join(map(str, exp.milestones))
        print(
            f"  {name:<18} {exp.dataset:<9} {exp.model:<9} {exp.epochs:>6}  {ms:<10}  "
            f"{' '.join(exp.optimizers)}"
        )
    try:
        import ivon  # noqa: F401

        ivon_note = "installed"
    except ImportError:
        ivon_note = "not installed: pip install -e '.[ivon]'"
    print("\noptimizers: arturo, adam (weight_decay not applied, as published), adamw, sgd")
    print(
        "unpublished: arturo-relative (arTuRO's unit-free mode at the library's preset for it; "
        "`arturo` stays the published, absolute-units settings)"
    )
    print(f"optional peer: ivon (IVON, ivon-opt; {ivon_note})")
    print(
        f"\nquick mode (--quick): {QUICK['experiment']} on {QUICK['train_subset']} train / "
        f"{QUICK['test_subset']} test images, {QUICK['epochs']} epochs, "
        f"{' '.join(QUICK['optimizers'])}"
    )
    print("\n" + suite_listing())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    from .distributed import FollowerRunStore, init_from_env
    from .report import load_groups, markdown_table, summarize
    from .runs import RunStore
    from .train import NonFiniteLossError, resolve_device, train_run

    dist_env = init_from_env(args.device)  # torchrun: DDP over WORLD_SIZE ranks
    if not dist_env.is_main:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints for everyone

    if args.experiment is None and not args.quick:
        print(
            "arturo-bench run: give an EXPERIMENT (see `arturo-bench list`) or --quick",
            file=sys.stderr,
        )
        return 2
    name = args.experiment or QUICK["experiment"]
    exp = _resolve_experiment(args, name)
    optimizers = args.optimizers or (
        list(QUICK["optimizers"]) if args.quick else list(configs.DEFAULT_OPTIMIZERS)
    )
    device = dist_env.device(resolve_device(args.device))
    label = exp.name + ("-quick" if args.quick else "")

    data = load_dataset(exp.dataset, args.data_dir)
    print(
        f"data: {data.name} from {data.source}: {len(data.train_y)} train, {len(data.test_y)} test"
    )
    # The validation split comes off the full training set first: a subset never draws from it.
    data = data.hold_out(exp.val_split).subset(exp.train_subset, exp.test_subset).to(device)
    if exp.val_split:
        print(f"      holding out the last {exp.val_split} training images for calibration")
    if exp.train_subset or exp.test_subset or exp.val_split:
        print(f"      training on {len(data.train_y)}, testing on {len(data.test_y)}")
    print(
        f"device: {device} ({torch.get_num_threads()} threads); epochs {exp.epochs}, "
        f"milestones {list(exp.milestones)}; optimizers {' '.join(optimizers)}; "
        f"seeds {' '.join(map(str, args.seeds))}"
        + (f"; DDP on {dist_env.world_size} ranks" if dist_env.enabled else "")
    )

    progress = not args.no_progress and sys.stderr.isatty() and dist_env.is_main
    dirs, diverged = [], []
    for seed in args.seeds:
        for opt in optimizers:
            path = run_dir(args.out, label, opt, seed)
            dirs.append(path)
            store = RunStore(path) if dist_env.is_main else FollowerRunStore(path)
            try:
                train_run(
                    exp,
                    opt,
                    seed,
                    data,
                    store,
                    quick=args.quick,
                    progress=progress,
                    dist_env=dist_env,
                    restart=args.restart,
                    allow_nonfinite=args.allow_nonfinite,
                )
            except NonFiniteLossError as exc:  # one diverged run need not stop the others
                print(f"arturo-bench: error: {exc}", file=sys.stderr)
                diverged.append(f"{opt} seed{seed}")
    if not dist_env.is_main:
        return 3 if diverged else 0

    print(f"\nruns in {Path(args.out) / label}\n")
    groups = load_groups([d for d in dirs if d.exists()])
    if groups:
        print(markdown_table(summarize(groups, exp.target_acc), exp.target_acc))
    print(f"plots: arturo-bench report {Path(args.out) / label} --out report/")
    if diverged:
        print(
            f"arturo-bench: error: stopped on a non-finite training loss: {', '.join(diverged)} "
            "(see above)",
            file=sys.stderr,
        )
        return 3
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    table, pngs = write_report(
        args.run_dirs, args.out, args.target, args.at_epochs, paired_with=args.paired
    )
    print(table)
    print(f"wrote {Path(args.out) / 'report.md'} and {len(pngs)} plots:")
    for p in pngs:
        print(f"  {p}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "fetch":
        path = fetch_fashion_mnist(args.dest)
        print(f"Fashion-MNIST is in {path}")
        return 0
    data = load_dataset(args.dataset, args.data_dir)
    print(
        f"{data.name}: {data.source}\n  train {tuple(data.train_x.shape)}, "
        f"test {tuple(data.test_x.shape)}, {data.num_classes} classes"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            return _cmd_list()
        if args.command == "show":
            exp = _resolve_experiment(args, args.experiment)
            print(json.dumps(configs.to_dict(exp), indent=2))
            return 0
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "suite":
            return run_suite_command(args)
        if args.command == "tune":
            from .tune import run_command  # Optuna is imported only when tuning

            return run_command(args)
        return _cmd_data(args)
    except (DataNotFoundError, OptionalDependencyError, RunDirError, ValueError) as exc:
        print(f"arturo-bench: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an output directory that cannot be created or written
        where = f": {exc.filename}" if exc.filename else ""
        print(f"arturo-bench: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished epochs are saved; re-run the same command to resume.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
