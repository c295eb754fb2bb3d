"""The pipeline's files, and reading them: where each stage writes, decoding one image, the
prepared cache, the rows of a split.

Stages meet only through these files (DVC tracks them), so their paths live here, once.
"""
from __future__ import annotations

import io
from pathlib import Path
import contextlib
import os
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
from PIL import Image

from hmnist.errors import UserError, first_line

if TYPE_CHECKING:
    import pandas as pd

# check_params -> split: a fixed text, written once params.yaml passed its checks (see stages/check_params.py)
PARAMS_CHECKED = Path("data/params_checked.txt")
# download -> prepare
ARCHIVE = Path("data/raw/skin-cancer-mnist-ham10000.zip")
# the Kaggle zip's table of images (image_id, lesion_id, dx, ...), at its top level
METADATA = "HAM10000_metadata.csv"
# prepare -> split, train, evaluate: images.npy is N x size x size x 3 uint8 RGB, index.csv's
# row i (image_id, lesion_id, dx, label, then the patient metadata age, sex, localization)
# describes images[i], sorted by image_id
PREPARED = Path("data/prepared")
IMAGES_FILE, INDEX_FILE = "images.npy", "index.csv"
# split -> train, evaluate
SPLIT = Path("data/split.csv")
SPLIT_STATS = Path("metrics/split.json")
# the non-test images' folds (image_id, lesion_id, dx, fold): fold k's model picks its epoch
# on the images of fold k and trains on the others; -1 = train only (cv.folds 1: the train split)
FOLDS = Path("data/folds.csv")
# train -> evaluate, predict (fold 0; fold k >= 1 writes beside them, see fold_paths)
CHECKPOINT = Path("models/model.pt")
RESUME_DIR = Path("models/.resume")  # the state of an unfinished train run
LIVE_DIR = Path("dvclive")
CURVES = Path("plots/training_curves.png")
# evaluate
METRICS = Path("metrics/metrics.json")
PLOTS = Path("plots")
PREDICTIONS = Path("predictions/test.csv")
CALIBRATED_PREDICTIONS = PREDICTIONS.with_name("test_calibrated.csv")
# every non-test image predicted by the fold that held it out (cv.folds >= 2; header only
# otherwise): ~5,000 images where the test split has ~900, for `hmnist compare --oof`
OOF_PREDICTIONS = PREDICTIONS.with_name("oof.csv")


class FoldPaths(NamedTuple):
    checkpoint: Path
    live: Path
    curves: Path
    resume: Path


def fold_paths(fold: int) -> FoldPaths:
    """Where fold `fold`'s train stage writes. Fold 0 is the train stage itself, at the paths of a
    run without cross-validation; fold k >= 1 (stage train_fold@k) writes beside them."""
    if fold == 0:
        return FoldPaths(CHECKPOINT, LIVE_DIR, CURVES, RESUME_DIR)
    return FoldPaths(CHECKPOINT.with_name(f"fold{fold}.pt"), LIVE_DIR / f"fold{fold}",
                     CURVES.with_name(f"training_curves_fold{fold}.png"), RESUME_DIR / f"fold{fold}")


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
            rgb = _as_rgb(image)
            # np.array, not asarray: a writable array the caller owns
            return np.array(rgb.resize((size, size), RESAMPLE))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and "image file is truncated" are OSErrors
        raise ValueError(str(e) or type(e).__name__) from None


def _as_rgb(image: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB, on its own brightness scale.

    PIL's convert("RGB") clips every value of a 16-bit greyscale image (modes I;16, I;16B, and I
    as older Pillow opens a 16-bit PNG) to 255: all but the darkest scanner or medical export
    would turn white, and the model would answer for a blank image without a word. Those are
    scaled by 255/65535 instead. A 32-bit integer or floating-point image (a TIFF under a .png
    name: PIL goes by the content) has no fixed range to scale from, so it is refused rather
    than guessed. Modes with alpha (LA, PA, RGBA) and palettes keep their colours; the alpha
    is dropped, as HAM10000's own images have none. ValueError for a mode refused.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or (mode == "I" and image.format == "PNG"):  # a PNG holds at most 16 bits
        grey = np.asarray(image).astype(np.int64)
        if grey.max(initial=0) > 65535 or grey.min(initial=0) < 0:  # cannot happen for these modes: a guard
            raise ValueError(f"a {mode} image with values outside 0-65535")
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        kind = "a 32-bit integer" if mode == "I" else "a floating-point"
        raise ValueError(f"{kind} image (PIL mode {mode}) has no fixed brightness range to scale to 8 bits: "
                         "save it as an 8- or 16-bit PNG, or a JPEG")
    return image.convert("RGB")


def load_prepared(folder: str | Path = PREPARED) -> tuple[np.ndarray, pd.DataFrame]:
    """(images, index): images.npy memory-mapped read-only, and index.csv as a DataFrame."""
    # pandas is imported here, not at the top: the prepare stage imports this module and
    # would pay for pandas at start-up without using it
    import pandas as pd

    folder = Path(folder)
    try:
        index = pd.read_csv(folder / INDEX_FILE, dtype={"image_id": str, "lesion_id": str, "dx": str, "label": int})
        rows = check_cache_file(folder / IMAGES_FILE)
    except FileNotFoundError as e:
        raise UserError(f"{e.filename} not found: run the prepare stage first (dvc repro prepare)") from None
    if rows != len(index):
        raise UserError(f"{folder}: {IMAGES_FILE} holds {rows} images but {INDEX_FILE} lists {len(index)}: "
                        "run the prepare stage again")
    return np.load(folder / IMAGES_FILE, mmap_mode="r"), index


