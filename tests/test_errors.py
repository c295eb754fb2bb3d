"""Documented user errors that no other test provokes, each at the function that raises it:
the right one-line message for the mistake, without training anything (docs/errors.md)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hmnist.config import CLASSES, ModelConfig, SplitConfig, load_params
from hmnist.data import fold_split, load_folds, load_split
from hmnist.errors import UserError
from hmnist.models import create_model, load_checkpoint, save_checkpoint
from hmnist.runs import CHECKPOINT, Run, check_same_test_set, checked_predictions, parse_recipe, pull_hint, _read_csv


def tiny_checkpoint(path: Path, prepare_size: int = 32, classes=CLASSES) -> Path:
    """An untrained ResNet9 saved as the train stage saves one (the fields predict reads)."""
    config = ModelConfig(arch="resnet9", resize=32)
    meta = {"model_name": "resnet9", "arch": "resnet9", "model_config": {**config.__dict__}, "classes": list(classes),
            "input_size": 32, "prepare_size": prepare_size, "mean": [0.5] * 3, "std": [0.25] * 3}
    save_checkpoint(path, create_model(config).eval(), meta)
    return path


def test_an_unreadable_params_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").mkdir()  # root reads any file: a folder in its place cannot be read by anyone
    with pytest.raises(UserError, match=r"^cannot read params.yaml: Is a directory$"):
        load_params()


def test_a_lesion_with_two_diagnoses_cannot_be_split(tmp_path):
    from hmnist.stages.split import split_lesions

    index = pd.DataFrame({"image_id": ["a", "b", "c"], "lesion_id": ["L1", "L1", "L2"], "dx": ["mel", "nv", "nv"]})
    with pytest.raises(UserError, match=r"^lesions with more than one dx cannot be split by lesion: L1$"):
        split_lesions(index, SplitConfig())


def test_split_and_fold_files_missing_or_not_matching(tmp_path):
    with pytest.raises(UserError, match=rf"^{tmp_path}/split.csv not found: run `dvc repro split` first$"):
        load_split(tmp_path / "split.csv")
    with pytest.raises(UserError, match=rf"^{tmp_path}/folds.csv not found: run `dvc repro split` first$"):
        load_folds(tmp_path / "folds.csv")
    split = pd.DataFrame({"image_id": ["a", "b", "c"], "lesion_id": ["1", "2", "3"], "dx": ["nv"] * 3,
                          "split": ["train", "val", "test"]})
    folds = pd.DataFrame({"image_id": ["a", "b"], "lesion_id": ["1", "2"], "dx": ["nv"] * 2, "fold": [0, 1]})
    assert fold_split(split, folds, 1)["split"].tolist() == ["train", "val", "test"]
    with pytest.raises(UserError, match=r"^data/folds.csv has no fold 2: run `dvc repro split` \(with cv.folds above 2\)$"):
        fold_split(split, folds, 2)
    with pytest.raises(UserError, match=r"^data/folds.csv does not match data/split.csv: run `dvc repro split`$"):
        fold_split(split, folds.iloc[:1], 0)  # a fold file from another split: an image missing


def test_a_model_without_stochastic_depth():
    with pytest.raises(UserError, match=r"^resnet9 has no stochastic depth: set its drop_path_rate to 0$"):
        create_model(ModelConfig(arch="resnet9", resize=32, drop_path_rate=0.1))


def test_a_checkpoint_of_another_version_or_class_list(tmp_path):
    path = tiny_checkpoint(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(UserError, match=rf"^{tmp_path}/future.pt is checkpoint version 99, this hmnist reads version 1$"):
        load_checkpoint(tmp_path / "future.pt")

    from hmnist.predictor import Predictor

    tiny_checkpoint(tmp_path / "other.pt", classes=[c.upper() for c in CLASSES])
    with pytest.raises(UserError, match=rf"^{tmp_path}/other.pt predicts classes MEL, NV, .*, "
                                        r"not the ISIC 2018 ones \(mel, nv, bcc, akiec, bkl, df, vasc\)$"):
        Predictor(tmp_path / "other.pt", "cpu")


def test_an_ensemble_of_two_cache_sizes(tmp_path):
    from hmnist.predictor import Predictor

    a, b = tiny_checkpoint(tmp_path / "a.pt", 32), tiny_checkpoint(tmp_path / "b.pt", 64)
    with pytest.raises(UserError, match=rf"^{b} reads 64px images but {a} 32px: "
                                        "an ensemble's checkpoints must come from one cache size$"):
        Predictor([a, b], "cpu")


def test_evaluating_on_a_cache_of_another_size(tmp_path):
    from hmnist.stages.evaluate import evaluate

    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path / "model.pt", prepare_size=64))
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(UserError, match=r"^the prepared cache is 32px but the model was trained on 64px: run `dvc repro`$"):
        evaluate(checkpoint, images, 2, "cpu")


def test_a_submission_that_cannot_be_written(tmp_path):
    from hmnist.commands.predict import write_submission

    (tmp_path / "taken").write_text("a file where the folder should be")
    with pytest.raises(UserError, match=rf"^cannot write {tmp_path}/taken/out.csv: (File exists|Not a directory)$"):
        write_submission(pd.DataFrame({"image": ["x"]}), str(tmp_path / "taken" / "out.csv"))
    assert list(tmp_path.iterdir()) == [tmp_path / "taken"]  # no .partial left


def predictions(images, dx=None, lesions=None) -> pd.DataFrame:
    frame = pd.DataFrame({"image": images, **{c.upper(): 1 / 7 for c in CLASSES}, "dx": dx or ["nv"] * len(images)})
    if lesions:
        frame["lesion_id"] = lesions
    return frame


def test_compare_inputs_that_cannot_be_paired():
    with pytest.raises(UserError, match=r"^runs/a.csv: image x is listed twice$"):
        checked_predictions(predictions(["x", "x"], lesions=["1", "1"]), "runs/a.csv")
    a = checked_predictions(predictions(["x", "y"], lesions=["1", "2"]), "A")
    b = checked_predictions(predictions(["x", "y"], dx=["nv", "mel"], lesions=["1", "2"]), "B")
    with pytest.raises(UserError, match=r"^A and B disagree on the dx of image y: they come from different metadata$"):
        check_same_test_set(a, b, "A", "B")
    with pytest.raises(UserError, match=r"^runs/bad.csv is not a readable CSV file: "):
        _read_csv('image,MEL\n"x,1\n', "runs/bad.csv")  # an unclosed quote


def test_a_run_whose_outputs_are_not_here_says_how_to_get_them(tmp_path):
    with pytest.raises(UserError, match=re.escape("workspace has no models/model.pt: `dvc pull` it, or run `dvc repro`")):
        Run("workspace", str(tmp_path)).local_file(CHECKPOINT)
    assert pull_hint("seed1") == ("`dvc exp pull origin seed1` (an experiment) or `dvc pull` at it (a commit), "
                                  "or re-run its failed stage")


def test_recipe_lists_with_an_empty_or_repeated_run():
    assert parse_recipe("a-0, a-1") == ["a-0", "a-1"]
    with pytest.raises(UserError, match=re.escape("'a-0,,a-1': an empty run name in the comma-separated list")):
        parse_recipe("a-0,,a-1")
    with pytest.raises(UserError, match=re.escape("'a-0,a-0' names a run twice: a recipe's runs must be "
                                                  "different runs (seeds)")):
        parse_recipe("a-0,a-0")
