"""DDP: a run started by torchrun over 2 CPU processes (gloo), against the same run in 1."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from ltbench.data import epoch_indices
from ltbench.distributed import Dist
from ltbench.engine import sync_batch_norm
from ltbench.errors import ConfigError
from ltbench.runner import execute

from .conftest import FAST, run_config


def test_two_process_run_logs_one_run_counting_every_test_image(store, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "ltbench.train",
        *FAST,
        "tracking.experiment=ddp",
        "--result",
        str(tmp_path / "result.json"),
    ]
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]

    (run,) = store.client.search_runs(store.experiment_ids(["ddp"]))  # rank 0 alone tracked
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.metrics["test_count"] == 400  # the whole test set, each image once
    two = [
        m.value
        for m in sorted(
            store.client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step
        )
    ]
    assert len(two) == 3

    single = execute(run_config("tracking.experiment=single"))
    assert single.fingerprint == run.data.tags["fingerprint"]
    one = [
        m.value
        for m in sorted(
            store.client.get_metric_history(single.run_id, "train_loss"), key=lambda m: m.step
        )
    ]
    # Same initial weights, same images in every step (the global batch is split over the
    # ranks): the first epoch's loss nearly matches. The runs still differ: each rank draws
    # its own crops and flips, normalises with the statistics of its half batch, and the
    # even shards drop the odd last image of each epoch.
    assert one[0] == pytest.approx(two[0], rel=0.03)
    assert run.data.metrics["test_acc"] == pytest.approx(single.metrics["test_acc"], abs=12)
    assert min(run.data.metrics["test_acc"], single.metrics["test_acc"]) > 20  # chance: 10


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_every_index_once(world_size):
    labels = torch.tensor([0] * 7 + [1] * 2 + [2])
    balanced = lambda epoch: torch.ones(3) / 3  # noqa: E731 - a class-balanced sampler
    # every rank draws the same epoch order (then takes its shard), whatever the sampler
    assert torch.equal(
        epoch_indices(labels, 3, balanced, 4, 1), epoch_indices(labels, 3, balanced, 4, 1)
    )
    indices = epoch_indices(labels, 3, None, 4, 1)
    ranks = [Dist(rank, world_size, torch.device("cpu")) for rank in range(world_size)]
    uneven = torch.cat([dist.shard(indices, even=False) for dist in ranks])
    assert sorted(uneven.tolist()) == list(range(10))  # evaluation: every image exactly once
    even = [dist.shard(indices, even=True) for dist in ranks]
    assert len({len(shard) for shard in even}) == 1  # training: the same steps on every rank
    assert len(torch.cat(even)) == 10 - 10 % world_size


class OwnNorm(nn.BatchNorm2d):
    """A method's own BN layer, which SyncBN must leave alone."""


def test_sync_bn_converts_plain_batch_norm_only(store):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(OwnNorm(4)))
    weight = model[1].weight
    converted = sync_batch_norm(model, Dist(0, 2, torch.device("cuda", 0)))
    assert type(converted[1]) is nn.SyncBatchNorm and converted[1].weight is weight
    assert type(converted[2][0]) is OwnNorm
    with pytest.raises(ConfigError, match="needs CUDA"):
        sync_batch_norm(model, Dist(0, 1, torch.device("cpu")))
    with pytest.raises(ConfigError, match="needs CUDA"):
        execute(run_config("train.sync_bn=true"))


def test_train_command_refuses_a_missing_config_file(store, capsys):
    from ltbench.cli import main

    assert main(["train", "--config", "missing.yaml", "seed=1"]) == 2
    assert "run config file 'missing.yaml' does not exist" in capsys.readouterr().err
    assert main(["train", "recipe.epoch=2"]) == 2
    assert "unknown config key 'recipe.epoch'" in capsys.readouterr().err
