"""Inference as evaluate, predict and the report run it: a checkpoint's model and input, the
test-time augmentation views, and probabilities in batches that halve when the GPU runs out of
memory.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn

from hmnist.augment import ModelInput, memory_format
from hmnist.config import CLASSES, TTA
from hmnist.engine import autocast
from hmnist.errors import UserError

log = logging.getLogger(__name__)


def inference_model(checkpoint: dict, device: torch.device,
                    source: str = "the checkpoint") -> tuple[nn.Module, ModelInput]:
    """A checkpoint's model on `device` and its preprocessing, exactly as evaluation uses them:
    evaluate and predict both come through here, so their probabilities match. A damaged
    checkpoint, or a GPU too full for the model, is a UserError naming `source`; any other
    error while moving the model (a CUDA fault) keeps its traceback."""
    from hmnist.models import damaged_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(checkpoint, source)
    arch = checkpoint["model_config"]["arch"]  # read by model_from_checkpoint: present
    try:
        size, mean, std = int(checkpoint["input_size"]), tuple(checkpoint["mean"]), tuple(checkpoint["std"])
    except (KeyError, TypeError, ValueError) as e:
        raise damaged_checkpoint(source, e) from None
    try:
        model = model.to(device).to(memory_format=memory_format(device, arch))
    except torch.OutOfMemoryError:
        raise UserError(f"out of GPU memory moving the model of {source} to {device}: free the GPU "
                        f"(other processes?) or run on the CPU (--device cpu, or train.device: cpu)") from None
    return model, ModelInput(size, mean, std, device, arch)


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views of an NCHW batch whose probabilities are averaged: `none` the image; `hflip`
    also its horizontal flip; `flips` also its vertical and double flip; `dihedral` all 8 flips
    and right-angle rotations (lesions have no up or left)."""
    if tta == "none":
        return [x]
    if tta == "hflip":
        return [x, x.flip(3)]
    views = [x, x.flip(3), x.flip(2), x.flip(2, 3)]
    if tta == "dihedral":
        turned = x.transpose(2, 3)
        views += [turned, turned.flip(3), turned.flip(2), turned.flip(2, 3)]
    elif tta != "flips":
        raise UserError(f"test-time augmentation must be one of {', '.join(TTA)}, got {tta!r}")
    return views


class BatchSize:
    """An inference batch size that halves when the GPU runs out of memory, and stays halved
    for the next calls that share it (said once)."""

    def __init__(self, size: int):
        self.size, self.halved = size, False

    def halve(self) -> None:
        if self.size == 1:
            raise UserError("out of GPU memory even for one image at a time: free the GPU (other processes?) "
                            "or run on the CPU (train.device: cpu, or --device cpu)")
        self.size //= 2
        if not self.halved:
            log.info(f"notice: out of GPU memory in inference; continuing with batches of {self.size} "
                     f"(halved until they fit; same results)")  # the handler moves a progress bar aside
            self.halved = True


@torch.no_grad()
def predict_probs(
    model: nn.Module, images: torch.Tensor, model_input: ModelInput, batch_size: int | BatchSize,
    device: torch.device, progress: bool = False, tta: str = "none", metadata: torch.Tensor | None = None,
) -> np.ndarray:
    """Softmax probabilities for uint8 NHWC `images` (on any device), in fp32; a metadata model
    (fusion.py) also takes each image's encoded `metadata` row, the same for every TTA view.

    If the GPU runs out of memory, the batch is halved until it fits; a batch of one image that
    still does not fit is a UserError. The result does not depend on the batch size.
    """
    from tqdm import tqdm

    limit = batch_size if isinstance(batch_size, BatchSize) else BatchSize(batch_size)
    model.eval()
    out, start = [], 0
    with tqdm(total=len(images), desc="predict", unit="img", disable=not progress, leave=False) as bar:
        while start < len(images):
            try:
                x = model_input(images[start:start + limit.size].to(device, non_blocking=True))
                extra = () if metadata is None else (metadata[start:start + len(x)].to(device),)
                with autocast(device):
                    logits = [model(view, *extra).float() for view in tta_views(x, tta)]
                probs = torch.stack([l.softmax(dim=1) for l in logits]).mean(0).cpu()
            except torch.OutOfMemoryError:
                x = logits = None  # noqa: F841  free what the failed batch holds before retrying
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                limit.halve()
                continue
            out.append(probs)
            start += len(probs)
            bar.update(len(probs))
    if not out:
        return np.zeros((0, len(CLASSES)), np.float32)
    return torch.cat(out).numpy()
