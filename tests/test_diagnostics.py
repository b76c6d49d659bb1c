"""Diagnostics: feature strength and BN weights against hand computations, as artifacts of real
runs, and the with/without-NBN views (``leaderboard --compare``, ``ltbench diagnostics``)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from ltbench import diagnostics, leaderboard
from ltbench.cli import main
from ltbench.config import RecipeConfig, TrainConfig
from ltbench.datasets.digits_lt import DigitsLT
from ltbench.distributed import setup
from ltbench.engine import Evaluator
from ltbench.method import METHODS, MethodContext
from ltbench.models import MODELS, ImageClassifier
from ltbench.tracking import Tracker

CTX = MethodContext(10, torch.full((10,), 10), 2, "train", 0, torch.device("cpu"))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits():
    return DigitsLT().load(root=None, download=False, allow_noncanonical=True)


def linear_model() -> ImageClassifier:
    """Features = ReLU of a fixed linear map of the pixels: easy to compute by hand."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU())
    return ImageClassifier(backbone, 6, 10)


def evaluator_on_test(data) -> Evaluator:
    settings = TrainConfig(channels_last=False)
    return Evaluator(data.test, data, setup("cpu"), settings, 64, RecipeConfig())


def test_feature_strength_by_hand(digits):
    model = linear_model()
    table = diagnostics.feature_strength(model, evaluator_on_test(digits), digits)
    images = (digits.test.images.float() / 255 - digits.mean[0]) / digits.std[0]
    with torch.no_grad():
        features = model.backbone(images).double()
    weight = model.classifier.weight.detach().double()
    labels = digits.test.labels
    for c in (0, 9):
        mine = features[labels == c]
        direction = weight[c] / weight[c].norm()
        row = table.loc[c]
        assert row["test_count"] == 40 and row["train_count"] == int(digits.class_counts[c])
        assert row["feature_strength"] == pytest.approx(float((mine @ direction).mean()))
        assert row["feature_norm"] == pytest.approx(float(mine.norm(dim=1).mean()))
        assert row["classifier_norm"] == pytest.approx(float(weight[c].norm()))
    strengths = table["feature_strength"]
    assert table["relative_strength"].tolist() == pytest.approx(
        (strengths / strengths.abs().mean()).tolist()
    )
    assert table["shot_group"].tolist()[:2] == ["many", "many"]


def test_strength_does_not_change_when_class_weights_are_rescaled(digits):
    model = linear_model()
    args = (evaluator_on_test(digits), digits)
    before = diagnostics.feature_strength(model, *args)
    with torch.no_grad():  # tau-norm or LWS style per-class rescaling
        model.classifier.weight.mul_(torch.linspace(0.1, 3, 10).unsqueeze(1))
    after = diagnostics.feature_strength(model, *args)
    assert after["feature_strength"].tolist() == pytest.approx(before["feature_strength"].tolist())
    assert after["classifier_norm"].tolist() != pytest.approx(before["classifier_norm"].tolist())


def test_summary_of_a_known_table():
    table = pd.DataFrame(
        {
            "train_count": [100, 50, 10, 5],
            "shot_group": ["many", "medium", "few", "few"],
            "test_count": [10, 10, 10, 10],
            "feature_strength": [4.0, 3.0, 2.0, 1.0],
        }
    )
    summary = diagnostics.strength_summary(table)
    assert summary["diag_strength_count_corr"] == pytest.approx(1.0)
    assert summary["diag_strength_few_many"] == pytest.approx(1.5 / 4.0)
    assert summary["diag_strength_cv"] == pytest.approx(1.118034 / 2.5, rel=1e-5)
    even = table.assign(feature_strength=[2.0, 2.0, 2.0, 2.0])
    assert "diag_strength_count_corr" not in diagnostics.strength_summary(even)  # undefined
    signs = diagnostics.strength_summary(table.assign(feature_strength=[-1.0, 2.0, -3.0, 2.0]))
    assert signs["diag_strength_cv"] == pytest.approx(4.5**0.5 / 2.0)
    assert "diag_strength_few_many" not in signs  # the many-shot mean is negative


def test_classifier_weight_is_found_inside_a_wrapper():
    model = linear_model()
    weight = model.classifier.weight
    model.classifier = nn.Sequential(model.classifier, nn.Identity())
    assert diagnostics.classifier_weight(model, 10, 6) is not None
    assert torch.equal(diagnostics.classifier_weight(model, 10, 6), weight.detach())
    model.classifier = nn.Identity()
    assert diagnostics.classifier_weight(model, 10, 6) is None


