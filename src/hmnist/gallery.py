"""The report's gallery: per true class, the test images a run's model was most confidently
right and most confidently wrong about, each with its Grad-CAM map (cam.py) for the class the
model predicted, computed from the run's own checkpoint and prepared cache.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hmnist.config import CLASS_COLUMNS, CLASS_INDEX, CLASSES
from hmnist.errors import UserError
from hmnist.runs import CHECKPOINT, IMAGES, INDEX, RunData, pull_hint

if TYPE_CHECKING:
    import pandas as pd


def gallery_rows(frame: pd.DataFrame, per_kind: int) -> dict[str, dict[str, list[int]]]:
    """Per true class, the rows of the `per_kind` most confident right predictions and the
    `per_kind` most confident wrong ones (a true `mel` called something else: what it missed)."""
    probs = frame[CLASS_COLUMNS].to_numpy(float)
    predicted, truth = probs.argmax(1), frame["dx"].map(CLASS_INDEX).to_numpy()
    confidence = probs.max(1)
    out = {}
    for i, name in enumerate(CLASSES):
        right = np.flatnonzero((truth == i) & (predicted == i))
        wrong = np.flatnonzero((truth == i) & (predicted != i))
        out[name] = {kind: rows[np.argsort(-confidence[rows], kind="stable")][:per_kind].tolist()
                     for kind, rows in (("right", right), ("wrong", wrong))}
    return out


def explain_run(data: RunData, per_kind: int, device_name: str) -> dict[str, dict[str, list[dict]]]:
    """The gallery of one run: per class and kind, each example's image, map overlay and caption."""
    import pandas as pd
    import torch

    from hmnist.cam import class_maps, overlay
    from hmnist.engine import resolve_device
    from hmnist.fusion import encoded_for
    from hmnist.inference import inference_model
    from hmnist.models import load_checkpoint

    frame = data.predictions
    chosen = gallery_rows(frame, per_kind)
    rows = sorted({r for kinds in chosen.values() for rs in kinds.values() for r in rs})
    if not rows:
        return {name: {"right": [], "wrong": []} for name in CLASSES}
    index = pd.read_csv(data.run.local_file(INDEX), dtype={"image_id": str})
    images = np.load(data.run.local_file(IMAGES), mmap_mode="r")
    position = pd.Series(np.arange(len(index)), index=index["image_id"])
    wanted = frame["image"].iloc[rows]
    absent = sorted(set(wanted) - set(position.index))
    if absent:
        raise UserError(f"{data.spec}: test image {absent[0]} is not in its prepared cache ({INDEX}): "
                        f"{pull_hint(data.spec)}")
    pixels = torch.from_numpy(np.array(images[position[wanted].to_numpy()]))
    try:
        checkpoint = load_checkpoint(data.checkpoint)
    except UserError as e:
        raise UserError(f"{data.spec}'s {CHECKPOINT}: {e}") from None
    device = resolve_device(device_name, setting="--device")
    model, model_input = inference_model(checkpoint, device)
    probs = frame[CLASS_COLUMNS].to_numpy(float)[rows]
    # a metadata model's map: its image part, with each image's metadata as its evaluation read it
    removed = [f for f in str(data.metrics.get("metadata_removed", "none")).split(",") if f != "none"]
    metadata = encoded_for(checkpoint, index.iloc[position[wanted].to_numpy()], len(rows), removed)
    maps = class_maps(model, model_input, pixels, probs.argmax(1), metadata=metadata)
    cards = {}
    for row, image, heat, p in zip(rows, pixels.numpy(), maps, probs):
        predicted = CLASSES[int(p.argmax())]
        cards[row] = {"image": image, "overlay": overlay(image, heat), "name": frame["image"].iloc[row],
                      "true": frame["dx"].iloc[row], "predicted": predicted, "probability": float(p.max())}
    return {name: {kind: [cards[r] for r in rs] for kind, rs in kinds.items()} for name, kinds in chosen.items()}
