"""The ``ltbench`` command: run suites, print the leaderboard, list what is registered."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import ltbench
from ltbench.errors import LtbenchError

log = logging.getLogger("ltbench")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value pairs after an option land here; a command opts in to take them
        if not (getattr(args, "extra_into", None) and all("=" in e for e in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, args.extra_into).extend(extra)
    configure(args.verbose)
    try:
        return args.handler(args)
    except LtbenchError as error:
        sys.stderr.write(f"ltbench: error: {error}\n")
        return 2


def configure(verbosity: int) -> None:
    """Logging and library defaults, set once by a command-line entry point.

    ltbench's own loggers talk at INFO (1: suite progress; 2, ``-v``: also a line per epoch
    and each run's test metrics, and what a method did to the model; 3, ``-vv``: debug); other
    libraries only warn. MLflow's usage telemetry (a network call) and its download progress
    bars are off unless the environment turns them on.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("ltbench").setLevel(logging.DEBUG if verbosity >= 3 else logging.INFO)
    detail = logging.NOTSET if verbosity >= 2 else logging.WARNING
    for name in ("ltbench.engine", "ltbench.runner", "ltbench.methods"):
        logging.getLogger(name).setLevel(detail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltbench", description="Benchmark harness for long-tailed image recognition."
    )
    parser.add_argument("--version", action="version", version=f"ltbench {ltbench.__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=1,
        help="-v: a line per epoch and the test metrics of each run; -vv: debug",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a suite and print its leaderboard")
    run.add_argument(
        "suite",
        nargs="?",
        default="default",
        help="a packaged suite name or a suite YAML file (default: default)",
    )
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="suite fields (seeds=[0], methods=[ce]) or run config "
        "(recipe.epochs=5, tracking.uri=...)",
    )
    run.add_argument("--format", choices=FORMATS, default="markdown")
    add_launch_arguments(run)
    run.set_defaults(handler=cmd_run)

    train = commands.add_parser(
        "train", help="one run in this process group (what torchrun starts: -m ltbench.train)"
    )
    from ltbench.train import add_arguments

    add_arguments(train)
    train.set_defaults(handler=cmd_train)

    board = commands.add_parser("leaderboard", help="print the leaderboard of tracked runs")
    board.add_argument(
        "--experiment",
        action="append",
        help="experiment name (repeatable; default: every experiment)",
    )
    board.add_argument("--format", choices=FORMATS, default="markdown")
    board.add_argument("--out", type=Path, help="write to this file instead of stdout")
    board.add_argument(
        "--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    board.add_argument(
        "--published",
        type=Path,
        help="published numbers to show beside matching rows (default: results/published.csv)",
    )
    board.add_argument(
        "--no-published", action="store_true", help="leave the published numbers out"
    )
    board.add_argument(
        "--compare",
        metavar="COMPONENT",
        help="show each method without and with COMPONENT side by side, with the difference "
        "(e.g. --compare nbn pairs X with X+nbn on the same data set, backbone and recipe)",
    )
    board.set_defaults(handler=cmd_leaderboard)

    diagnostics = commands.add_parser(
        "diagnostics",
        help="overlay the feature-strength and BN-weight diagnostics of tracked runs",
    )
    diagnostics.add_argument(
        "--experiment", action="append", help="experiment name (repeatable; default: every one)"
    )
    diagnostics.add_argument("--dataset", help="only runs on this data set")
    diagnostics.add_argument("--backbone", help="only runs with this backbone")
    diagnostics.add_argument(
        "--out", type=Path, required=True, help="folder for the comparison CSVs and plots"
    )
    diagnostics.add_argument(
        "--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    diagnostics.set_defaults(handler=cmd_diagnostics)

    listing = commands.add_parser("list", help="list registered methods, data sets, models")
    listing.add_argument("kind", nargs="?", choices=["methods", "datasets", "models", "suites"])
    listing.set_defaults(handler=cmd_list)

    data = commands.add_parser("data", help="inspect a data set's files")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_check = data_commands.add_parser(
        "check",
        help="what is under ROOT: files, checksums, split sizes, classes, shot groups",
    )
    data_check.add_argument("name", help="a data set (ltbench list datasets)")
    data_check.add_argument("--root", help="the data set's root folder (data.root of a run)")
    data_check.add_argument(
        "settings",
        nargs="*",
        metavar="key=value",
        help="data set options (imbalance_ratio=50), data.allow_noncanonical=true, "
        "data.download=true",
    )
    data_check.set_defaults(handler=cmd_data_check, extra_into="settings")
    return parser


FORMATS = ("markdown", "csv", "latex", "html", "json")


def add_launch_arguments(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("launching (see README, Scaling out)")
    group.add_argument(
        "--launcher",
        choices=["inline", "local", "slurm"],
        default="inline",
        help="inline: in this process, one run after another (default); local: a queue of "
        "torchrun jobs over this machine's GPUs (a process pool on the CPU); slurm: one "
        "submitit job per run",
    )
    group.add_argument(
        "--jobs", type=int, help="runs at once (local default: one per GPU group, 1 on a CPU)"
    )
    group.add_argument(
        "--gpus-per-job",
        type=int,
        default=1,
        help="GPUs per run (per node with slurm; CPU processes on a machine without GPUs)",
    )
    group.add_argument("--nodes", type=int, default=1, help="slurm: nodes per run")
    group.add_argument(
        "--workdir",
        default="ltbench-jobs",
        help="job configs, logs and results (default: ./ltbench-jobs)",
    )
    group.add_argument("--partition", help="slurm partition")
    group.add_argument(
        "--time", type=int, default=24 * 60, dest="time_min", help="slurm time limit, minutes"
    )
    group.add_argument("--cpus-per-task", type=int, help="slurm CPUs per task")
    group.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another sbatch option, e.g. --slurm account=abc --slurm qos=high (repeatable)",
    )
    group.add_argument(
        "--cluster",
        help="submitit's cluster for --launcher slurm: slurm (default) or local (runs the "
        "same jobs on this machine, to try a setup)",
    )
    group.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="slurm: submit the jobs and return; `ltbench leaderboard` shows them later",
    )