def test_bn_weights_report_what_each_layer_applies():
    torch.manual_seed(0)
    plain = MODELS.build("resnet8", 10, 1, {"shortcut": "B"})
    table = diagnostics.bn_weights(plain)
    assert set(table["layer"]) == {"layer3.0.bn1", "layer3.0.bn2", "layer3.0.downsample.1"}
    assert len(table) == 3 * 64 and not table["normalized"].any()
    assert (table["applied_weight"] == table["weight"]).all()

    model = METHODS.compose("nbn").adapt_model(plain, CTX)
    layer = model.backbone.layer3[0].bn2
    with torch.no_grad():
        layer.alpha.fill_(3.0)
        layer.weight.copy_(torch.arange(64.0))
    table = diagnostics.bn_weights(model).set_index(["layer", "channel"])
    norm = float(torch.arange(64.0).norm())
    assert table.loc[("layer3.0.bn2", 10), "applied_weight"] == pytest.approx(3 * 10 / norm)
    assert table.loc[("layer3.0.bn2", 10), "weight"] == 10.0
    assert table.loc[("layer3.0.bn2", 10), "alpha"] == 3.0
    assert table.loc[("layer3.0.downsample.1", 0), "applied_weight"] == pytest.approx(
        3 / plain.backbone.layer3[0].downsample[1].weight.norm().item(), rel=1e-5
    )
    assert not table.loc["layer3.0.bn1", "normalized"].any()


@pytest.fixture(scope="module")
def suite_store(tmp_path_factory):
    """ce and nbn, two seeds each, two epochs, on digits_lt, through the command line."""
    folder = tmp_path_factory.mktemp("diagnostics_store")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        overrides = ["methods=[ce,nbn]", "seeds=[0,1]", "recipe.epochs=2", "train.log_every=100"]
        assert main(["run", "default", *overrides]) == 0
        yield Tracker()


def test_every_run_logs_the_diagnostics(suite_store, tmp_path):
    runs, _ = leaderboard.collect(suite_store, ["default"])
    assert len(runs) == 4
    for run_id in runs["run_id"]:
        metrics = suite_store.client.get_run(run_id).data.metrics
        assert -1 <= metrics["diag_strength_count_corr"] <= 1
        table = pd.read_csv(suite_store.download(run_id, diagnostics.STRENGTH_CSV, str(tmp_path)))
        assert len(table) == 10 and table["test_count"].sum() == 400
        assert table["relative_strength"].abs().mean() == pytest.approx(1.0, abs=1e-4)
        weights = pd.read_csv(suite_store.download(run_id, diagnostics.BN_CSV, str(tmp_path)))
        assert set(weights["layer"]) == {"layer3.0.bn1", "layer3.0.bn2"}
        normalized = weights[weights["normalized"]]
        is_nbn = suite_store.client.get_run(run_id).data.tags["method"] == "nbn"
        assert set(normalized["layer"]) == ({"layer3.0.bn2"} if is_nbn else set())
        for name in ("feature_strength.png", "bn_weights.png"):
            png = suite_store.download(run_id, f"diagnostics/{name}", str(tmp_path))
            assert png.read_bytes().startswith(PNG)


def test_diagnostics_can_be_switched_off(store):
    from ltbench.runner import execute

    from .conftest import run_config

    outcome = execute(run_config("recipe.epochs=1", "train.diagnostics=false"))
    assert not store.has_artifact(outcome.run_id, diagnostics.STRENGTH_CSV)
    assert "diag_strength_cv" not in store.client.get_run(outcome.run_id).data.metrics


