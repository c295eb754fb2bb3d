"""Stage prepare: decode every HAM10000 JPEG once into a uint8 array.

    python -m hmnist.stages.prepare    (params: prepare.size, prepare.workers)

Reads data/raw/skin-cancer-mnist-ham10000.zip in place (no unpacking) and writes
data/prepared/images.npy, an N x size x size x 3 uint8 RGB array, and data/prepared/index.csv
(image_id, lesion_id, dx, label, age, sex, localization), whose row i describes images[i], sorted
by image_id; the patient metadata is copied as the archive has it (empty where it has none), for
the models that read it (fusion.py; dx_type is never copied). Training
and evaluation read only these: no JPEG is decoded twice. Each image goes through
`data.decode_image`, which `predict` uses too, so its pixels match the ones the model was
evaluated on.
"""
from __future__ import annotations

import csv
import errno
import io
import multiprocessing
import os
import shutil
import signal
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from hmnist.config import CLASS_INDEX, CLASSES, METADATA_FIELDS, load_params
from hmnist.data import ARCHIVE, IMAGES_FILE, INDEX_FILE, METADATA, PREPARED, decode_image
from hmnist.errors import UserError, cli

COLUMNS = ("image_id", "lesion_id", "dx")  # the metadata columns this stage needs
# and those it copies when present (empty when the file has none: only a metadata model needs them)
PATIENT_COLUMNS = METADATA_FIELDS
# The Kaggle zip holds every image twice: in these folders and in lower-case copies of them.
# The upper-case ones are the dataset's own names, so they win; the copies are a fallback.
IMAGE_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
# Images per pool task: big enough that the per-task cost (pickling the member names, a
# round trip to the worker) vanishes, small enough that both workers finish together and
# the progress bar moves.
CHUNK = 16


def read_metadata(archive: zipfile.ZipFile) -> list[dict]:
    """The metadata rows (image_id, lesion_id, dx, label, age, sex, localization), sorted by image_id, checked."""
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
        rows = [{c: (row.get(c) or "").strip() for c in (*COLUMNS, *PATIENT_COLUMNS)} for row in reader]
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
        row["label"] = CLASS_INDEX[row["dx"]]
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
        offset = _create_cache(images_tmp, (len(rows), size, size, 3))
        tasks = [(start, [(r["image_id"], m) for r, m in zip(rows[start:start + CHUNK], members[start:start + CHUNK])])
                 for start in range(0, len(rows), CHUNK)]
        _decode_all(tasks, len(rows), archive_path, images_tmp, offset, size, workers, progress)
        try:
            with open(index_tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "label", *PATIENT_COLUMNS], lineterminator="\n")
                writer.writeheader()
                writer.writerows(rows)
        except OSError as e:
            raise UserError(f"cannot write {index_tmp.with_suffix('')}: {e.strerror or e}") from None
        os.replace(images_tmp, images_path)
        os.replace(index_tmp, index_path)
    finally:
        images_tmp.unlink(missing_ok=True)
        index_tmp.unlink(missing_ok=True)
    return rows


