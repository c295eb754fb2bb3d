"""The pipeline's files, and reading them: where each stage writes, decoding one image, the
prepared cache, the rows of a split.

Stages meet only through these files (DVC tracks them), so their paths live here, once.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from hmnist.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

# download -> prepare
ARCHIVE = Path("data/raw/skin-cancer-mnist-ham10000.zip")
# prepare -> split, train, evaluate: images.npy is N x size x size x 3 uint8 RGB, index.csv's
# row i (image_id, lesion_id, dx, label) describes images[i], sorted by image_id
PREPARED = Path("data/prepared")
IMAGES_FILE, INDEX_FILE = "images.npy", "index.csv"
# split -> train, evaluate
SPLIT = Path("data/split.csv")
SPLIT_STATS = Path("metrics/split.json")
# train -> evaluate, predict
CHECKPOINT = Path("models/model.pt")
RESUME_DIR = Path("models/.resume")  # the state of an unfinished train run
LIVE_DIR = Path("dvclive")
CURVES = Path("plots/training_curves.png")
# evaluate
METRICS = Path("metrics/metrics.json")
PLOTS = Path("plots")
PREDICTIONS = Path("predictions/test.csv")

# PIL's resize filters widen with the reduction, so bilinear is antialiased. After draft() the
# reduction is mild; bilinear is as close to a full-size Lanczos reference as bicubic, and
# cheaper (the comparison is in BENCHMARKS.md, "prepare").
RESAMPLE = Image.Resampling.BILINEAR


def decode_image(data: bytes, size: int) -> np.ndarray:
    """One image file's bytes -> size x size x 3 uint8 RGB. Raises ValueError if undecodable.

    The whole image is resized to the square, squashing HAM10000's 4:3 frame instead of
    cropping its centre: lesions are not always centred, and a centre crop would cut off a
    quarter of the field of view, borders of large lesions included. Every model takes square
    input, and train, evaluate and predict all see the same squash, so the model learns it.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling) while the result stays
            # at least size x size: 600x450 decodes as 300x225 for size 224, and the resize
            # then reads a quarter of the pixels. A no-op for formats other than JPEG.
            image.draft("RGB", (size, size))
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            # np.array, not asarray: a writable array the caller owns
            return np.array(rgb.resize((size, size), RESAMPLE))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and "image file is truncated" are OSErrors
        raise ValueError(str(e) or type(e).__name__) from None


def load_prepared(folder: str | Path = PREPARED) -> tuple[np.ndarray, pd.DataFrame]:
    """(images, index): images.npy memory-mapped read-only, and index.csv as a DataFrame."""
    # pandas is imported here, not at the top: the prepare stage imports this module and
    # would pay for pandas at start-up without using it
    import pandas as pd

    folder = Path(folder)
    try:
        images = np.load(folder / IMAGES_FILE, mmap_mode="r")
        index = pd.read_csv(folder / INDEX_FILE, dtype={"image_id": str, "lesion_id": str, "dx": str, "label": int})
    except FileNotFoundError as e:
        raise UserError(f"{e.filename} not found: run the prepare stage first (dvc repro prepare)") from None
    if len(images) != len(index):
        raise UserError(f"{folder}: {IMAGES_FILE} holds {len(images)} images but {INDEX_FILE} lists {len(index)}: "
                        "run the prepare stage again")
    return images, index


def load_split(path: str | Path = SPLIT) -> pd.DataFrame:
    """data/split.csv (image_id, lesion_id, dx, split), every column as text."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run `dvc repro split` first")
    return pd.read_csv(path, dtype=str)


def split_rows(index: pd.DataFrame, split: pd.DataFrame, name: str) -> np.ndarray:
    """Row numbers in the prepared cache of the images in split `name`, in cache order."""
    if len(index) != len(split) or set(index["image_id"]) != set(split["image_id"]):
        raise UserError(f"{SPLIT} does not match {PREPARED / INDEX_FILE}: run `dvc repro split`")
    wanted = set(split.loc[split["split"] == name, "image_id"])
    return np.flatnonzero(index["image_id"].isin(wanted).to_numpy())
