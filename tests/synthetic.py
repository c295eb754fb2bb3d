"""Synthetic HAM10000 look-alikes in the Kaggle layout, for tests and benchmarks.

Test data, so it lives beside the tests, not in the package a user installs: tests import it
as `synthetic` (pytest puts tests/ on sys.path, as for conftest), and the benchmarks put tests/
on sys.path themselves rather than keep a second copy.

The real dataset (CC BY-NC-SA) is never copied into the repo. This writes an archive with
the same structure: `HAM10000_metadata.csv`, images split over `HAM10000_images_part_1/`
and `_part_2/` at the real id boundary, the lower-case duplicate folders, `hmnist_*.csv`
files, several near-identical images per lesion, and all seven classes. Each class draws
its lesion with its own colour and shape, so a model can actually learn the task and a
test can tell a working pipeline from a broken one.

    python tests/synthetic.py OUT.zip --lesions 500 --size 600x450
"""
from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from hmnist.config import CLASSES
from hmnist.data import METADATA

FIRST_IMAGE_ID = 24306  # ISIC_0024306, the first HAM10000 image
PART_1_LAST_ID = 29305  # ISIC_0029305 is the last image in HAM10000_images_part_1
# Roughly the real class mix (nv is 67%), floored so that every class has lesions in every split.
CLASS_SHARE = {"mel": 0.11, "nv": 0.62, "bcc": 0.06, "akiec": 0.04, "bkl": 0.11, "df": 0.03, "vasc": 0.03}
# (R, G, B) of each class's lesion: distinct enough to learn in an epoch or two.
CLASS_COLOUR = {
    "mel": (40, 25, 20), "nv": (120, 70, 40), "bcc": (200, 120, 150), "akiec": (190, 80, 60),
    "bkl": (150, 120, 80), "df": (110, 60, 90), "vasc": (170, 20, 40),
}


def metadata_frame(n_lesions: int, images_per_lesion: tuple[int, int] = (1, 3), seed: int = 0) -> pd.DataFrame:
    """A metadata table with HAM10000's columns and lesion structure."""
    rng = np.random.default_rng(seed)
    min_lesions = 6  # per class: enough for train, val and test to each get one
    if n_lesions < min_lesions * len(CLASSES):
        raise ValueError(f"need at least {min_lesions * len(CLASSES)} lesions for all classes in all splits")
    counts = {c: max(min_lesions, int(round(share * n_lesions))) for c, share in CLASS_SHARE.items()}
    counts["nv"] += n_lesions - sum(counts.values())
    dx = rng.permutation(np.repeat(list(counts), list(counts.values())))
    rows, image_id = [], FIRST_IMAGE_ID
    lesion_numbers = rng.choice(10_000, size=n_lesions, replace=False)
    for number, label in zip(lesion_numbers, dx):
        for _ in range(rng.integers(images_per_lesion[0], images_per_lesion[1] + 1)):
            rows.append({
                "lesion_id": f"HAM_{number:07d}",
                "image_id": f"ISIC_{image_id:07d}",
                "dx": label,
                "dx_type": rng.choice(["histo", "follow_up", "consensus", "confocal"]),
                "age": float(rng.integers(5, 17) * 5),
                "sex": rng.choice(["male", "female"]),
                "localization": rng.choice(["back", "trunk", "face", "lower extremity", "abdomen"]),
            })
            image_id += 1
    return pd.DataFrame(rows)


def lesion_image(dx: str, lesion_id: str, image_id: str, size: tuple[int, int]) -> Image.Image:
    """A skin-coloured background with one class-coloured blob; images of a lesion nearly match."""
    width, height = size
    lesion_rng = np.random.default_rng(int(lesion_id[4:]))
    image_rng = np.random.default_rng(int(image_id[5:]))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx = width * (0.5 + 0.1 * lesion_rng.uniform(-1, 1) + 0.02 * image_rng.uniform(-1, 1))
    cy = height * (0.5 + 0.1 * lesion_rng.uniform(-1, 1) + 0.02 * image_rng.uniform(-1, 1))
    # shape carries class information too: vasc and df are small and round, mel irregular and big
    radius = min(width, height) * {"mel": 0.33, "vasc": 0.15, "df": 0.18}.get(dx, 0.25)
    radius *= lesion_rng.uniform(0.8, 1.2)
    stretch = lesion_rng.uniform(0.7, 1.3)
    r = np.sqrt(((xx - cx) / stretch) ** 2 + ((yy - cy) * stretch) ** 2)
    if dx == "mel":
        angle = np.arctan2(yy - cy, xx - cx)
        r = r * (1 + 0.25 * np.sin(5 * angle + lesion_rng.uniform(0, 6)))
    inside = np.clip((radius - r) / (0.1 * radius), 0, 1)[..., None]
    skin = np.array([225, 180, 160], np.float32) + lesion_rng.normal(0, 12, 3)
    colour = np.array(CLASS_COLOUR[dx], np.float32) + lesion_rng.normal(0, 10, 3)
    pixels = skin * (1 - inside) + colour * inside
    pixels += image_rng.normal(0, 6, (height, width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _render(task: tuple[str, str, str, tuple[int, int]]) -> bytes:
    dx, lesion_id, image_id, size = task
    return _jpeg(lesion_image(dx, lesion_id, image_id, size))


def image_folder(image_id: str) -> str:
    return "HAM10000_images_part_1" if int(image_id[5:]) <= PART_1_LAST_ID else "HAM10000_images_part_2"


def write_dataset(
    dest: str | Path,
    n_lesions: int = 60,
    images_per_lesion: tuple[int, int] = (1, 3),
    size: tuple[int, int] = (60, 45),
    seed: int = 0,
    duplicates: bool = True,
    workers: int = 1,
) -> pd.DataFrame:
    """Write the dataset to `dest`: a zip when it ends in .zip, else a folder. Returns the metadata."""
    dest = Path(dest)
    meta = metadata_frame(n_lesions, images_per_lesion, seed)
    files: dict[str, bytes] = {METADATA: meta.to_csv(index=False).encode()}
    tasks = [(row.dx, row.lesion_id, row.image_id, size) for row in meta.itertuples()]
    if workers > 1:  # full-size benchmark sets: 10,015 600x450 JPEGs take minutes on one core
        from multiprocessing import Pool
        with Pool(workers) as pool:
            jpegs = pool.map(_render, tasks, chunksize=32)
    else:
        jpegs = [_render(task) for task in tasks]
    for row, data in zip(meta.itertuples(), jpegs):
        folder = image_folder(row.image_id)
        files[f"{folder}/{row.image_id}.jpg"] = data
        if duplicates:  # the Kaggle zip ships every image twice, in lower-case folders too
            files[f"{folder.lower()}/{row.image_id}.jpg"] = data
    files["hmnist_8_8_L.csv"] = b"pixel0000,label\n0,0\n"
    files["hmnist_28_28_RGB.csv"] = b"pixel0000,label\n0,0\n"
    if dest.suffix == ".zip":
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
    else:
        for name, data in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="output .zip, or a folder")
    parser.add_argument("--lesions", type=int, default=60)
    parser.add_argument("--size", default="60x45", help="WIDTHxHEIGHT of each JPEG (Kaggle's: 600x450)")
    parser.add_argument("--images-per-lesion", default="1-3", help="MIN-MAX")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes rendering images")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    low, high = (int(v) for v in args.images_per_lesion.split("-"))
    meta = write_dataset(args.dest, args.lesions, (low, high), (width, height), args.seed, workers=args.workers)
    print(f"wrote {len(meta)} images of {args.lesions} lesions to {args.dest}")


if __name__ == "__main__":
    main()