def _create_cache(path: Path, shape: tuple[int, ...]) -> int:
    """An .npy file of `shape` uint8 with its whole size allocated on disk; returns where the
    pixels start. The workers fill it with plain writes at known offsets, never through a
    memory map: a write to a mapped page the disk has no room for kills the process with
    SIGBUS, no message, where a write() returns ENOSPC. Allocating first makes a full disk
    fail here, in a second, instead of after minutes of decoding."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    needed = header.tell() + int(np.prod(shape))
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise UserError(_no_space(path.parent, needed, free))
    try:
        with open(path, "wb") as f:
            f.write(header.getvalue())
            f.flush()
            try:
                os.posix_fallocate(f.fileno(), 0, needed)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                f.truncate(needed)  # a filesystem without allocation: a write may still say ENOSPC later
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(_no_space(path.parent, needed, shutil.disk_usage(path.parent).free)) from None
        raise UserError(f"cannot write {path.with_suffix('')}: {e.strerror or e}") from None
    return header.tell()


def _no_space(folder: Path, needed: int, free: int) -> str:
    return (f"no space left on device: the cache needs {needed / 1e6:.1f} MB in {folder}, "
            f"{max(free, 0) / 1e6:.1f} MB are free (a smaller prepare.size needs less)")


def _decode_all(tasks, total, archive_path, images_path, offset, size, workers, progress) -> None:
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    bar = tqdm(total=total, unit="img", desc="prepare", disable=None if progress is None else not progress)
    setup = (archive_path, images_path, offset, size)
    with bar:
        if workers == 1:  # in this process: the same code, without a pool's start-up
            _start_worker(*setup, ignore_sigint=False)
            try:
                for count, error in map(_decode_chunk, tasks):
                    _raise_if(error)
                    bar.update(count)
            finally:
                _stop_worker()
            return
        # Each worker opens the zip and the output itself and writes its images straight into
        # the file: nothing but member names and counts crosses processes (measured faster
        # than returning arrays; see BENCHMARKS.md). concurrent.futures, not multiprocessing.Pool:
        # when a worker dies (killed, crashed, out of memory) its pool fails every pending task
        # with BrokenProcessPool at once, where Pool waits for ever for the dead worker's
        # results, and its terminate() can deadlock. fork: the workers need nothing the parent
        # has not already imported, so they start in milliseconds.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_start_worker, initargs=(*setup, True))
        try:
            for future in as_completed([pool.submit(_decode_chunk, task) for task in tasks]):
                count, error = future.result()
                _raise_if(error)
                bar.update(count)
        except BrokenProcessPool:
            raise UserError("a decoding process died before prepare finished (killed, or out of memory?): "
                            "run again, or set prepare.workers: 1 to decode in one process") from None
        finally:
            # the tasks not started are dropped; the running ones end within one chunk
            pool.shutdown(wait=True, cancel_futures=True)


# One worker's open archive and output file; set by _start_worker in each process.
_worker: dict = {}


def _start_worker(archive_path: Path, images_path: Path, offset: int, size: int, ignore_sigint: bool) -> None:
    if ignore_sigint:
        # Ctrl-C reaches every process of the terminal; the parent alone handles it (it stops
        # the pool and removes the partial outputs), instead of one traceback per worker.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(archive=zipfile.ZipFile(archive_path), archive_path=archive_path, images_path=images_path,
                   images=os.open(images_path, os.O_WRONLY), offset=offset, size=size)


def _stop_worker() -> None:
    _worker["archive"].close()
    os.close(_worker["images"])
    _worker.clear()


def _decode_chunk(task: tuple[int, list[tuple[str, str]]]) -> tuple[int, str | None]:
    """Decode one chunk into the output; returns (images done, error message or None)."""
    start, items = task
    archive, size = _worker["archive"], _worker["size"]
    pixels = np.empty((len(items), size, size, 3), np.uint8)
    error = None
    for offset, (image_id, member) in enumerate(items):
        try:
            data = archive.read(member)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            error = f"cannot read {member} (image {image_id}) from {_worker['archive_path']}: {e}; download it again"
            break
        try:
            pixels[offset] = decode_image(data, size)
        except ValueError as e:
            error = f"cannot decode image {image_id} ({member} in {_worker['archive_path']}): {e}"
            break
    else:
        offset = len(items)
    # one write for the chunk's consecutive rows (those decoded before an error are kept: cheap)
    data, position = memoryview(pixels[:offset]).cast("B"), _worker["offset"] + start * pixels[0].nbytes
    try:
        while data:  # a write may be short (a signal, a nearly full disk): write the rest
            written = os.pwrite(_worker["images"], data, position)
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data, position = data[written:], position + written
    except OSError as e:  # the space was allocated, but a filesystem may still refuse (quota, I/O error)
        return 0, f"cannot write {_worker['images_path'].with_suffix('')}: {e.strerror or e}"
    return offset, error


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
