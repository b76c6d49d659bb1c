"""The command line, end to end, and its answers to bad input."""

from __future__ import annotations

import pytest

from ltbench.cli import main
from ltbench.leaderboard import collect

FAST = ["recipe.epochs=2", "recipe.warmup_epochs=1", "seeds=[0,1]", "methods=[ce]"]


def test_run_prints_the_leaderboard_and_skips_finished_runs(store, capsys, caplog):
    caplog.set_level("INFO", logger="ltbench")
    assert main(["run", "default", *FAST]) == 0
    out = capsys.readouterr().out
    assert "| digits_lt" in out and "| ce " in out and "| 2 " in out
    assert "[2/2] digits_lt ce resnet8 seed 1: acc" in caplog.text
    assert "skipped" not in caplog.text
    runs, _ = collect(store, ["default"])
    assert len(runs) == 2

    caplog.clear()
    assert main(["run", "default", *FAST]) == 0
    assert caplog.text.count("skipped, already finished") == 2
    assert len(collect(store, ["default"])[0]) == 2


def test_leaderboard_command_writes_each_format(store, tmp_path, capsys):
    assert main(["run", *FAST]) == 0
    capsys.readouterr()
    for fmt in ("markdown", "csv", "latex", "html", "json"):
        out = tmp_path / f"board.{fmt}"
        assert (
            main(["leaderboard", "--experiment", "default", "--format", fmt, "--out", str(out)])
            == 0
        )
        assert "digits" in out.read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "default", "methods=[lmad]"], "unknown method 'lmad'"),
        (["run", "default", "datasets=[cifar]"], "unknown data set 'cifar'"),
        (["run", "default", "recipe.epoch=2"], "unknown config key 'recipe.epoch'"),
        (["run", "default", "recipe.epochs=two"], "bad value for config key 'recipe.epochs'"),
        (["run", "missing.yaml"], "suite file 'missing.yaml' does not exist"),
        (["leaderboard", "--experiment", "nope"], "no experiment 'nope'"),
    ],
)
def test_bad_input_fails_clearly_and_leaves_finished_runs(store, capsys, args, message):
    assert main(["run", *FAST]) == 0
    before = collect(store)[0][["run_id", "status", "metrics.test_acc"]]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ltbench: error: ") and message in err
    after = collect(store)[0][["run_id", "status", "metrics.test_acc"]]
    assert before.equals(after)
