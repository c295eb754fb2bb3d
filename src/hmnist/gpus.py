"""Which GPU a training process uses: its rank's among several, else one that no other hmnist
run on the machine holds. A lock file per GPU in a machine-wide folder, held with
`fcntl.flock`, so the kernel releases it when the process ends, crash or kill -9 included.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import IO

import torch

from hmnist.collectives import Ranks
from hmnist.errors import UserError

log = logging.getLogger(__name__)


def device(setting: str, ranks: Ranks, resolved: torch.device) -> torch.device:
    """The device of this process: its own GPU among several; else a GPU that no other hmnist
    run on the machine holds (several visible, `auto` or `cuda`); `cuda:K` is K."""
    if resolved.type != "cuda":
        return resolved
    if ranks.world > 1:
        return torch.device("cuda", ranks.local)
    if setting in ("auto", "cuda") and torch.cuda.device_count() > 1:
        (name, _), = claim_gpus(1, visible_gpus())
        index = visible_gpus().index(name)
        log.info(f"using GPU {name} (cuda:{index}); other hmnist runs on this machine take other GPUs")
        return torch.device("cuda", index)
    return resolved


_held: list[IO] = []  # the locks of this process: open until it ends


def lock_dir() -> Path:
    return Path(os.environ.get("HMNIST_LOCK_DIR") or Path(tempfile.gettempdir()) / "hmnist-gpu-locks")


def visible_gpus() -> list[str]:
    """The GPUs this process sees, by the names CUDA_VISIBLE_DEVICES gives them (else 0..N-1),
    so that two runs shown different subsets still lock the same physical GPU under one name."""
    names = [n.strip() for n in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if n.strip()]
    count = torch.cuda.device_count()
    return names[:count] if names else [str(i) for i in range(count)]


def claim_gpus(count: int, gpus: list[str], poll: float = 5.0) -> list[tuple[str, IO]]:
    """Lock `count` of `gpus` that no other process holds, and keep them until this process
    ends. While too few are free, waits (saying so once): with more runs than GPUs, the rest
    queue instead of sharing a GPU, running out of memory and changing their results."""
    if count > len(gpus):
        raise UserError(f"train.devices is {count} but only {len(gpus)} GPU(s) are visible")
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        folder.chmod(0o1777)  # machine-wide, like /tmp: another user's runs must see these locks too
    said = False
    while True:
        held = []
        for name in gpus:
            file = open(folder / f"gpu-{name}.lock", "a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                continue
            file.truncate(0)
            file.write(f"{os.getpid()}\n")  # who holds it, for a curious user
            file.flush()
            held.append((name, file))
            if len(held) == count:
                _held.extend(f for _, f in held)
                return held
        for _, file in held:
            file.close()  # too few: hold none while waiting, or two waiting runs could block each other
        if not said:
            log.info(f"all GPUs are in use by other hmnist runs (locks in {folder}); waiting for {count} to come free")
            said = True
        time.sleep(poll)
