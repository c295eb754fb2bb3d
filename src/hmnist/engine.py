"""Device, precision and the device-resident input pipeline.

HAM10000 is small: at 224x224 the whole uint8 cache is ~1.5 GB, so it is moved to the GPU
once and every batch is gathered, resized, augmented and normalised there. A CPU-side
loader (decode JPEG, PIL transforms, DataLoader workers) cannot keep a modern GPU busy on a
model as small as DeiT-tiny. On the CPU the same code runs with the cache in memory.
"""
from __future__ import annotations

import functools
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
    """uint8 NHWC batch -> float NCHW at the model's size, normalised, channels_last on the GPU.

    With an `Augment`, the colour jitter and the normalisation are one per-sample affine map of
    the three channels (three multiply-adds and a clamp), not a dozen full-size passes.
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        self.size = size
        self.mean = torch.tensor(mean, device=device) * 255
        self.std = torch.tensor(std, device=device) * 255
        # the clamp to 0..255 that colour jitter needs, in normalised units
        self.low, self.high = -self.mean / self.std, (255 - self.mean) / self.std
        self.memory_format = memory_format(device)

    def resize(self, batch: torch.Tensor) -> torch.Tensor:
        # to float and to NCHW planes in one pass (.float() of the permuted view would keep NHWC
        # strides); the augmentation reads the planes, and its output is laid out for the model
        x = torch.empty(batch.shape[0], 3, *batch.shape[1:3], device=batch.device)
        x.copy_(batch.permute(0, 3, 1, 2))
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            # antialias: the cache is usually larger than a CNN's input, and plain bilinear aliases
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def __call__(self, batch: torch.Tensor, augment: Augment | None = None) -> torch.Tensor:
        x = self.resize(batch)
        if augment is None:
            x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        else:
            u = augment.draw(x.shape[0])
            x = augment.geometry(x, u)
            matrix, offset = augment.colour(x, u)
            # normalising is affine too: fold it in, (A x + b - mean) / std
            x = colour_affine(x, matrix / self.std[:, None], (offset - self.mean) / self.std, self.low, self.high,
                              self.memory_format)
        return x.contiguous(memory_format=self.memory_format)


def colour_affine(x: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor, low: torch.Tensor,
                  high: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """clamp(matrix[i] @ pixel + offset[i], low, high) for every pixel of each image i of an NCHW
    batch: `matrix` (n, 3, 3), `offset` (n, 3), `low` and `high` per channel (3,).

    Three multiply-adds over the batch, written straight into `memory_format`. A batched matrix
    product with an inner size of 3 took 0.29 ms per 128x3x224x224 batch on an H100 (profiled,
    BENCHMARKS.md), ~6x the time to read and write the batch once: cuBLAS is not made for it.
    """
    n, c = x.shape[:2]
    m = matrix.view(n, c, c, 1, 1)
    out = torch.empty_like(x, memory_format=memory_format)
    torch.addcmul(offset.view(n, c, 1, 1), x[:, 0:1], m[:, :, 0], out=out)
    for j in range(1, c):
        out.addcmul_(x[:, j:j + 1], m[:, :, j])
    return out.clamp_(low.view(1, c, 1, 1), high.view(1, c, 1, 1))


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.affine_grid(theta, (n, c, height, width), align_corners=False), by broadcasting: the
    sampling grid is x-part + y-part, one full-size add. F.affine_grid's batched product with an
    inner size of 3 took 0.29 ms per 128x224x224 batch on an H100 (profiled), a quarter of the
    whole augmentation's device time."""
    n = theta.shape[0]
    xs, ys = _pixel_centres(height, width, theta.device)
    return theta[:, :, 0].view(n, 1, 1, 2) * xs + (theta[:, :, 1].view(n, 1, 1, 2) * ys + theta[:, :, 2].view(n, 1, 1, 2))


def inference_model(checkpoint: dict, device: torch.device) -> tuple[torch.nn.Module, Normalize]:
    """A checkpoint's model on `device` and its preprocessing, exactly as evaluation uses them:
    evaluate and predict both come through here, so their probabilities match."""
    from hmnist.models import model_from_checkpoint

    model = model_from_checkpoint(checkpoint).to(device).to(memory_format=memory_format(device))
    normalize = Normalize(int(checkpoint["input_size"]), tuple(checkpoint["mean"]), tuple(checkpoint["std"]), device)
    return model, normalize