def launch_options(args: argparse.Namespace) -> Any:
    from ltbench.launch import LaunchOptions

    extra = {}
    for pair in args.slurm:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise LtbenchError(f"--slurm {pair!r} must look like KEY=VALUE, e.g. account=abc")
        extra[key] = value
    return LaunchOptions(
        launcher=args.launcher,
        jobs=args.jobs,
        gpus_per_job=args.gpus_per_job,
        nodes=args.nodes,
        workdir=args.workdir,
        cluster=args.cluster,
        partition=args.partition,
        time_min=args.time_min,
        cpus_per_task=args.cpus_per_task,
        slurm=extra,
        wait=args.wait,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from ltbench import leaderboard
    from ltbench.suite import load_suite, run_suite
    from ltbench.tracking import Tracker

    if "=" in args.suite:  # `ltbench run key=value ...` runs the default suite
        args.overrides.insert(0, args.suite)
        args.suite = "default"
    suite, run_layer = load_suite(args.suite, args.overrides)
    result = run_suite(suite, run_layer, launch_options(args))
    tracker = Tracker(run_layer.get("tracking", {}).get("uri"))
    runs, excluded = leaderboard.collect(tracker, [result.experiment])
    board = leaderboard.build(runs, excluded, result.fingerprints, leaderboard.load_published())
    sys.stdout.write(leaderboard.render(board, args.format))
    for config, message in result.failures:
        sys.stderr.write(
            f"failed: {config.dataset.name} {config.method.name} seed {config.seed}: {message}\n"
        )
    return 1 if result.failures else 0


def cmd_train(args: argparse.Namespace) -> int:
    from ltbench.train import run

    return run(args)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from ltbench import leaderboard
    from ltbench.tracking import Tracker

    tracker = Tracker(args.tracking_uri)
    if args.experiment:
        missing = [e for e in args.experiment if not tracker.experiment_ids([e])]
        if missing:
            known = [e.name for e in tracker.client.search_experiments()]
            raise LtbenchError(
                f"no experiment {missing[0]!r} in {tracker.uri}; experiments there: "
                f"{', '.join(known) or 'none'}"
            )
    runs, excluded = leaderboard.collect(tracker, args.experiment)
    if args.compare:
        comparison = leaderboard.compare(runs, args.compare, excluded)
        text = leaderboard.render_comparison(comparison, args.format)
    else:
        published = None if args.no_published else leaderboard.load_published(args.published)
        text = leaderboard.render(leaderboard.build(runs, excluded, None, published), args.format)
    if args.out:
        args.out.write_text(text)
        log.info("wrote %s", args.out)
    else:
        sys.stdout.write(text)
    return 0


def cmd_diagnostics(args: argparse.Namespace) -> int:
    from ltbench import diagnostics
    from ltbench.tracking import Tracker

    tracker = Tracker(args.tracking_uri)
    summaries = diagnostics.write_comparison(
        tracker, args.experiment, args.out, dataset=args.dataset, backbone=args.backbone
    )
    sys.stdout.write(summaries.to_markdown(index=False, floatfmt=".3f") + "\n")
    log.info("wrote the comparison to %s", args.out)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ltbench.data import DATASETS
    from ltbench.method import METHODS
    from ltbench.models import MODELS

    registries = {"methods": METHODS, "datasets": DATASETS, "models": MODELS}
    kinds = [args.kind] if args.kind else [*registries, "suites"]
    for kind in kinds:
        sys.stdout.write(f"{kind}:\n")
        rows = _suite_rows() if kind == "suites" else _registry_rows(registries[kind])
        if kind == "models":
            rows.append(("timm/<name>", "any timm model, untrained, as the backbone"))
        width = max(len(name) for name, _ in rows)
        for name, description in rows:
            sys.stdout.write(f"  {name:<{width}}  {description}\n")
    return 0


def _registry_rows(registry: Any) -> list[tuple[str, str]]:
    return [(name, registry.describe(name)) for name in registry.names()]


def _suite_rows() -> list[tuple[str, str]]:
    import yaml

    from ltbench.suite import packaged_suites, suite_text

    return [
        (name, yaml.safe_load(suite_text(name)[0]).get("description", ""))
        for name in packaged_suites()
    ]


def cmd_data_check(args: argparse.Namespace) -> int:
    from ltbench.datacheck import check

    report = check(args.name, args.root, args.settings)
    sys.stdout.write(report.text)
    return 0 if report.usable else 1


if __name__ == "__main__":
    sys.exit(main())
