"""Faults injected into prepare's decoding workers (inherited through fork), and files this
process may not read. A module of its own, without torch, so that a stage started by a test
can import it in a blink."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from hmnist.data import decode_image


def dying_decoder(flag: Path, after: int, action: str):
    """decode_image for the workers: the first worker to reach its `after`-th image is
    SIGKILLed (action "kill"), or raises a RuntimeError, a bug ("raise"), there and then;
    `flag` is created to show it happened."""
    parent, seen = os.getpid(), []

    def decode(data: bytes, size: int):
        seen.append(1)
        if os.getpid() != parent and len(seen) == after:
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass  # another worker went first: this one carries on
            else:
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("a bug in the decoder")
        return decode_image(data, size)

    return decode


def deny(path, monkeypatch) -> str:
    """Make `path` (a file or folder) unreadable to this process: chmod 000, which is the real
    check, and, where that does not stop this process (root reads anything, and CI containers
    run tests as root), open() and os.scandir() raising the PermissionError the kernel would
    raise for anyone else. Returns "chmod" or "simulated", for the test's own messages."""
    import builtins
    import os

    path = os.path.abspath(path)
    os.chmod(path, 0)  # pytest's tmp_path clean-up restores modes it needs
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").close()
    except PermissionError:
        return "chmod"

    def denied(file) -> bool:
        return isinstance(file, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(file)) == path

    def no_access(file):
        raise PermissionError(13, "Permission denied", os.fsdecode(file))

    real_open, real_scandir = builtins.open, os.scandir
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: no_access(file) if denied(file) else real_open(file, *a, **k))
    monkeypatch.setattr(os, "scandir", lambda top=".": no_access(top) if denied(top) else real_scandir(top))
    return "simulated"
