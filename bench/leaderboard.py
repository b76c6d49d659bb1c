"""The leaderboard: finished MLflow runs -> mean +- std over seeds -> a table in many formats.

Runs are grouped by data set, method and fingerprint: runs with different fingerprints are
never averaged together. When the same (fingerprint, seed) was run more than once, the newest
finished run counts. Unfinished and failed runs are left out and counted in a footnote; a
shot group with no classes stays empty, never 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tabulate import tabulate

from ltbench.tracking import FINISHED, Tracker

METRICS = {
    "all": "test_acc",
    "many": "test_acc_many",
    "medium": "test_acc_medium",
    "few": "test_acc_few",
}
GROUP_KEYS = ["dataset", "method", "backbone", "fingerprint"]
FORMATS = ("markdown", "csv", "latex", "html", "json")
NONCANONICAL_MARK = "†"


@dataclass
class Leaderboard:
    """One row per (data set, method, backbone, fingerprint), numbers in percent."""

    rows: pd.DataFrame
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def footnotes(self) -> list[str]:
        notes = []
        if self.excluded:
            parts = ", ".join(
                f"{n} {status.lower()}" for status, n in sorted(self.excluded.items())
            )
            total = sum(self.excluded.values())
            notes.append(f"{total} unfinished or failed run(s) left out ({parts}).")
        if len(self.rows) and not self.rows["canonical"].astype(bool).all():
            notes.append(
                f"{NONCANONICAL_MARK} non-canonical data: the files differ from the "
                "official release; not comparable with published numbers."
            )
        notes.append("Top-1 accuracy (%) on the test split, mean ± std over seeds, last epoch.")
        return notes


def collect(tracker: Tracker, experiments: list[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """Finished runs (deduplicated per fingerprint and seed) and counts of those left out."""
    ids = tracker.experiment_ids(experiments)
    runs = tracker.runs(ids)
    if runs.empty:
        return runs, {}
    finished = runs["status"] == FINISHED
    excluded = runs.loc[~finished, "status"].value_counts().to_dict()
    runs = runs[finished & runs["tags.fingerprint"].notna()]
    runs = runs.sort_values("end_time").drop_duplicates(
        ["tags.fingerprint", "tags.seed"], keep="last"
    )
    return runs, excluded


def build(
    runs: pd.DataFrame, excluded: dict[str, int] | None = None, fingerprints: set[str] | None = None
) -> Leaderboard:
    """Aggregate runs into the leaderboard, optionally only the given fingerprints."""
    columns = ["dataset", "method", "backbone", "fingerprint", "seeds", "canonical"]
    columns += [f"{name}_{stat}" for name in METRICS for stat in ("mean", "std")]
    if runs.empty:
        return Leaderboard(pd.DataFrame(columns=columns), excluded or {})
    if fingerprints is not None:
        runs = runs[runs["tags.fingerprint"].isin(fingerprints)]
    frame = pd.DataFrame(
        {
            "dataset": runs.get("tags.dataset_label", runs["tags.dataset"]).fillna(
                runs["tags.dataset"]
            ),
            "method": runs["tags.method"],
            "backbone": runs["tags.backbone"],
            "fingerprint": runs["tags.fingerprint"],
            "canonical": runs.get("tags.data_canonical", "true") != "false",
        }
    )
    for name, metric in METRICS.items():
        frame[name] = runs.get(f"metrics.{metric}", pd.Series(np.nan, index=runs.index))
    rows = []
    for key, group in frame.groupby(GROUP_KEYS, sort=False):
        row = dict(zip(GROUP_KEYS, key, strict=True))
        row["seeds"] = len(group)
        row["canonical"] = bool(group["canonical"].all())
        for name in METRICS:
            values = group[name].dropna()
            row[f"{name}_mean"] = values.mean() if len(values) else np.nan
            row[f"{name}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
        rows.append(row)
    table = pd.DataFrame(rows, columns=columns)
    table = table.sort_values(["dataset", "backbone", "all_mean"], ascending=[True, True, False])
    return Leaderboard(table.reset_index(drop=True), excluded or {})


def _cell(mean: float, std: float, plus_minus: str) -> str:
    if np.isnan(mean):
        return ""
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} {plus_minus} {std:.2f}"


def display_rows(board: Leaderboard, plus_minus: str = "±") -> list[list[str]]:
    rows = []
    for _, row in board.rows.iterrows():
        mark = "" if row["canonical"] else f" {NONCANONICAL_MARK}"
        rows.append(
            [
                f"{row['dataset']}{mark}",
                row["method"],
                row["backbone"],
                row["fingerprint"][:8],
                str(row["seeds"]),
                *(_cell(row[f"{name}_mean"], row[f"{name}_std"], plus_minus) for name in METRICS),
            ]
        )
    return rows


HEADERS = ["data set", "method", "backbone", "fingerprint", "seeds", "all", "many", "medium", "few"]


def render(board: Leaderboard, fmt: str = "markdown") -> str:
    """The leaderboard as Markdown, CSV, LaTeX, HTML or JSON."""
    if fmt == "csv":
        return board.rows.to_csv(index=False, float_format="%.4f")
    if fmt == "json":
        records = json.loads(board.rows.to_json(orient="records", double_precision=4))
        return (
            json.dumps(
                {"rows": records, "excluded": board.excluded, "notes": board.footnotes}, indent=2
            )
            + "\n"
        )
    if fmt == "markdown":
        table = tabulate(display_rows(board), HEADERS, tablefmt="github", disable_numparse=True)
        return table + "\n\n" + "\n".join(board.footnotes) + "\n"
    if fmt == "latex":
        rows = [
            [cell.replace("_", r"\_").replace(NONCANONICAL_MARK, r"$^\dagger$") for cell in row]
            for row in display_rows(board, r"$\pm$")
        ]
        table = tabulate(rows, HEADERS, tablefmt="latex_raw", disable_numparse=True)
        notes = " ".join(board.footnotes).replace(NONCANONICAL_MARK, r"$^\dagger$")
        return table + "\n% " + notes + "\n"
    if fmt == "html":
        table = tabulate(display_rows(board), HEADERS, tablefmt="html", disable_numparse=True)
        notes = "".join(f"<p>{note}</p>" for note in board.footnotes)
        return table + "\n" + notes + "\n"
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