@functools.lru_cache(maxsize=8)
def _pixel_centres(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y of the pixel centres in [-1, 1] (align_corners=False), shaped to broadcast."""
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=device).view(1, 1, width, 1)
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=device).view(1, height, 1, 1)
    return xs, ys


GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale; sums to 1


class Augment:
    """Flips both ways, any rotation, random resized crop and mild colour jitter, for a whole
    batch at once on its device: one affine grid_sample does crop, rotation and flips, and one
    per-sample 3x3 colour matrix does brightness, contrast and saturation.

    All of a batch's random numbers come from one draw on `generator`, so a step costs a few
    kernel launches, not dozens: on a GPU, a small model's step is bound by launches.
    """

    # one column per random quantity: (low, high) of its uniform draw
    RANGES = (
        CROP_AREA,                                           # 0 crop area, fraction of the image
        (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])),  # 1 log width/height ratio
        (-math.pi, math.pi),                                 # 2 rotation: lesions have no "up"
        (0, 1), (0, 1),                                      # 3, 4 horizontal / vertical flip if < 0.5
        (-1, 1), (-1, 1),                                    # 5, 6 crop centre, in the room left
        (1 - JITTER, 1 + JITTER),                            # 7 brightness
        (1 - JITTER, 1 + JITTER),                            # 8 contrast
        (1 - JITTER, 1 + JITTER),                            # 9 saturation
    )

    def __init__(self, generator: torch.Generator):
        """Batches must be on `generator`'s device."""
        self.generator = generator
        device = generator.device
        ranges = torch.tensor(self.RANGES, dtype=torch.float32, device=device)
        self.low, self.span = ranges[:, 0], ranges[:, 1] - ranges[:, 0]
        self.gray = torch.tensor(GRAY, device=device)
        self.eye = torch.eye(3, device=device)
        self.signs = torch.tensor([1.0, -1.0], device=device)
        self.pixel_low, self.pixel_high = torch.zeros(3, device=device), torch.full((3,), 255.0, device=device)

    def draw(self, n: int) -> torch.Tensor:
        """All the random numbers of `n` images, (n, len(RANGES)), each in its range: one kernel."""
        r = torch.rand(n, len(self.RANGES), generator=self.generator, device=self.generator.device)
        return torch.addcmul(self.low, r, self.span)

    def geometry(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Random resized crop, rotation and flips of a float NCHW batch, as drawn in `u`."""
        size = torch.sqrt(u[:, 0:1] * torch.exp(u[:, 1:2] * self.signs)).clamp_(max=1)  # width, height
        scale = size * torch.where(u[:, 3:5] < 0.5, -1.0, 1.0)  # flips
        shift = u[:, 5:7] * (1 - size)
        cos, sin = torch.cos(u[:, 2:3]), torch.sin(u[:, 2:3])
        # theta = [[w cos fx, -h sin fy, dx], [w sin fx, h cos fy, dy]], w h in fractions of the side
        rotation = torch.cat([cos, -sin, sin, cos], dim=1).view(-1, 2, 2)
        theta = torch.cat([rotation * scale.unsqueeze(1), shift.unsqueeze(2)], dim=2)
        grid = affine_grid(theta, x.shape[2], x.shape[3])
        # reflection: rotated corners show mirrored skin rather than black wedges
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def colour(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The colour jitter of `jitter_reference` drawn in `u`, as `matrix @ pixel + offset`,
        then clamped to 0..255. Brightness b, contrast c about the mean grey level, saturation s
        about each pixel's grey: with grey weights w (summing to 1) and S = sI + (1-s) 1 w^T,
        matrix = c b S and offset = (1-c) b mean(w.x) on every channel, since S keeps grey."""
        b, c, s = (u[:, i].view(-1, 1, 1) for i in (7, 8, 9))
        saturation = s * self.eye + (1 - s) * self.gray.view(1, 1, 3)  # row i: s e_i + (1 - s) w
        mean_gray = (x.mean(dim=(2, 3)) @ self.gray).view(-1, 1)
        offset = ((1 - c) * b).view(-1, 1) * mean_gray
        return c * b * saturation, offset.expand(-1, 3)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The augmented float NCHW batch, in 0..255 (`Normalize` folds normalising in instead)."""
        u = self.draw(x.shape[0])
        x = self.geometry(x, u)
        matrix, offset = self.colour(x, u)
        return colour_affine(x, matrix, offset, self.pixel_low, self.pixel_high)


def jitter_reference(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                     saturation: torch.Tensor) -> torch.Tensor:
    """The colour jitter `Augment.colour` computes, step by step: the definition it is tested
    against. Factors are per image, shape (n,)."""
    b, c, s = (f.view(-1, 1, 1, 1) for f in (brightness, contrast, saturation))
    weights = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = x * b
    mean = (x * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * c + mean
    gray = (x * weights).sum(1, keepdim=True)
    x = gray + (x - gray) * s
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
