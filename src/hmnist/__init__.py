"""Reproducible HAM10000 skin-lesion classification (DeiT, Swin, ResNet9), orchestrated by DVC.

    import hmnist
    model = hmnist.load("models/model.pt")        # device="auto" | "cuda" | "cpu"
    frame = model.predict(["new_images/"])         # ISIC 2018 columns: image, MEL, NV, ...
    result = model.classify(["new_images/"])       # .submission, .calibrated, .decisions (operating points)
    result = model.classify(["new_images/"], metadata="meta.csv")  # a model trained with patient metadata
    onnx = hmnist.load("export/model.onnx")        # the export stage's ONNX file, through ONNX Runtime

Importing the package imports nothing heavy: torch and timm load on the first `load`.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from hmnist.predictor import Predictor

__all__ = ["load"]


def load(checkpoint: str | os.PathLike | Sequence[str | os.PathLike], device: str = "auto") -> Predictor:
    """A trained checkpoint (from the train stage), or its ONNX export (.onnx, from the export
    stage), ready to `.predict(paths)`; a list of checkpoints (cross-validation folds) predicts
    their averaged probabilities."""
    from hmnist.predictor import Predictor

    return Predictor(checkpoint, device)
