"""Cross-validation end to end through DVC: cv.folds=3 on the synthetic archive."""
import hashlib
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import yaml

import hmnist
from conftest import run
from hmnist.commands.cli import main as cli_main
from synthetic import image_folder

pytestmark = pytest.mark.slow
COLUMNS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_three_folds(project, tmp_path, capsys):
    run(["dvc", "repro", "split"], project)
    split_one_fold = digest(project / "data/split.csv")

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["models"]["resnet9"]["epochs"] = 1
    params["cv"] = {"folds": 3, "other_folds": [1, 2]}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # a run that stopped after fold 1 (a crash, Ctrl-C): the next run does not redo fold 1
    assert ran(run(["dvc", "repro", "train_fold@1"], project).stdout) == ["check_params", "split", "train_fold@1"]
    assert ran(run(["dvc", "repro"], project).stdout) == ["train", "train_fold@2", "evaluate", "export"]
    assert digest(project / "data/split.csv") == split_one_fold  # the test split does not change with K

    split = pd.read_csv(project / "data/split.csv")
    folds = pd.read_csv(project / "data/folds.csv")
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    assert set(folds["image_id"]) == set(split.loc[split["split"] != "test", "image_id"])
    assert folds.groupby("lesion_id")["fold"].nunique().max() == 1  # whole lesions

    metrics = json.loads((project / "metrics/metrics.json").read_text())
    assert metrics["ensemble_of"] == 3 and metrics["cv"]["folds"] == 3
    assert metrics["cv"]["out_of_fold"]["images"] == len(folds)
    for name in ("balanced_accuracy", "accuracy", "macro_f1", "melanoma_sensitivity"):
        assert metrics[f"{name}_low"] <= metrics[name] <= metrics[f"{name}_high"], name
        assert metrics["cv"][f"{name}_sd"] >= 0 and 0 <= metrics["cv"][f"{name}_mean"] <= 1
    for fold in (1, 2):
        assert (project / f"models/fold{fold}.pt").exists()
        assert (project / f"dvclive/fold{fold}/metrics.json").exists()
    assert (project / "dvclive/metrics.json").exists()  # fold 0's, beside the others
    # the export is the ensemble evaluate measured: the 3 fold models in one graph
    from hmnist.onnx_model import OnnxModel

    assert OnnxModel(project / "export/model.onnx").members == 3
    assert "the 3 cross-validation fold models' ensemble" in (project / "export/MODEL_CARD.md").read_text()

    # cached per fold: nothing to do
    assert ran(run(["dvc", "repro"], project).stdout) == []

    # the ensemble on new images: hmnist predict with the three checkpoints gives predictions/test.csv
    test = pd.read_csv(project / "predictions/test.csv")
    images = tmp_path / "images"
    images.mkdir()
    with zipfile.ZipFile(project / "data/raw/skin-cancer-mnist-ham10000.zip") as archive:
        for image_id in test["image"]:
            (images / f"{image_id}.jpg").write_bytes(archive.read(f"{image_folder(image_id)}/{image_id}.jpg"))
    checkpoints = [a for f in ("model", "fold1", "fold2") for a in ("--checkpoint", str(project / f"models/{f}.pt"))]
    cli_main(["predict", *checkpoints, str(images), "--out", str(tmp_path / "ensemble.csv"), "--device", "cpu"])
    assert "ensemble of 3" in capsys.readouterr().out
    ensemble = pd.read_csv(tmp_path / "ensemble.csv")
    np.testing.assert_allclose(ensemble[COLUMNS].to_numpy(), test[COLUMNS].to_numpy(), atol=1e-5)
    # calibrated: each fold by its own calibration, then averaged, in evaluate as in predict
    calibrated = pd.read_csv(project / "predictions/test_calibrated.csv")
    np.testing.assert_allclose(pd.read_csv(tmp_path / "ensemble_calibrated.csv")[COLUMNS].to_numpy(),
                               calibrated[COLUMNS].to_numpy(), atol=1e-5)
    from hmnist.models import load_checkpoint

    members = [load_checkpoint(project / f"models/{f}.pt") for f in ("model", "fold1", "fold2")]
    assert len({m["calibration"]["temperature"] for m in members}) == 3  # each fitted on its own fold
    for op in ("mel@sens0.80", "malignant@sens0.90"):  # the ensemble's threshold: the mean of the folds'
        thresholds = [next(p["threshold"] for p in m["operating_points"] if p["name"] == op) for m in members]
        assert metrics["operating_points"][op]["threshold"] == pytest.approx(np.mean(thresholds))
    decisions = pd.read_csv(tmp_path / "ensemble_decisions.csv")
    score = calibrated[["MEL", "BCC", "AKIEC"]].sum(axis=1).to_numpy()
    expected = np.where(score >= metrics["operating_points"]["malignant@sens0.90"]["threshold"], "yes", "no")
    assert decisions["malignant@sens0.90"].tolist() == expected.tolist()
    one = hmnist.load(project / "models/fold1.pt", device="cpu").predict(images)
    assert np.abs(one[COLUMNS].to_numpy() - test[COLUMNS].to_numpy()).max() > 1e-3  # a fold alone is not the ensemble

    # the cross-validation figures, recomputed here from each fold model's own predictions
    # (decoded from the JPEGs by predict, not from evaluate's cache) with scikit-learn
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    classes = [c.lower() for c in COLUMNS]
    models = {fold: hmnist.load(project / f"models/{name}.pt", device="cpu")
              for fold, name in {0: "model", 1: "fold1", 2: "fold2"}.items()}
    per_fold = []
    for model in models.values():
        probs = model.predict(images)
        predicted = [classes[i] for i in probs[COLUMNS].to_numpy().argmax(1)]
        truth = test.set_index("image").loc[probs["image"], "dx"]
        per_fold.append((balanced_accuracy_score(truth, predicted), accuracy_score(truth, predicted)))
    for i, name in enumerate(("balanced_accuracy", "accuracy")):
        values = [scores[i] for scores in per_fold]
        assert metrics["cv"][f"{name}_mean"] == pytest.approx(np.mean(values), abs=1e-9), name
        assert metrics["cv"][f"{name}_sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-9), name
    # out of fold: every non-test image predicted by the one model that did not train on it
    oof_truth, oof_predicted = [], []
    oof_probs = []
    with zipfile.ZipFile(project / "data/raw/skin-cancer-mnist-ham10000.zip") as archive:
        for fold, model in models.items():
            held_out = tmp_path / f"fold{fold}"
            held_out.mkdir()
            ids = folds.loc[folds["fold"] == fold, "image_id"]
            for image_id in ids:
                (held_out / f"{image_id}.jpg").write_bytes(archive.read(f"{image_folder(image_id)}/{image_id}.jpg"))
            probs = model.predict(held_out)
            oof_probs.append(probs)
            oof_predicted += [classes[i] for i in probs[COLUMNS].to_numpy().argmax(1)]
            oof_truth += folds.set_index("image_id").loc[probs["image"], "dx"].tolist()
    assert len(oof_truth) == len(folds)
    assert metrics["cv"]["out_of_fold"]["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(oof_truth, oof_predicted), abs=1e-9)
    assert metrics["cv"]["out_of_fold"]["accuracy"] == pytest.approx(accuracy_score(oof_truth, oof_predicted), abs=1e-9)

    # predictions/oof.csv holds those same out-of-fold probabilities, for `hmnist compare --oof`
    oof = pd.read_csv(project / "predictions/oof.csv")
    expected = pd.concat(oof_probs).sort_values("image").reset_index(drop=True)
    assert oof["image"].tolist() == expected["image"].tolist() and len(oof) == len(folds)
    np.testing.assert_allclose(oof[COLUMNS].to_numpy(), expected[COLUMNS].to_numpy(), atol=1e-5)
    assert oof["dx"].tolist() == folds.set_index("image_id").loc[oof["image"], "dx"].tolist()
    capsys.readouterr()
    cli_main(["compare", "workspace", "workspace", "--oof", "--repo", str(project), "--resamples", "100"])
    assert f"{len(folds)} out-of-fold images" in capsys.readouterr().out
