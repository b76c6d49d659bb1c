"""The leaderboard: finished MLflow runs -> mean +- std over seeds -> a table in many formats.

Runs are grouped by data set, method and fingerprint: runs with different fingerprints are
never averaged together. When the same (fingerprint, seed) was run more than once, the newest
finished run counts. Unfinished and failed runs are left out and counted in a footnote; a
shot group with no classes stays empty, never 0.

Published reference numbers (``results/published.csv``) are shown beside a row when one matches
its data set, imbalance ratio, backbone and method, with the difference ours - published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

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
#: published reference numbers, kept with their sources in the checkout's results/ folder
PUBLISHED_CSV = Path(__file__).resolve().parent.parent / "results" / "published.csv"
PUBLISHED_COLUMNS = [
    "epochs",
    *(f"published_{name}" for name in METRICS),
    "published_epochs",
    "published_source",
    *(f"delta_{name}" for name in METRICS),
]
OTHER_SCHEDULE_MARK = "*"


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
        if self.has_published:
            note = "published: all (many / medium / few) as reported; Δ: ours - published."
            matched = self.rows[self.rows["published_all"].notna()]
            if (matched["epochs"] != matched["published_epochs"]).any():
                note += (
                    f" {OTHER_SCHEDULE_MARK} published with a different number of epochs than "
                    "these runs: not a like-for-like comparison."
                )
            notes.append(note)
            notes += [f"[{n}] {source}" for n, source in enumerate(self.sources, 1)]
        return notes

    @property
    def has_published(self) -> bool:
        return "published_all" in self.rows and bool(self.rows["published_all"].notna().any())

    @property
    def sources(self) -> list[str]:
        """The sources of the published numbers shown, in order of first appearance."""
        if not self.has_published:
            return []
        return list(dict.fromkeys(self.rows["published_source"].dropna()))


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
    runs: pd.DataFrame,
    excluded: dict[str, int] | None = None,
    fingerprints: set[str] | None = None,
    published: pd.DataFrame | None = None,
) -> Leaderboard:
    """Aggregate runs into the leaderboard, optionally only the given fingerprints; with
    ``published`` (see :func:`load_published`), matching rows get the published numbers."""
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
    if published is not None and not published.empty:
        table = attach_published(table, runs, published)
    return Leaderboard(table.reset_index(drop=True), excluded or {})


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """Published reference numbers: one row per (dataset, imbalance_ratio, backbone, method)
    with ``epochs``, ``all``, ``many``, ``medium``, ``few`` (percent, blank when not reported)
    and ``source``. Default: the checkout's results/published.csv (empty when it is absent,
    as in an installed wheel)."""
    from ltbench.errors import ConfigError

    path = Path(path) if path is not None else PUBLISHED_CSV
    if not path.is_file():
        if path != PUBLISHED_CSV:
            raise ConfigError(f"no published-numbers file {path}")
        return pd.DataFrame()
    table = pd.read_csv(path, comment="#")
    expected = {"dataset", "imbalance_ratio", "backbone", "method", "epochs", "source", *METRICS}
    missing = sorted(expected - set(table.columns))
    if missing:
        raise ConfigError(
            f"published-numbers file {path} lacks the column(s) {', '.join(missing)}; see "
            "results/README.md for the columns"
        )
    return table


def method_key(spec: str) -> str:
    """An order-free name of a method to match published numbers on: its components sorted,
    without ``ce`` next to others (``ce+crt`` is cRT's usual stage 1, i.e. ``crt``)."""
    from ltbench.errors import LtbenchError
    from ltbench.method import METHODS

    try:
        names = METHODS.components(spec)
    except LtbenchError:  # a method no longer registered: match on its name as given
        names = spec.split("+")
    if len(names) > 1:
        names = [n for n in names if n != "ce"]
    return "+".join(sorted(names))


def _number(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def attach_published(
    table: pd.DataFrame, runs: pd.DataFrame, published: pd.DataFrame
) -> pd.DataFrame:
    """Add the published numbers and ours - published to the rows that match one on data set,
    imbalance ratio (both absent counts as a match), backbone and method."""
    ratio_param = "params.dataset.options.imbalance_ratio"
    epochs_param = "params.recipe.epochs"
    first = runs.drop_duplicates("tags.fingerprint").set_index("tags.fingerprint")
    wanted = published.assign(
        _method=published["method"].astype(str).map(method_key),
        _ratio=published["imbalance_ratio"].map(_number),
    )
    table = table.copy()
    for column in PUBLISHED_COLUMNS:
        table[column] = np.nan if column != "published_source" else None
    for index, row in table.iterrows():
        run = first.loc[row["fingerprint"]]
        table.at[index, "epochs"] = _number(run.get(epochs_param))
        ratio = _number(run.get(ratio_param))
        same_ratio = (
            wanted["_ratio"].isna() if np.isnan(ratio) else np.isclose(wanted["_ratio"], ratio)
        )
        found = wanted[
            (wanted["dataset"] == run["tags.dataset"])
            & (wanted["backbone"] == row["backbone"])
            & (wanted["_method"] == method_key(str(row["method"])))
            & same_ratio
        ]
        if found.empty:
            continue
        match = found.iloc[0]
        for name in METRICS:
            table.at[index, f"published_{name}"] = match[name]
            table.at[index, f"delta_{name}"] = row[f"{name}_mean"] - match[name]
        table.at[index, "published_epochs"] = match["epochs"]
        table.at[index, "published_source"] = match["source"]
    if not table["published_all"].notna().any():
        return table.drop(columns=PUBLISHED_COLUMNS)
    return table


def _cell(mean: float, std: float, plus_minus: str) -> str:
    if np.isnan(mean):
        return ""
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} {plus_minus} {std:.2f}"


def display_rows(board: Leaderboard, plus_minus: str = "±") -> list[list[str]]:
    rows = []
    sources = {source: n for n, source in enumerate(board.sources, 1)}
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
        if board.has_published:
            rows[-1] += _published_cells(row, sources)
    return rows


def _published_cells(row: pd.Series, sources: dict[str, int]) -> list[str]:
    """``published`` and ``Δ`` cells: all, then (many / medium / few) where reported."""
    if pd.isna(row["published_all"]):
        return ["", ""]
    groups = [name for name in METRICS if name != "all" and pd.notna(row[f"published_{name}"])]

    def numbers(prefix: str, fmt: str) -> str:
        text = format(row[f"{prefix}_all"], fmt)
        if groups:
            parts = [
                "" if pd.isna(row[f"{prefix}_{g}"]) else format(row[f"{prefix}_{g}"], fmt)
                for g in groups
            ]
            text += f" ({' / '.join(parts)})"
        return text

    other = row["epochs"] != row["published_epochs"]
    reference = f" [{sources[row['published_source']]}]{OTHER_SCHEDULE_MARK if other else ''}"
    return [numbers("published", ".2f") + reference, numbers("delta", "+.2f")]


HEADERS = ["data set", "method", "backbone", "fingerprint", "seeds", "all", "many", "medium", "few"]
PUBLISHED_HEADERS = ["published", "Δ"]


def headers(board: Leaderboard) -> list[str]:
    return HEADERS + (PUBLISHED_HEADERS if board.has_published else [])


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
        table = tabulate(
            display_rows(board), headers(board), tablefmt="github", disable_numparse=True
        )
        return table + "\n\n" + "\n".join(board.footnotes) + "\n"
    if fmt == "latex":
        rows = [
            [cell.replace("_", r"\_").replace(NONCANONICAL_MARK, r"$^\dagger$") for cell in row]
            for row in display_rows(board, r"$\pm$")
        ]
        names = [name.replace("Δ", r"$\Delta$") for name in headers(board)]
        table = tabulate(rows, names, tablefmt="latex_raw", disable_numparse=True)
        notes = " ".join(board.footnotes).replace(NONCANONICAL_MARK, r"$^\dagger$")
        notes = notes.replace("Δ", r"$\Delta$")
        return table + "\n% " + notes + "\n"
    if fmt == "html":
        table = tabulate(
            display_rows(board), headers(board), tablefmt="html", disable_numparse=True
        )
        notes = "".join(f"<p>{note}</p>" for note in board.footnotes)
        return table + "\n" + notes + "\n"
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
