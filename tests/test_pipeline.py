"""End to end through DVC on the synthetic archive: what a user runs, on a CPU."""
import json

import pandas as pd
import pytest
import yaml
from sklearn.metrics import balanced_accuracy_score

from conftest import run

pytestmark = pytest.mark.slow
STAGES = ("download", "prepare", "split", "train", "evaluate")


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_repro_exp_and_diff(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"] = "deit"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    first = run(["dvc", "repro"], project)
    assert ran(first.stdout) == list(STAGES)
    metrics = json.loads((project / "metrics/metrics.json").read_text())
    assert metrics["model"] == "deit"
    assert set(metrics["per_class"]) == {"mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"}
    # the metrics are those of the stage's own predictions, on exactly the test split's images
    split = pd.read_csv(project / "data/split.csv")
    test = split[split["split"] == "test"].sort_values("image_id")
    predictions = pd.read_csv(project / "predictions/test.csv")
    assert predictions["image"].tolist() == test["image_id"].tolist() == sorted(test["image_id"])
    predicted = predictions.iloc[:, 1:].to_numpy().argmax(1)
    actual = test["dx"].map({c: i for i, c in enumerate(("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"))})
    assert metrics["test_images"] == len(test)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(actual, predicted))
    assert metrics["accuracy"] == pytest.approx((actual.to_numpy() == predicted).mean())
    for path in ("plots/confusion_matrix.png", "plots/roc.png", "plots/training_curves.png"):
        assert (project / path).read_bytes().startswith(b"\x89PNG")
    assert split.groupby("lesion_id")["split"].nunique().max() == 1
    assert (project / "dvclive/plots/metrics/val/balanced_accuracy.tsv").exists()

    second = run(["dvc", "repro"], project)
    assert ran(second.stdout) == [] and "up to date" in second.stdout.lower()

    # another model's settings are not this run's params: nothing to do
    other = yaml.safe_load((project / "params.yaml").read_text())
    other["models"]["swin"]["lr"] = 1e-3
    (project / "params.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    assert "up to date" in run(["dvc", "status"], project).stdout.lower()

    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "deit baseline"], project)
    exp = run(["dvc", "exp", "run", "-S", "model=resnet9", "-n", "resnet9-exp"], project)
    assert ran(exp.stdout) == ["train", "evaluate"]
    resnet9 = json.loads((project / "metrics/metrics.json").read_text())
    assert resnet9["model"] == "resnet9"
    # the synthetic classes are learnable: two tiny epochs already beat chance (1/7) by far
    assert resnet9["balanced_accuracy"] > 0.3, resnet9

    diff = run(["dvc", "metrics", "diff", "HEAD", "resnet9-exp", "--all", "--json"], project)  # --all: unchanged too
    rows = json.loads(diff.stdout)["metrics/metrics.json"]
    for key in ("accuracy", "balanced_accuracy", "macro_auc", "melanoma_sensitivity", "per_class.mel.recall"):
        assert "old" in rows[key] and "new" in rows[key], key
    text = run(["dvc", "metrics", "diff", "HEAD", "resnet9-exp"], project).stdout
    assert "balanced_accuracy" in text

    show = run(["dvc", "exp", "show", "--csv"], project).stdout
    assert "resnet9-exp" in show and "balanced_accuracy" in show
    plots = run(["dvc", "plots", "diff", "HEAD", "resnet9-exp", "--json"], project)
    assert "plots/confusion.csv" in plots.stdout


def test_typo_fails_first_stage(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["split"]["tset"] = 0.2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    assert "error: params.yaml: unknown key 'split.tset'" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert not (project / "data/raw/skin-cancer-mnist-ham10000.zip").exists()
