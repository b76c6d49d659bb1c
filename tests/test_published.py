"""Published numbers beside ours: results/published.csv, matching, differences, formats."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from ltbench import leaderboard
from ltbench.cli import main
from ltbench.errors import ConfigError
from ltbench.runner import execute

from .conftest import run_config


def fake_runs(rows: list[dict]) -> pd.DataFrame:
    """Finished runs as Tracker.runs gives them, two seeds per row."""
    records = []
    for number, row in enumerate(rows):
        for seed, shift in ((0, -0.5), (1, 0.5)):
            record = {
                "tags.dataset": row["dataset"],
                "tags.method": row["method"],
                "tags.backbone": row["backbone"],
                "tags.fingerprint": f"{number:016d}",
                "tags.seed": str(seed),
                "params.recipe.epochs": str(row.get("epochs", 200)),
                "metrics.test_acc": row["all"] + shift,
                "end_time": seed,
            }
            if "ratio" in row:
                record["params.dataset.options.imbalance_ratio"] = str(row["ratio"])
            for group in ("many", "medium", "few"):
                if group in row:
                    record[f"metrics.test_acc_{group}"] = row[group] + shift
            records.append(record)
    return pd.DataFrame(records)


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_the_published_table_holds_design_numbers_with_sources():
    published = leaderboard.load_published()
    assert published["source"].notna().all()
    cifar = published.set_index(["dataset", "imbalance_ratio", "method"])
    assert cifar.loc[("cifar10_lt", 100.0, "ldam_drw"), "all"] == 77.03
    assert cifar.loc[("cifar100_lt", 50.0, "ce"), "all"] == 43.85
    assert (
        published.loc[published["dataset"].str.startswith("cifar"), "backbone"] == "resnet32"
    ).all()
    imagenet = published[published["dataset"] == "imagenet_lt"].set_index("method")
    assert imagenet.loc["tau_norm", ["many", "medium", "few", "all"]].tolist() == [
        59.1,
        46.9,
        30.7,
        49.4,
    ]
    assert set(imagenet["backbone"]) == {"timm/resnext50_32x4d"}


def test_matching_on_data_set_ratio_backbone_and_method():
    cifar = {"dataset": "cifar10_lt", "backbone": "resnet32"}
    runs = fake_runs(
        [
            # components in another order still match ldam_drw
            cifar | {"ratio": 100, "method": "drw+ldam", "all": 76.0},
            # ratio 50 has no published LDAM-DRW: no match
            cifar | {"ratio": 50, "method": "ldam_drw", "all": 70.0},
            # another backbone: no match
            cifar | {"ratio": 100, "method": "ce", "all": 60.0, "backbone": "resnet20"},
            # ImageNet-LT has no ratio param; ce+crt counts as crt; a shorter schedule
            {
                "dataset": "imagenet_lt",
                "backbone": "timm/resnext50_32x4d",
                "method": "ce+crt",
                "epochs": 10,
                "all": 40.0,
                "many": 50.0,
                "medium": 35.0,
                "few": 20.0,
            },
        ]
    )
    board = leaderboard.build(runs, published=leaderboard.load_published())
    rows = board.rows.set_index("fingerprint")
    first = rows.loc[f"{0:016d}"]
    assert first["published_all"] == 77.03 and first["delta_all"] == pytest.approx(76.0 - 77.03)
    assert pd.isna(rows.loc[f"{1:016d}", "published_all"])
    assert pd.isna(rows.loc[f"{2:016d}", "published_all"])
    crt = rows.loc[f"{3:016d}"]
    assert crt[["published_many", "published_medium", "published_few"]].tolist() == [
        61.8,
        46.2,
        27.4,
    ]
    assert crt["delta_few"] == pytest.approx(20.0 - 27.4)

    markdown = leaderboard.render(board, "markdown")
    header, _, *lines = [cells(line) for line in markdown.split("\n\n")[0].splitlines()]
    assert header[-2:] == ["published", "Δ"]
    ldam = next(line for line in lines if line[1] == "drw+ldam")
    assert ldam[-2:] == ["77.03 [1]", "-1.03"]  # 200 epochs, as published: no mark
    crt = next(line for line in lines if line[1] == "ce+crt")
    assert crt[-2:] == ["49.60 (61.80 / 46.20 / 27.40) [2]*", "-9.60 (-11.80 / -11.20 / -7.40)"]
    assert next(line for line in lines if line[2] == "resnet20")[-2:] == ["", ""]
    assert "[1] Cao et al., NeurIPS 2019" in markdown and "[2] Kang et al., ICLR 2020" in markdown
    assert "* published with a different number of epochs" in markdown
    assert r"$\Delta$" in leaderboard.render(board, "latex")
    parsed = pd.read_csv(io.StringIO(leaderboard.render(board, "csv")))
    assert parsed["published_source"].notna().sum() == 2
    records = json.loads(leaderboard.render(board, "json"))["rows"]
    assert sum(r["published_all"] is not None for r in records) == 2


def test_without_a_match_the_leaderboard_is_unchanged():
    runs = fake_runs(
        [{"dataset": "digits_lt", "ratio": 50, "backbone": "resnet8", "method": "ce", "all": 70.0}]
    )
    plain = leaderboard.build(runs)
    with_published = leaderboard.build(runs, published=leaderboard.load_published())
    for fmt in leaderboard.FORMATS:
        assert leaderboard.render(plain, fmt) == leaderboard.render(with_published, fmt)


def test_leaderboard_command_matches_real_runs_through_their_params(store, tmp_path, capsys):
    outcomes = [
        execute(run_config(f"seed={seed}", "dataset.options.imbalance_ratio=20")) for seed in (0, 1)
    ]
    mean = sum(o.metrics["test_acc"] for o in outcomes) / 2
    table = tmp_path / "ours.csv"
    table.write_text(
        "dataset,imbalance_ratio,backbone,method,epochs,all,many,medium,few,source\n"
        "digits_lt,20,resnet8,ce,3,50.0,,,,a test's own number\n"
        "digits_lt,50,resnet8,ce,3,99.0,,,,another ratio\n"
    )
    assert main(["leaderboard", "--published", str(table)]) == 0
    out = capsys.readouterr().out
    row = cells(out.splitlines()[2])
    assert row[-2:] == ["50.00 [1]", f"{mean - 50:+.2f}"] and "another ratio" not in out
    assert "different number of epochs" not in out  # 3 epochs, as the table says
    assert main(["leaderboard", "--published", str(table), "--no-published"]) == 0
    assert "published" not in capsys.readouterr().out
    assert main(["leaderboard", "--published", str(tmp_path / "missing.csv")]) == 2
    with pytest.raises(ConfigError, match="lacks the column"):
        table.write_text("dataset,all\nx,1\n")
        leaderboard.load_published(table)
