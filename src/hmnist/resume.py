"""The training state saved after every epoch under models/.resume/, so that an interrupted run
continues where it stopped: which run a saved state belongs to (its key), and reading and
writing it. What the state holds, each part's owner says (training.Optimisation, selection.Selection).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from hmnist import collectives
from hmnist.config import Params


def resume_key(params: Params, split: pd.DataFrame, cache_shape: tuple[int, ...]) -> str:
    """Which run a saved state belongs to: same params, same split, same cache size."""
    # what is fitted after the last epoch does not change the epochs: a state survives a change to it
    after = ("calibration", "operating_points")
    train = {k: v for k, v in asdict(params.train).items() if k not in after}
    config = {k: v for k, v in asdict(params.model_config).items() if k != "tta"}
    # "state": the resume file's format (2: epochs counted from 1), so a state of another is never resumed
    payload = json.dumps({"model": params.model, "config": config, "train": train, "cache": list(cache_shape),
                          "state": 2}, sort_keys=True)
    digest = hashlib.sha256(payload.encode())
    digest.update(pd.util.hash_pandas_object(split, index=False).values.tobytes())
    return digest.hexdigest()[:16]


def read_state(path: Path | None, ranks: collectives.Ranks) -> dict[str, Any] | None:
    """The state saved at `path`, None when there is none: rank 0's, on every rank (a collective:
    all take part), so every rank resumes alike, on other machines too."""
    state = None
    if path is not None and path.exists() and ranks.main:
        state = torch.load(path, map_location="cpu", weights_only=True)  # loading copies to the device
    return collectives.from_main(state)


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Written whole or not at all (an interrupted write leaves the previous state)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def remove_abandoned_states(folder: Path, keep: Path) -> list[Path]:
    """Delete the resume states of runs whose params changed before they finished: they can
    never be resumed (the key is the params' hash) and each holds a whole training state."""
    removed = [path for path in folder.glob("*") if path.is_file() and path != keep]
    for path in removed:
        path.unlink()
    return removed
