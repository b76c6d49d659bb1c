"""One run in its own process group: the entry point that torchrun (or SLURM) starts.

    torchrun --standalone --nproc-per-node 4 -m ltbench.train method.name=ce seed=1
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 -m ltbench.train \\
        --config run.yaml
    ltbench train recipe.epochs=10                      # one process: a world of one

Every process of the group runs the same command; rank 0 alone tracks the run. The config is
the usual layering: defaults, the data set's recipe, ``--config FILE`` (a run config such as a
run's saved ``config.yaml``), then ``key=value`` overrides. A run interrupted by SIGTERM saves
a checkpoint and exits with status 75; the same command resumes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from ltbench.config import Layer, parse_overrides, resolve_run
from ltbench.errors import ConfigError, LtbenchError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="run config, e.g. recipe.epochs=5"
    )
    parser.add_argument("--config", type=Path, help="a run config YAML file, under the overrides")
    parser.add_argument(
        "--result", type=Path, help="write the run's outcome (or its error) here as JSON"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltbench.train", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    from ltbench.cli import configure

    configure(verbosity=2)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run one config under the current process group; 0, 2 (an error) or 75 (interrupted)."""
    from ltbench.checkpoint import INTERRUPTED_EXIT, Interrupted
    from ltbench.distributed import teardown
    from ltbench.runner import execute

    if int(os.environ.get("RANK", 0)) > 0:
        logging.getLogger("ltbench").setLevel(logging.WARNING)  # rank 0 talks
    try:
        config = resolve_run(config_layers(args.config, args.overrides))
        outcome = execute(config)
    except Interrupted as stop:
        log.warning("%s; run the same command again to resume", stop)
        _write_result(args.result, {"interrupted": str(stop)})
        return INTERRUPTED_EXIT
    except LtbenchError as error:
        sys.stderr.write(f"ltbench: error: {error}\n")
        _write_result(args.result, {"error": str(error)})
        return 2
    finally:
        teardown()
    _write_result(
        args.result,
        {
            "run_id": outcome.run_id,
            "fingerprint": outcome.fingerprint,
            "metrics": outcome.metrics,
            "skipped": outcome.skipped,
            "seconds": outcome.seconds,
        },
    )
    return 0


def config_layers(config_file: Path | None, overrides: list[str]) -> list[Layer]:
    layers: list[Layer] = []
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"run config file {str(config_file)!r} does not exist")
        try:
            content = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"run config file {config_file} is not valid YAML: {error}") from None
        layers.append((f"run config file {config_file}", content))
    layers.append(("the command line", parse_overrides(list(overrides))))
    return layers


def _write_result(path: Path | None, result: dict) -> None:
    from ltbench.checkpoint import atomic_write_text

    if path is not None and int(os.environ.get("RANK", 0)) == 0:
        atomic_write_text(json.dumps(result, indent=1), path)


if __name__ == "__main__":
    sys.exit(main())
