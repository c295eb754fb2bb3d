"""Device, precision and the device-resident input pipeline.

HAM10000 is small: at 224x224 the whole uint8 cache is ~1.5 GB, so it is moved to the GPU
once and every batch is gathered, resized, augmented and normalised there. A CPU-side
loader (decode JPEG, PIL transforms, DataLoader workers) cannot keep a modern GPU busy on a
model as small as DeiT-tiny. On the CPU the same code runs with the cache in memory.
"""
from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from typing import ContextManager, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from hmnist.errors import UserError

# Random resized crop, as a fraction of the image area and width/height ratio. torchvision's
# default area range (0.08, 1) crops most of a lesion away; dermoscopy keeps the lesion whole.
CROP_AREA = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.1  # brightness, contrast, saturation factors in [1 - JITTER, 1 + JITTER]: mild, colour is diagnostic


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """`auto` is CUDA when present; `setting` names where the choice came from, for the error."""
    if name not in ("auto", "cuda", "cpu"):
        raise UserError(f"{setting} must be one of auto, cuda, cpu, got {name!r}")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"{setting} is cuda but no CUDA GPU is visible: set {setting} to auto or cpu")
        return torch.device("cuda")
    if name == "auto":
        print("notice: no CUDA GPU found, running on the CPU (slow for the transformers)", file=sys.stderr)
    return torch.device("cpu")


def autocast(device: torch.device) -> ContextManager:
    """bf16 autocast on the GPU (no loss scaler needed); fp32 on the CPU, where bf16 is slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last feeds the GPU's tensor cores without transposes; on the CPU it measured slower."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The uint8 NHWC cache as a tensor on `device`, copied once."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class Normalize:
    """uint8 NHWC batch -> float NCHW at the model's size, normalised, channels_last on the GPU."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        self.size = size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = memory_format(device)

    def resize(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            # antialias: the cache is usually larger than a CNN's input, and plain bilinear aliases
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def __call__(self, batch: torch.Tensor, augment: Augment | None = None) -> torch.Tensor:
        x = self.resize(batch)
        if augment is not None:
            x = augment(x)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)


def inference_model(checkpoint: dict, device: torch.device) -> tuple[torch.nn.Module, Normalize]:
    """A checkpoint's model on `device` and its preprocessing, exactly as evaluation uses them:
    evaluate and predict both come through here, so their probabilities match."""
    from hmnist.models import model_from_checkpoint

    model = model_from_checkpoint(checkpoint).to(device).to(memory_format=memory_format(device))
    normalize = Normalize(int(checkpoint["input_size"]), tuple(checkpoint["mean"]), tuple(checkpoint["std"]), device)
    return model, normalize


class Augment:
    """Flips both ways, any rotation, random resized crop and mild colour jitter, for a whole
    batch at once on its device: one affine grid_sample does crop, rotation and flips."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        r = torch.rand(n, generator=self.generator, device=self.generator.device)
        return (low + (high - low) * r).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, device = x.shape[0], x.device
        area = self._uniform(n, *CROP_AREA, device)
        log_ratio = self._uniform(n, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), device)
        ratio = torch.exp(log_ratio)
        width = torch.sqrt(area * ratio).clamp(max=1)  # as a fraction of the image side
        height = torch.sqrt(area / ratio).clamp(max=1)
        angle = self._uniform(n, -math.pi, math.pi, device)  # lesions have no "up"
        flip_x = torch.where(self._uniform(n, 0, 1, device) < 0.5, -1.0, 1.0)
        flip_y = torch.where(self._uniform(n, 0, 1, device) < 0.5, -1.0, 1.0)
        shift_x = self._uniform(n, -1, 1, device) * (1 - width)
        shift_y = self._uniform(n, -1, 1, device) * (1 - height)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([width * cos * flip_x, -height * sin * flip_y, shift_x], dim=1),
            torch.stack([width * sin * flip_x, height * cos * flip_y, shift_y], dim=1),
        ], dim=1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # reflection: rotated corners show mirrored skin rather than black wedges
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return self._jitter(x)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        n, device = x.shape[0], x.device
        factors = [self._uniform(n, 1 - JITTER, 1 + JITTER, device).view(n, 1, 1, 1) for _ in range(3)]
        brightness, contrast, saturation = factors
        x = x * brightness
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray.mean(dim=(2, 3), keepdim=True)) * contrast + gray.mean(dim=(2, 3), keepdim=True)
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = gray + (x - gray) * saturation
        return x.clamp(0, 255)


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, weights: torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """Index batches for one epoch: a permutation, or `n` weighted draws with replacement.
    The last short batch is dropped: a batch of one breaks BatchNorm and adds noise."""
    if weights is None:
        order = torch.randperm(n, generator=generator, device=generator.device)
    else:
        order = torch.multinomial(weights.to(generator.device), n, replacement=True, generator=generator)
    usable = max(batch_size, n - n % batch_size) if n >= batch_size else n
    for start in range(0, usable, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module, images: torch.Tensor, normalize: Normalize, batch_size: int,
    device: torch.device, progress: bool = False, tta: bool = False,
) -> np.ndarray:
    """Softmax probabilities for uint8 NHWC `images` (on any device), in fp32."""
    from tqdm import tqdm

    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=not progress, leave=False):
        x = normalize(images[start:start + batch_size].to(device, non_blocking=True))
        views = [x, x.flip(3), x.flip(2), x.flip(2, 3)] if tta else [x]
        with autocast(device):
            logits = [model(v).float() for v in views]
        out.append(torch.stack([l.softmax(dim=1) for l in logits]).mean(0).cpu())
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy()