def test_leaderboard_compares_each_method_with_and_without_nbn(suite_store, capsys):
    runs, _ = leaderboard.collect(suite_store, ["default"])
    accuracy = runs.groupby("tags.method")["metrics.test_acc"].mean()
    assert main(["leaderboard", "--compare", "nbn", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 1 and rows[0]["method"] == "ce"
    assert rows[0]["seeds_without"] == rows[0]["seeds_with"] == 2
    assert rows[0]["all_without"] == pytest.approx(accuracy["ce"], abs=1e-4)
    assert rows[0]["all_with"] == pytest.approx(accuracy["nbn"], abs=1e-4)
    assert rows[0]["all_delta"] == pytest.approx(accuracy["nbn"] - accuracy["ce"], abs=1e-3)
    assert main(["leaderboard", "--compare", "nbn"]) == 0
    markdown = capsys.readouterr().out
    assert "all +nbn" in markdown and f"{accuracy['nbn'] - accuracy['ce']:+.2f}" in markdown


def test_diagnostics_command_overlays_the_runs(suite_store, tmp_path, capsys):
    out = tmp_path / "comparison"
    assert main(["diagnostics", "--experiment", "default", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ce " in printed and "| nbn " in printed
    per_class = pd.read_csv(out / "feature_strength.csv")
    assert list(per_class.columns) == ["class", "train_count", "shot_group", "ce", "nbn"]
    strength, _ = diagnostics.collect_tables(suite_store, ["default"])
    assert len(strength["ce"]) == 2  # the mean over the two seeds, class by class
    mean = (strength["ce"][0]["relative_strength"] + strength["ce"][1]["relative_strength"]) / 2
    assert per_class["ce"].tolist() == pytest.approx(mean.tolist(), abs=1e-5)
    summary = pd.read_csv(out / "summary.csv").set_index("label")
    assert summary.loc["nbn", "runs"] == 2
    assert (out / "feature_strength.png").read_bytes().startswith(PNG)
    assert (out / "bn_weights.png").read_bytes().startswith(PNG)
    assert main(["diagnostics", "--dataset", "cifar10_lt", "--out", str(out)]) == 2


def run_row(method: str, seed: int, acc: float, **params: str) -> dict:
    row = {
        "run_id": f"{method}-{seed}-{params}",
        "tags.dataset": "d",
        "tags.method": method,
        "tags.backbone": "resnet32",
        "tags.seed": str(seed),
        "tags.fingerprint": f"{method}-{sorted(params.items())}",
        "metrics.test_acc": acc,
        "metrics.test_acc_many": acc + 10,
        "params.recipe.epochs": "200",
        "params.seed": str(seed),
        "params.data.root": f"/data/{seed}",
        "params.data.identity": "canonical",
        "params.method.name": method,
    }
    return row | {f"params.{k}": v for k, v in params.items()}


def test_pairs_match_everything_but_the_component():
    nbn_default = {"method.options.nbn.rectify_logits": "False"}
    runs = pd.DataFrame(
        [
            run_row("ldam_drw", 0, 70.0),
            run_row("ldam_drw", 1, 72.0),
            run_row("ldam_drw+nbn", 0, 75.0, **nbn_default),
            run_row("nbn+ldam_drw", 1, 76.0, **nbn_default),
            run_row("ldam_drw+nbn", 0, 60.0, **{"method.options.nbn.rectify_logits": "True"}),
            run_row("ldam_drw", 0, 50.0, **{"recipe.epochs": "20"}),
        ]
    )
    runs["tags.data_canonical"] = ["true"] * 5 + ["false"]
    table = leaderboard.compare(runs, "nbn").rows
    assert len(table) == 3  # the 20-epoch run pairs with nothing
    unpaired = table[table["fingerprint_with"] == ""]
    assert unpaired["seeds_without"].tolist() == [1] and unpaired["all_without"].tolist() == [50]
    table = table.drop(unpaired.index).set_index("method")
    paired = table.loc["ldam_drw"]
    assert paired["seeds_without"] == 2 and paired["seeds_with"] == 2
    assert paired["all_without"] == 71.0 and paired["all_with"] == 75.5
    assert paired["all_delta"] == 4.5 and paired["many_delta"] == 4.5
    assert pd.isna(paired["medium_delta"])  # no numbers on either side
    variant = table.loc["ldam_drw [nbn: rectify_logits=True]"]
    assert variant["seeds_without"] == 2 and variant["all_delta"] == -11.0
    text = leaderboard.render_comparison(leaderboard.compare(runs, "nbn"), "markdown")
    assert "+4.50" in text and "-11.00" in text and "71.00 ± 1.41" in text
    marked = [line for line in text.splitlines() if "| d †" in line]
    assert len(marked) == 1 and "50.00" in marked[0] and "non-canonical data" in text


def test_post_hoc_choices_do_not_split_a_setup():
    """tau-norm logs the tau it chose per seed; seeds that chose differently are one setup."""
    runs = pd.DataFrame(
        [
            run_row("tau_norm", 0, 40.0, **{"posthoc.tau": "0.2"}),
            run_row("tau_norm", 1, 44.0, **{"posthoc.tau": "0.7"}),
            run_row("tau_norm+nbn", 0, 41.0, **{"posthoc.tau": "1.0"}),
            run_row("tau_norm+nbn", 1, 47.0, **{"posthoc.tau": "0.3"}),
        ]
    )
    (row,) = leaderboard.compare(runs, "nbn").rows.to_dict("records")
    assert row["seeds_without"] == row["seeds_with"] == 2
    assert row["all_without"] == 42.0 and row["all_with"] == 44.0 and row["all_delta"] == 2.0
