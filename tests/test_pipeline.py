"""End to end through DVC on the synthetic archive: what a user runs, on a CPU."""
import json

import pandas as pd
import pytest
import yaml

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
    assert metrics["model"] == "deit" and 0 <= metrics["balanced_accuracy"] <= 1
    assert set(metrics["per_class"]) == {"mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"}
    for path in ("plots/confusion_matrix.png", "plots/roc.png", "plots/training_curves.png"):
        assert (project / path).read_bytes().startswith(b"\x89PNG")
    split = pd.read_csv(project / "data/split.csv")
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
    assert json.loads((project / "metrics/metrics.json").read_text())["model"] == "resnet9"

    diff = run(["dvc", "metrics", "diff", "HEAD", "resnet9-exp", "--json"], project)
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
