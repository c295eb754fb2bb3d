"""Stage `split`: train/val/test grouped by lesion, stratified by class.

HAM10000 has 10,015 images of 7,470 lesions; 1,956 lesions have 2 to 6 near-identical
images. Splitting images at random puts copies of one lesion on both sides and inflates
test accuracy (published: about 7 points), so whole lesions are assigned to a split.
A lesion has a single diagnosis, so stratifying lesions within each class keeps every
class's proportions close to the targets while no lesion crosses a split.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hmnist.config import CLASSES, SplitConfig, load_params
from hmnist.data import FOLDS, INDEX_FILE, PREPARED, SPLIT, SPLIT_STATS
from hmnist.errors import UserError, cli

SPLITS = ("train", "val", "test")


def split_lesions(index: pd.DataFrame, config: SplitConfig) -> pd.DataFrame:
    """Assign every image a split; returns image_id, lesion_id, dx, split sorted by image_id."""
    mixed = index.groupby("lesion_id")["dx"].nunique()
    if (mixed > 1).any():
        names = ", ".join(mixed[mixed > 1].index[:5])
        raise UserError(f"lesions with more than one dx cannot be split by lesion: {names}")

    fractions = {"train": 1 - config.val - config.test, "val": config.val, "test": config.test}
    # One generator walked in a fixed order (classes, then sorted lesion ids): PCG64 gives the
    # same stream on every platform, so the same seed gives the same split everywhere.
    rng = np.random.default_rng(config.seed)
    sizes = index.groupby("lesion_id").size()
    lesion_dx = index.groupby("lesion_id")["dx"].first()
    assignment: dict[str, str] = {}
    for dx in CLASSES:
        lesions = np.sort(lesion_dx.index[lesion_dx == dx].to_numpy())
        if len(lesions) == 0:
            continue
        lesions = lesions[rng.permutation(len(lesions))]
        total = sizes[lesions].sum()
        counts = dict.fromkeys(SPLITS, 0)
        for i, lesion in enumerate(lesions):
            if i < len(SPLITS) and len(lesions) >= len(SPLITS):
                # seed each split with one lesion so that every class is in every split
                split = ("test", "val", "train")[i]
            else:
                # the split furthest below its target image count takes the next lesion
                split = max(SPLITS, key=lambda s: fractions[s] * total - counts[s])
            assignment[lesion] = split
            counts[split] += sizes[lesion]

    out = index[["image_id", "lesion_id", "dx"]].copy()
    out["split"] = out["lesion_id"].map(assignment)
    return out.sort_values("image_id", kind="stable").reset_index(drop=True)


def assign_folds(split: pd.DataFrame, folds: int, seed: int) -> pd.DataFrame:
    """The non-test images' folds (image_id, lesion_id, dx, fold), sorted by image_id.

    folds 1: the val split is fold 0 and the train split is -1 (train only), so fold 0 is the
    run without cross-validation. folds K >= 2: the train and val images are cut into K folds
    of whole lesions, stratified by class like the split, and the test split is left as it is.
    """
    rest = split[split["split"] != "test"][["image_id", "lesion_id", "dx"]].copy()
    if folds == 1:
        rest["fold"] = np.where(split.loc[rest.index, "split"] == "val", 0, -1)
        return rest.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    sizes = rest.groupby("lesion_id").size()
    lesion_dx = rest.groupby("lesion_id")["dx"].first()
    assignment: dict[str, int] = {}
    for dx in CLASSES:
        lesions = np.sort(lesion_dx.index[lesion_dx == dx].to_numpy())
        lesions = lesions[rng.permutation(len(lesions))]
        counts = np.zeros(folds, dtype=int)
        for lesion in lesions:
            fold = int(counts.argmin())  # the fold with the fewest images of this class so far
            assignment[lesion] = fold
            counts[fold] += sizes[lesion]
    rest["fold"] = rest["lesion_id"].map(assignment).astype(int)
    return rest.reset_index(drop=True)


def split_stats(split: pd.DataFrame) -> dict:
    """Counts per split and per class, and each split's share of each class."""
    stats: dict = {}
    for name in SPLITS:
        part = split[split["split"] == name]
        per_class = part["dx"].value_counts()
        stats[name] = {
            "images": int(len(part)),
            "lesions": int(part["lesion_id"].nunique()),
            "fraction": round(len(part) / len(split), 4),
            "per_class": {dx: int(per_class.get(dx, 0)) for dx in CLASSES},
        }
    return stats


def write_split(split: pd.DataFrame, out: Path, stats_out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    stats_out.parent.mkdir(parents=True, exist_ok=True)
    # explicit line ending and column order: byte-identical on every OS
    split.to_csv(out, index=False, lineterminator="\n")
    stats_out.write_text(json.dumps(split_stats(split), indent=2) + "\n")


@cli
def main() -> None:
    params = load_params()
    index_path = PREPARED / INDEX_FILE
    if not index_path.exists():
        raise UserError(f"{index_path} not found: run `dvc repro prepare` first")
    index = pd.read_csv(index_path, dtype=str)
    split = split_lesions(index, params.split)
    write_split(split, SPLIT, SPLIT_STATS)
    # the split above does not depend on cv.folds: the test images are the same for any K
    folds = assign_folds(split, params.cv.folds, params.split.seed)
    folds.to_csv(FOLDS, index=False, lineterminator="\n")
    stats = split_stats(split)
    print(", ".join(f"{s}: {stats[s]['images']} images ({stats[s]['lesions']} lesions)" for s in SPLITS))
    if params.cv.folds > 1:
        print(f"{params.cv.folds} folds of the train and val images: "
              f"{', '.join(str(n) for n in folds['fold'].value_counts().sort_index())} images")


if __name__ == "__main__":
    main()
