"""Stage prepare: decode every HAM10000 JPEG once into a uint8 array.

    python -m hmnist.prepare    (params: prepare.size, prepare.workers)

Reads data/raw/skin-cancer-mnist-ham10000.zip in place (no unpacking) and writes
data/prepared/images.npy, an N x size x size x 3 uint8 RGB array, and data/prepared/index.csv
(image_id, lesion_id, dx, label), whose row i describes images[i], sorted by image_id. Training
and evaluation read only these: no JPEG is decoded twice. Each image goes through
`data.decode_image`, which `predict` uses too, so its pixels match the ones the model was
evaluated on.
"""
from __future__ import annotations

import csv
import io
import multiprocessing
import os
import signal
import zipfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from hmnist.config import CLASSES, load_params
from hmnist.data import ARCHIVE, IMAGES_FILE, INDEX_FILE, PREPARED, decode_image
from hmnist.errors import UserError, cli

METADATA = "HAM10000_metadata.csv"
COLUMNS = ("image_id", "lesion_id", "dx")  # the metadata columns this stage reads
# The Kaggle zip holds every image twice: in these folders and in lower-case copies of them.
# The upper-case ones are the dataset's own names, so they win; the copies are a fallback.
IMAGE_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
# Images per pool task: big enough that the per-task cost (pickling the member names, a
# round trip to the worker) vanishes, small enough that both workers finish together and
# the progress bar moves.
CHUNK = 16


