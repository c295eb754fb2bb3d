"""The train and val splits as the train stage reads them: images and labels on the device, and
a metadata model's encoded rows. Built once per run; nothing changes them after.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from hmnist import calibration, fusion
from hmnist.config import Params
from hmnist.data import split_rows
from hmnist.engine import to_device
from hmnist.errors import UserError


@dataclass(frozen=True)
class Splits:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: np.ndarray
    val_lesions: np.ndarray  # the calibration's held-out folds are whole lesions
    # a metadata model's (models.<name>.metadata) encoding, fitted on the train split, and the
    # train and val splits' encoded rows on the device; None for an image-only model
    encoding: fusion.Encoding | None = None
    train_metadata: torch.Tensor | None = None
    val_metadata: torch.Tensor | None = None


def splits_on_device(params: Params, images: np.ndarray, index: pd.DataFrame, split: pd.DataFrame,
                     device: torch.device) -> Splits:
    """`split`'s train and val rows of the cache (`images`, `index`) on `device`."""
    config = params.model_config
    labels = index["label"].to_numpy().astype(np.int64)
    train_rows, val_rows = split_rows(index, split, "train"), split_rows(index, split, "val")
    check_operating_points(params, labels[val_rows])  # before any training: a threshold needs positives
    encoding = (fusion.Encoding.fit(index.iloc[train_rows], config.metadata, config.metadata_dropout)
                if config.metadata else None)
    return Splits(train_images=to_device(images[train_rows], device),
                  train_labels=torch.from_numpy(labels[train_rows]).to(device),
                  val_images=to_device(images[val_rows], device), val_labels=labels[val_rows],
                  val_lesions=index["lesion_id"].to_numpy()[val_rows], encoding=encoding,
                  **_encoded(encoding, index, {"train_metadata": train_rows, "val_metadata": val_rows}, device))


def _encoded(encoding: fusion.Encoding | None, index: pd.DataFrame, rows: dict[str, np.ndarray],
             device: torch.device) -> dict[str, torch.Tensor | None]:
    return {name: None if encoding is None else torch.from_numpy(encoding.encode(index.iloc[r])).to(device)
            for name, r in rows.items()}


def check_operating_points(params: Params, val_labels: np.ndarray) -> None:
    for i, op in enumerate(params.train.operating_points):
        if not calibration.positives_of(val_labels, op.classes).any():
            raise UserError(f"train.operating_points[{i}] ({op.name}): the validation split has no image of "
                            f"{', '.join(op.classes)} to choose its threshold on: use more images, or remove it")
