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


# --- With and without one component (e.g. ``--compare nbn``) ---------------------------------

#: param sections that do not identify a setup: those the fingerprint leaves out, and
#: ``posthoc`` (what a post-hoc transform chose, such as tau: an outcome that differs by seed)
UNPAIRED_SECTIONS = ("seed", "train", "tracking", "posthoc")
UNPAIRED_DATA_KEYS = ("data.root", "data.download", "data.allow_noncanonical")


@dataclass
class Comparison:
    """Each setup with and without ``component``: one row per (data set, backbone, recipe,
    method without the component), numbers in percent, ``delta`` = with - without."""

    component: str
    rows: pd.DataFrame
    excluded: dict[str, int] = field(default_factory=dict)


def _components(method: str) -> list[str]:
    from ltbench.errors import PluginError
    from ltbench.method import METHODS

    try:
        return METHODS.components(method)
    except PluginError:  # a plugin not installed here: take the spec literally
        return [part.strip() for part in method.split("+")]


def _setup_key(row: pd.Series, base: list[str]) -> str:
    """What a run's setup is apart from the compared component: every fingerprinted param but
    the method, plus the other components and their options."""
    kept = {"method.components": "+".join(base)}
    for column, value in row.items():
        key = str(column).removeprefix("params.")
        if key == column or not isinstance(value, str):
            continue
        if key.split(".")[0] in UNPAIRED_SECTIONS or key in UNPAIRED_DATA_KEYS:
            continue
        if key.startswith("method.") and not any(
            key.startswith(f"method.options.{c}.") for c in base
        ):
            continue
        kept[key] = value
    return json.dumps(kept, sort_keys=True)


def _variant(run: pd.Series, component: str) -> str:
    """The component's options where they differ from its defaults ("" for the defaults)."""
    from ltbench.config import flatten
    from ltbench.errors import LtbenchError
    from ltbench.method import METHODS

    prefix = f"params.method.options.{component}."
    try:
        defaults = flatten(METHODS.resolve_options(component, {})[component])
    except LtbenchError:  # a plugin not installed here: show every option given
        defaults = {}
    changed = [
        f"{key.removeprefix(prefix)}={value}"
        for key, value in run.items()
        if str(key).startswith(prefix)
        and isinstance(value, str)
        and str(defaults.get(key.removeprefix(prefix))) != value
    ]
    return ", ".join(sorted(changed))