def read_metadata(archive: zipfile.ZipFile) -> list[dict]:
    """The metadata rows (image_id, lesion_id, dx, label), sorted by image_id, checked."""
    name = _find_metadata(archive)
    try:
        text = archive.read(name).decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            has = ", ".join(header) if header else "nothing: the file is empty"
            raise UserError(f"{METADATA} lacks column(s) {', '.join(missing)}: it needs "
                            f"{', '.join(COLUMNS)} (has {has})")
        rows = [{c: (row[c] or "").strip() for c in COLUMNS} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{METADATA} is not a readable CSV file: {e}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise UserError(f"cannot read {METADATA} from the archive ({e}): download it again") from None
    if not rows:
        raise UserError(f"{METADATA} lists no images")
    if any(not row["image_id"] for row in rows):
        line = next(i for i, row in enumerate(rows, start=2) if not row["image_id"])
        raise UserError(f"{METADATA} line {line} has no image_id")

    repeated = sorted(i for i, n in Counter(r["image_id"] for r in rows).items() if n > 1)
    if repeated:
        raise UserError(f"{METADATA} lists {len(repeated)} image_id(s) more than once: {_some(repeated)}")
    unknown = sorted({r["dx"] for r in rows} - set(CLASSES))
    if unknown:
        example = next(r["image_id"] for r in rows if r["dx"] == unknown[0])
        raise UserError(f"{METADATA} has unknown dx label(s) {', '.join(map(repr, unknown))} "
                        f"(e.g. image {example}); known: {', '.join(CLASSES)}")
    for row in rows:
        row["label"] = CLASSES.index(row["dx"])
    return sorted(rows, key=lambda r: r["image_id"])


def find_members(names: list[str], image_ids: list[str]) -> list[str]:
    """The archive member of each image id: upper-case folders first, lower-case copies else."""
    upper = {f.lower(): f for f in IMAGE_FOLDERS}
    found: dict[str, str] = {}
    fallback: dict[str, str] = {}
    for name in names:
        path = PurePosixPath(name)
        folder = path.parent.name
        if folder.lower() not in upper or path.suffix.lower() != ".jpg":
            continue
        table = found if folder == upper[folder.lower()] else fallback
        table.setdefault(path.stem, name)
    members = [found.get(i) or fallback.get(i) for i in image_ids]
    absent = [i for i, member in zip(image_ids, members) if member is None]
    if absent:
        raise UserError(f"{len(absent)} image(s) listed in {METADATA} are not in the archive "
                        f"(looked in {' and '.join(f + '/' for f in IMAGE_FOLDERS)}): {_some(absent)}")
    return members


def prepare(archive_path: str | Path, out_dir: str | Path, size: int = 224, workers: int = 0,
            progress: bool | None = None) -> list[dict]:
    """Decode every image in the Kaggle zip into out_dir/images.npy and out_dir/index.csv.

    Returns the index rows. On any error, or Ctrl-C, out_dir holds neither file: the previous
    outputs are removed first, and the new ones are written under temporary names and renamed
    only once complete, so DVC never caches half a cache. `progress=None` shows a progress bar
    only on a terminal.
    """
    archive_path, out_dir = Path(archive_path), Path(out_dir)
    images_path, index_path = out_dir / IMAGES_FILE, out_dir / INDEX_FILE
    # The outputs exist only if the last run succeeded: a failed run must not leave an older
    # cache (another size, another archive) looking current.
    images_path.unlink(missing_ok=True)
    index_path.unlink(missing_ok=True)
    with _open_archive(archive_path) as archive:
        rows = read_metadata(archive)
        members = find_members(archive.namelist(), [r["image_id"] for r in rows])

    out_dir.mkdir(parents=True, exist_ok=True)
    images_tmp, index_tmp = out_dir / (IMAGES_FILE + ".partial"), out_dir / (INDEX_FILE + ".partial")
    try:
        np.lib.format.open_memmap(images_tmp, mode="w+", dtype=np.uint8, shape=(len(rows), size, size, 3)).flush()
        tasks = [(start, [(r["image_id"], m) for r, m in zip(rows[start:start + CHUNK], members[start:start + CHUNK])])
                 for start in range(0, len(rows), CHUNK)]
        _decode_all(tasks, len(rows), archive_path, images_tmp, size, workers, progress)
        with open(index_tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "label"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(images_tmp, images_path)
        os.replace(index_tmp, index_path)
    finally:
        images_tmp.unlink(missing_ok=True)
        index_tmp.unlink(missing_ok=True)
    return rows


def _decode_all(tasks, total, archive_path, images_path, size, workers, progress) -> None:
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    bar = tqdm(total=total, unit="img", desc="prepare", disable=None if progress is None else not progress)
    with bar:
        if workers == 1:  # in this process: the same code, without a pool's start-up
            _start_worker(archive_path, images_path, size, ignore_sigint=False)
            try:
                for count, error in map(_decode_chunk, tasks):
                    _raise_if(error)
                    bar.update(count)
            finally:
                _stop_worker()
            return
        # Each worker opens the zip and the output itself and writes its images straight into
        # the shared memory-mapped file: nothing but member names and counts crosses processes
        # (measured faster than returning arrays; see BENCHMARKS.md).
        with multiprocessing.Pool(workers, _start_worker, (archive_path, images_path, size, True)) as pool:
            for count, error in pool.imap_unordered(_decode_chunk, tasks):
                _raise_if(error)  # leaving the with-block terminates the other workers
                bar.update(count)


# One worker's open archive and output array; set by _start_worker in each process.
_worker: dict = {}


def _start_worker(archive_path: Path, images_path: Path, size: int, ignore_sigint: bool) -> None:
    if ignore_sigint:
        # Ctrl-C reaches every process of the terminal; the parent alone handles it (it stops
        # the pool and removes the partial outputs), instead of one traceback per worker.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(archive=zipfile.ZipFile(archive_path), archive_path=archive_path,
                   images=np.load(images_path, mmap_mode="r+"), size=size)


def _stop_worker() -> None:
    _worker["archive"].close()
    _worker.clear()


def _decode_chunk(task: tuple[int, list[tuple[str, str]]]) -> tuple[int, str | None]:
    """Decode one chunk into the output; returns (images done, error message or None)."""
    start, items = task
    archive, images, size = _worker["archive"], _worker["images"], _worker["size"]
    for offset, (image_id, member) in enumerate(items):
        try:
            data = archive.read(member)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            return offset, f"cannot read {member} (image {image_id}) from {_worker['archive_path']}: {e}; download it again"
        try:
            images[start + offset] = decode_image(data, size)
        except ValueError as e:
            return offset, f"cannot decode image {image_id} ({member} in {_worker['archive_path']}): {e}"
    return len(items), None


def _raise_if(error: str | None) -> None:
    if error is not None:
        raise UserError(error)


def _open_archive(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise UserError(f"{path} not found: run the download stage first (dvc repro download)")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            starts_like_zip = f.read(4) == b"PK\x03\x04"
        if starts_like_zip:  # the table of contents sits at the end: a cut-off download loses it
            raise UserError(f"{path} is truncated or damaged (no zip directory at its end): download it again") from None
        raise UserError(f"{path} is not a zip archive: expected the Kaggle download of HAM10000") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _find_metadata(archive: zipfile.ZipFile) -> str:
    names = archive.namelist()
    if METADATA in names:
        return METADATA
    nested = sorted((n for n in names if PurePosixPath(n).name == METADATA), key=len)
    if not nested:
        raise UserError(f"{METADATA} not found in the archive: is it the HAM10000 download?")
    return nested[0]


def _some(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


@cli
def main() -> None:
    params = load_params()
    rows = prepare(ARCHIVE, PREPARED, params.prepare.size, params.prepare.workers)
    print(f"prepared {len(rows)} images ({params.prepare.size}x{params.prepare.size}) in {PREPARED}")


if __name__ == "__main__":
    main()