def check_cache_file(path: Path) -> int:
    """The number of images in the prepared cache at `path`, after checking that its header reads
    as N x size x size x 3 uint8 and that the file is as long as that header says.

    np.load memory-maps a truncated file with numpy's "mmap length is greater than file size"
    traceback, and a file cut to the length of a smaller shape would read as wrong pixels. With
    DVC's linked cache (.dvc/config: cache.type hardlink) the file in the workspace *is* the
    cache object, so an edit in place damages both, and DVC, which trusts its cache, links the
    damaged file back on every checkout or `dvc repro -f`. Checking the length costs one stat;
    hashing the whole file to catch damage that keeps its length would cost seconds per stage.
    """
    try:
        with open(path, "rb") as file:
            try:
                version = np.lib.format.read_magic(file)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(file)
            except ValueError as e:
                raise UserError(damaged_cache(path, f"its .npy header is unreadable: {first_line(e)}")) from None
            length, needed = os.fstat(file.fileno()).st_size, file.tell() + int(np.prod(shape)) * dtype.itemsize
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied") from None
    if dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise UserError(damaged_cache(path, f"its header says {dtype} {'x'.join(map(str, shape))}, "
                                            "not N x size x size x 3 uint8"))
    if length != needed:
        raise UserError(damaged_cache(path, f"{length:,} bytes where its header's {'x'.join(map(str, shape))} "
                                            f"images need {needed:,}"))
    return int(shape[0])


def damaged_cache(path: Path, what: str) -> str:
    """The one-line error for a damaged cache file: what is wrong, and the recovery, naming the
    DVC cache object to delete with it when dvc.lock (in the project root, where stages run)
    records one. Deleting only the workspace file is not enough: DVC would link the damaged
    object back (docs/data.md, "A damaged prepared cache")."""
    import yaml

    cache_object = None
    with contextlib.suppress(OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, StopIteration):
        outs = yaml.safe_load(Path("dvc.lock").read_text())["stages"]["prepare"]["outs"]
        md5 = next(out["md5"] for out in outs if Path(out["path"]) == path)
        cache_object = Path(".dvc/cache/files/md5", md5[:2], md5[2:])
    if cache_object is not None:
        return (f"{path} is damaged ({what}), and so is DVC's cache object when linked to it (this project's "
                f"cache.type): rm -f {path} {cache_object}, then run dvc repro prepare")
    return (f"{path} is damaged ({what}): delete it, and DVC's cache object linked to it if any "
            f"(docs/data.md#a-damaged-prepared-cache), then run dvc repro prepare")


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write(partial)` under a temporary name beside `path`, renamed to `path` when complete, so
    no reader (DVC included) ever sees half a file. An OSError (a folder that cannot be made, a
    full disk, permissions) is a UserError naming `path`, and no partial file is left."""
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        os.replace(partial, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # when the folder could not be made, neither can this: e is the cause
            partial.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or first_line(e)}") from None


def check_writable(path: Path, example: str) -> None:
    """Fail now, in one line, if write_whole could not write `path`: a command checks its output
    before minutes of inference, not after. `example`: a file name to suggest when `path` is a
    folder. Creates nothing: the test file is an unnamed temporary (O_TMPFILE where supported)
    in the deepest existing folder on the way, since write_whole makes the missing ones."""
    import errno
    import tempfile

    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder (give a file in it, e.g. {path / example})")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: {folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        # /proc and the like refuse to create files with ENOENT, a reason that would mislead
        reason = "no files can be made there" if e.errno == errno.ENOENT else (e.strerror or first_line(e))
        raise UserError(f"cannot write {path}: cannot create a file in {folder} ({reason})") from None


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


def load_folds(path: str | Path = FOLDS) -> pd.DataFrame:
    """data/folds.csv (image_id, lesion_id, dx, fold)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run `dvc repro split` first")
    return pd.read_csv(path, dtype={"image_id": str, "lesion_id": str, "dx": str, "fold": int})


def fold_split(split: pd.DataFrame, folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    """`split` as fold `fold` sees it: its fold's images are "val", the other non-test images
    "train", the test images stay "test". With cv.folds 1 this is `split` itself."""
    if set(folds["image_id"]) != set(split.loc[split["split"] != "test", "image_id"]):
        raise UserError(f"{FOLDS} does not match {SPLIT}: run `dvc repro split`")
    if fold not in set(folds["fold"]):
        raise UserError(f"{FOLDS} has no fold {fold}: run `dvc repro split` (with cv.folds above {fold})")
    fold_of = split["image_id"].map(dict(zip(folds["image_id"], folds["fold"])))
    relabelled = split.copy()
    relabelled["split"] = split["split"].where(split["split"] == "test", (fold_of == fold).map({True: "val", False: "train"}))
    return relabelled