def compare(
    runs: pd.DataFrame, component: str, excluded: dict[str, int] | None = None
) -> Comparison:
    """Pair each method X with X+``component`` on the same data set, backbone, recipe and
    options (``runs`` from :func:`collect`, which carry their params). Plain ``component``
    pairs with ``ce``. A setup run only one way shows the other side empty."""
    sides = ("without", "with")
    columns = ["dataset", "method", "backbone", "canonical"]
    columns += [f"{key}_{side}" for key in ("fingerprint", "seeds") for side in sides]
    columns += [f"{n}_{s}" for n in METRICS for s in ("without", "without_std", "with", "with_std")]
    columns += [f"{n}_delta" for n in METRICS]
    if runs.empty:
        return Comparison(component, pd.DataFrame(columns=columns), excluded or {})

    groups: dict[str, dict] = {}
    for _, run in runs.iterrows():
        components = _components(run["tags.method"])
        base = sorted(set(components) - {component}) or ["ce"]
        group = groups.setdefault(
            _setup_key(run, base),
            {
                "dataset": _dataset_label(run),
                "method": "+".join(base),
                "backbone": run["tags.backbone"],
                "without": [],
                "variants": {},
            },
        )
        if component in components:
            group["variants"].setdefault(_variant(run, component), []).append(run)
        else:
            group["method"] = run["tags.method"]
            group["without"].append(run)

    setups = []
    for group in groups.values():
        for variant, with_runs in group["variants"].items() or [("", [])]:
            label = group["method"] + (f" [{component}: {variant}]" if variant else "")
            setups.append(group | {"method": label, "with": with_runs})

    rows = []
    for setup in setups:
        row = {k: setup[k] for k in ("dataset", "method", "backbone")}
        row["canonical"] = all(
            r.get("tags.data_canonical", "true") != "false"
            for r in setup["without"] + setup["with"]
        )
        for side in sides:
            row[f"seeds_{side}"] = len(setup[side])
            row[f"fingerprint_{side}"] = setup[side][0]["tags.fingerprint"] if setup[side] else ""
            for name, metric in METRICS.items():
                values = pd.Series([r.get(f"metrics.{metric}") for r in setup[side]], dtype=float)
                values = values.dropna()
                row[f"{name}_{side}"] = values.mean() if len(values) else np.nan
                row[f"{name}_{side}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
        for name in METRICS:
            row[f"{name}_delta"] = row[f"{name}_with"] - row[f"{name}_without"]
        rows.append(row)
    table = pd.DataFrame(rows, columns=columns).sort_values(["dataset", "backbone", "method"])
    return Comparison(component, table.reset_index(drop=True), excluded or {})


def _dataset_label(run: pd.Series) -> str:
    label = run.get("tags.dataset_label")
    return label if isinstance(label, str) and label else run["tags.dataset"]


def _delta(value: float) -> str:
    return "" if np.isnan(value) else f"{value:+.2f}"


def render_comparison(comparison: Comparison, fmt: str = "markdown") -> str:
    """The comparison as Markdown, CSV, LaTeX, HTML or JSON."""
    plus = f"+{comparison.component}"
    notes = [
        f"Each method without and with {comparison.component} (same data set, backbone, recipe "
        f"and options); delta = with - without, in points. Top-1 accuracy (%) on the test split, "
        "mean ± std over seeds, last epoch."
    ]
    if comparison.excluded:
        notes.append(f"{sum(comparison.excluded.values())} unfinished or failed run(s) left out.")
    if len(comparison.rows) and not comparison.rows["canonical"].astype(bool).all():
        notes.append(
            f"{NONCANONICAL_MARK} non-canonical data: the files differ from the official release."
        )
    if fmt == "csv":
        return comparison.rows.to_csv(index=False, float_format="%.4f")
    if fmt == "json":
        records = json.loads(comparison.rows.to_json(orient="records", double_precision=4))
        payload = {"component": comparison.component, "rows": records, "notes": notes}
        return json.dumps(payload, indent=2) + "\n"
    plus_minus = r"$\pm$" if fmt == "latex" else "±"
    headers = ["data set", "method", "backbone", "fingerprints", "seeds"]
    for name in METRICS:
        headers += [name, f"{name} {plus}", "Δ"]
    rows = []
    for _, row in comparison.rows.iterrows():
        cells = [
            row["dataset"] + ("" if row["canonical"] else f" {NONCANONICAL_MARK}"),
            row["method"],
            row["backbone"],
            f"{row['fingerprint_without'][:8] or '-'} / {row['fingerprint_with'][:8] or '-'}",
            f"{row['seeds_without']} / {row['seeds_with']}",
        ]
        for name in METRICS:
            cells += [
                _cell(row[f"{name}_without"], row[f"{name}_without_std"], plus_minus),
                _cell(row[f"{name}_with"], row[f"{name}_with_std"], plus_minus),
                _delta(row[f"{name}_delta"]),
            ]
        rows.append(cells)
    if fmt == "markdown":
        table = tabulate(rows, headers, tablefmt="github", disable_numparse=True)
        return table + "\n\n" + "\n".join(notes) + "\n"
    if fmt == "latex":
        mark = r"$^\dagger$"
        rows = [
            [c.replace("_", r"\_").replace(NONCANONICAL_MARK, mark) for c in row] for row in rows
        ]
        notes = [note.replace(NONCANONICAL_MARK, mark) for note in notes]
        headers = [h.replace("Δ", r"$\Delta$").replace("_", r"\_") for h in headers]
        table = tabulate(rows, headers, tablefmt="latex_raw", disable_numparse=True)
        return table + "\n% " + " ".join(notes) + "\n"
    if fmt == "html":
        table = tabulate(rows, headers, tablefmt="html", disable_numparse=True)
        return table + "\n" + "".join(f"<p>{note}</p>" for note in notes) + "\n"
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
