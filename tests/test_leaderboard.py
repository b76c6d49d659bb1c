"""The leaderboard: numbers recomputed from the runs' own metrics, grouping, formats."""

from __future__ import annotations

import json
import statistics

import pandas as pd
import pytest

from ltbench import leaderboard
from ltbench.runner import execute

from .conftest import run_config


@pytest.fixture
def board_runs(store):
    """Two seeds of one config, one seed of another, and a failed run."""
    outcomes = [execute(run_config(f"seed={seed}")) for seed in (0, 1)]
    outcomes.append(execute(run_config("recipe.epochs=2")))
    with pytest.raises(Exception, match="NaN"):
        execute(run_config("recipe.lr=1e30"))
    return store, outcomes


def test_mean_and_std_recomputed_from_each_runs_metrics(board_runs):
    store, outcomes = board_runs
    runs, excluded = leaderboard.collect(store)
    board = leaderboard.build(runs, excluded)
    assert excluded == {"FAILED": 1}
    assert len(board.rows) == 2  # different fingerprints are never averaged

    row = board.rows.set_index("fingerprint").loc[outcomes[0].fingerprint]
    assert row["seeds"] == 2
    for name, metric in leaderboard.METRICS.items():
        values = [store.client.get_run(o.run_id).data.metrics[metric] for o in outcomes[:2]]
        assert row[f"{name}_mean"] == pytest.approx(statistics.mean(values))
        assert row[f"{name}_std"] == pytest.approx(statistics.stdev(values))
    single = board.rows.set_index("fingerprint").loc[outcomes[2].fingerprint]
    assert single["seeds"] == 1 and pd.isna(single["all_std"])


def test_formats_carry_the_same_numbers(board_runs):
    store, outcomes = board_runs
    board = leaderboard.build(*leaderboard.collect(store))
    row = board.rows.set_index("fingerprint").loc[outcomes[0].fingerprint]
    cell = f"{row['all_mean']:.2f} ± {row['all_std']:.2f}"
    markdown = leaderboard.render(board, "markdown")
    assert cell in markdown and "1 unfinished or failed run(s) left out (1 failed)" in markdown
    assert cell.replace("±", r"$\pm$") in leaderboard.render(board, "latex")
    assert cell in leaderboard.render(board, "html")
    records = json.loads(leaderboard.render(board, "json"))
    assert records["excluded"] == {"FAILED": 1}
    match = [r for r in records["rows"] if r["fingerprint"] == outcomes[0].fingerprint][0]
    assert match["all_mean"] == pytest.approx(row["all_mean"], abs=1e-4)
    parsed = pd.read_csv(__import__("io").StringIO(leaderboard.render(board, "csv")))
    assert parsed["seeds"].tolist() == board.rows["seeds"].tolist()


def test_empty_group_stays_empty():
    runs = pd.DataFrame(
        {
            "tags.dataset": ["d"] * 2,
            "tags.method": ["ce"] * 2,
            "tags.backbone": ["r"] * 2,
            "tags.fingerprint": ["f" * 16] * 2,
            "tags.seed": ["0", "1"],
            "metrics.test_acc": [70.0, 72.0],
            "metrics.test_acc_many": [80.0, 82.0],
            "metrics.test_acc_medium": [50.0, 54.0],
            "end_time": [1, 2],
        }
    )
    board = leaderboard.build(runs)
    assert pd.isna(board.rows.loc[0, "few_mean"])
    line = leaderboard.render(board, "markdown").splitlines()[2]
    assert line.rstrip().endswith("|") and "52.00 ± 2.83 |" in line
    assert "0.00" not in line


def test_duplicate_seed_counts_once():
    runs = pd.DataFrame(
        {
            "tags.dataset": ["d"] * 3,
            "tags.method": ["ce"] * 3,
            "tags.backbone": ["r"] * 3,
            "tags.fingerprint": ["f" * 16] * 3,
            "tags.seed": ["0", "0", "1"],
            "metrics.test_acc": [10.0, 70.0, 72.0],
            "end_time": [1, 2, 3],
            "status": ["FINISHED"] * 3,
        }
    )
    deduplicated = runs.sort_values("end_time").drop_duplicates(
        ["tags.fingerprint", "tags.seed"], keep="last"
    )
    board = leaderboard.build(deduplicated)
    assert board.rows.loc[0, "seeds"] == 2 and board.rows.loc[0, "all_mean"] == 71.0


def test_noncanonical_runs_are_marked():
    runs = pd.DataFrame(
        {
            "tags.dataset": ["d", "d"],
            "tags.method": ["ce", "ce"],
            "tags.backbone": ["r", "r"],
            "tags.fingerprint": ["a" * 16, "b" * 16],
            "tags.seed": ["0", "0"],
            "tags.data_canonical": ["true", "false"],
            "metrics.test_acc": [70.0, 71.0],
            "end_time": [1, 2],
        }
    )
    text = leaderboard.render(leaderboard.build(runs), "markdown")
    assert text.count(leaderboard.NONCANONICAL_MARK) == 2  # one row and the footnote
    assert "non-canonical data" in text
