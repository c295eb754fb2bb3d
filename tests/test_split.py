import hashlib
import json
import subprocess
import sys

import pandas as pd
import pytest

from hmnist.config import CLASSES, SplitConfig
from hmnist.errors import UserError
from hmnist.stages.split import split_lesions, split_stats, write_split
from synthetic import metadata_frame


@pytest.fixture(scope="module")
def meta() -> pd.DataFrame:
    # about HAM10000's structure at a tenth of its size: many lesions with 2-6 images
    return metadata_frame(750, images_per_lesion=(1, 6), seed=3)[["image_id", "lesion_id", "dx"]]


def test_no_lesion_in_two_splits(meta):
    split = split_lesions(meta, SplitConfig())
    assert split.groupby("lesion_id")["split"].nunique().max() == 1
    assert (meta.groupby("lesion_id").size() > 1).sum() > 100  # the grouping is really exercised
    assert len(split) == len(meta) and split["image_id"].is_unique


def test_every_class_in_every_split_near_target(meta):
    split = split_lesions(meta, SplitConfig(val=0.15, test=0.15))
    stats = split_stats(split)
    for name, target in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(stats[name]["fraction"] - target) < 0.02
        for dx in CLASSES:
            assert stats[name]["per_class"][dx] > 0, (name, dx)
    # stratified: each split's class mix is within 2 points of the whole
    whole = meta["dx"].value_counts(normalize=True)
    for name in ("train", "val", "test"):
        share = split[split["split"] == name]["dx"].value_counts(normalize=True)
        assert (share - whole).abs().max() < 0.02


def test_deterministic_and_seeded(meta, tmp_path):
    digests = []
    for i, frame in enumerate((meta, meta.sample(frac=1, random_state=1))):  # row order must not matter
        out = tmp_path / f"{i}.csv"
        write_split(split_lesions(frame, SplitConfig(seed=7)), out, tmp_path / f"{i}.json")
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    other = split_lesions(meta, SplitConfig(seed=8))
    assert not other["split"].equals(split_lesions(meta, SplitConfig(seed=7))["split"])


def test_output_format(meta, tmp_path):
    write_split(split_lesions(meta, SplitConfig()), tmp_path / "split.csv", tmp_path / "split.json")
    text = (tmp_path / "split.csv").read_bytes()
    assert text.startswith(b"image_id,lesion_id,dx,split\n") and b"\r" not in text
    stats = json.loads((tmp_path / "split.json").read_text())
    assert sum(stats[s]["images"] for s in ("train", "val", "test")) == len(meta)


def test_mixed_dx_lesion_rejected(meta):
    bad = meta.copy()
    lesion = bad["lesion_id"].value_counts().index[0]
    bad.loc[bad["lesion_id"] == lesion, "dx"] = ["mel", "nv"] + ["mel"] * (int((bad["lesion_id"] == lesion).sum()) - 2)
    with pytest.raises(UserError, match=lesion):
        split_lesions(bad, SplitConfig())


def test_stage_needs_prepare(tmp_path):
    from conftest import REPO
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = subprocess.run([sys.executable, "-m", "hmnist.stages.split"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: data/prepared/index.csv not found")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_fold_split_never_trains_a_fold_on_its_own_validation_images(meta, k):
    from hmnist.data import fold_split
    from hmnist.stages.split import assign_folds

    split = split_lesions(meta, SplitConfig())
    folds = assign_folds(split, k, seed=0)
    non_test = set(split.loc[split["split"] != "test", "image_id"])
    held_out = set()
    for fold in range(k):
        seen = fold_split(split, folds, fold)
        by_split = {name: set(seen.loc[seen["split"] == name, "image_id"]) for name in ("train", "val", "test")}
        assert by_split["val"] == set(folds.loc[folds["fold"] == fold, "image_id"])
        assert not by_split["val"] & by_split["train"]
        assert by_split["train"] | by_split["val"] == non_test  # nothing lost, nothing from the test split
        assert by_split["test"] == set(split.loc[split["split"] == "test", "image_id"])
        lesions = seen.groupby("lesion_id")["split"].nunique()
        assert lesions.max() == 1  # no lesion's photos on both sides
        held_out |= by_split["val"]
    assert held_out == (non_test if k > 1 else set(split.loc[split["split"] == "val", "image_id"]))
    if k == 1:  # one fold: the split itself
        assert fold_split(split, folds, 0)["split"].tolist() == split["split"].tolist()
