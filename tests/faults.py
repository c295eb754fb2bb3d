"""Faults injected into prepare's decoding workers (inherited through fork). A module of its
own, without torch, so that a stage started by a test can import it in a blink."""
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
