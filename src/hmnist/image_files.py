"""The image files a user names, for predict: finding them, checking their names, decoding them.

Decoding goes through `data.decode_image` at the checkpoint's prepare_size, the function that
built the cache the model was evaluated on, in a few threads one batch ahead of the model.
"""
from __future__ import annotations

import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from hmnist.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Decoding threads: PIL releases the GIL while it decodes, and a few threads keep up with a
# GPU on HAM10000-sized JPEGs. More would mostly hold more decoded batches in memory.
DECODE_THREADS = min(4, os.cpu_count() or 1)


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named by `paths` (files, or folders searched recursively), sorted, deduplicated.

    A file named explicitly is kept whatever its extension (decoding will say if it is not an
    image); in folders only .jpg, .jpeg and .png files count.
    """
    found: dict[str, Path] = {}  # real path -> the path as the user spelled it, first seen wins
    searched = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            searched.append(str(path))
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = [d for d in subfolders if not d.startswith(".")]
                for name in names:
                    if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                        file = Path(folder, name)
                        found.setdefault(os.path.realpath(file), file)
        elif os.path.lexists(path):  # a broken symbolic link too: read_image names it, --skip-bad skips it
            found.setdefault(os.path.realpath(path), path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not found:
        where = ", ".join(searched) if searched else "the given paths"
        raise UserError(f"no JPEG or PNG images (.jpg, .jpeg, .png) found in {where}")
    return sorted(found.values(), key=str)


def check_unique_names(files: Sequence[Path]) -> None:
    """The submission names each image by its file name without extension: those must be unique."""
    seen: dict[str, Path] = {}
    for file in files:
        if file.stem in seen:
            raise UserError(f"two inputs would both be image '{file.stem}' in the submission: "
                            f"{seen[file.stem]} and {file}; rename or leave out one of them")
        seen[file.stem] = file


def read_image(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    """(size x size x 3 uint8 image, None), or (None, why it cannot be read)."""
    from hmnist.data import decode_image

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None, "not a JPEG or PNG file: its name does not end in .jpg, .jpeg or .png"
    try:
        data = path.read_bytes()
    except OSError as e:
        if path.is_symlink():  # os.walk lists a link whatever it points at
            if e.errno == errno.ELOOP:
                return None, "a broken symbolic link: it leads to itself, in a loop"
            if e.errno == errno.ENOENT:
                return None, f"a broken symbolic link: its target {os.readlink(path)} does not exist"
        return None, f"cannot read it: {e.strerror or e}"
    try:
        return decode_image(data, size), None
    except ValueError as e:
        reason = str(e)
        if "cannot identify image file" in reason:  # PIL's words, with a BytesIO repr in them
            reason = "not an image, or in a format PIL cannot read"
        return None, f"cannot decode it as an image: {reason}"



def decoded_batches(files: list[Path], size: int, batch_size: int, pool: ThreadPoolExecutor
                    ) -> Iterator[list[tuple[Path, tuple[np.ndarray | None, str | None]]]]:
    """Batches of (path, read_image result at `size`), decoded by `pool` one batch ahead of the model.

    At most two batches of decoded images exist at once, whatever the number of files.
    """
    def submit(start: int) -> list[tuple[Path, Future]]:
        return [(path, pool.submit(read_image, path, size)) for path in files[start:start + batch_size]]

    ahead = submit(0)
    try:
        for start in range(0, len(files), batch_size):
            current, ahead = ahead, submit(start + batch_size)
            yield [(path, future.result()) for path, future in current]
    finally:
        for _, future in ahead:  # on an error, do not decode a batch nobody will use
            future.cancel()
