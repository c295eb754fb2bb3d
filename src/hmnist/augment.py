"""The device-resident input pipeline: a uint8 cache batch in, the model's input out.

HAM10000 is small: at 224x224 the whole uint8 cache fits on a GPU, so it is moved there once
and every batch is gathered, resized, augmented and normalised there, as a few whole-batch
kernels. A CPU-side loader (decode JPEG, PIL transforms, DataLoader workers) cannot keep a
modern GPU busy on a model as small as DeiT-tiny. On the CPU the same code runs in memory.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Random resized crop: width/height ratio range, as torchvision's. The area range and the other
# strengths are params (train.crop_area_min, train.rotation, train.color_jitter).
CROP_RATIO = (3 / 4, 4 / 3)
GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale; sums to 1


# Architectures (timm names, by prefix) whose CPU training step is faster in channels_last:
# the convolutional ones measured by benchmarks/memory_format.py (BENCHMARKS.md, "Memory layout
# on the CPU"). A transformer's only convolution is its patch embedding: it gains nothing.
CPU_CHANNELS_LAST = ("resnet9", "efficientnet", "tf_efficientnet")


def memory_format(device: torch.device, arch: str | None = None) -> torch.memory_format:
    """channels_last on the GPU (it feeds the tensor cores without transposes), and on the CPU
    for the architectures it was measured faster for; the default layout otherwise."""
    if device.type == "cuda" or (arch is not None and arch.startswith(CPU_CHANNELS_LAST)):
        return torch.channels_last
    return torch.contiguous_format


class ModelInput:
    """uint8 NHWC cache batch -> the model's input: float NCHW at the model's size, augmented
    when given an `Augment`, normalised, in the model's memory layout (`memory_format`).

    With an `Augment`, the colour jitter and the normalisation are one per-sample affine map of
    the three channels (three multiply-adds and a clamp), not a dozen full-size passes.
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                 arch: str | None = None):
        """`arch`: the model's, for its memory layout (`memory_format`)."""
        self.size = size
        self.mean = torch.tensor(mean, device=device) * 255
        self.std = torch.tensor(std, device=device) * 255
        # the clamp to 0..255 that colour jitter needs, in normalised units
        self.low, self.high = -self.mean / self.std, (255 - self.mean) / self.std
        self.memory_format = memory_format(device, arch)

    def resize(self, batch: torch.Tensor) -> torch.Tensor:
        """Float NCHW at the model's size, as evaluation sees it."""
        return self.planes(batch, self.size)

    @staticmethod
    def planes(batch: torch.Tensor, size: int) -> torch.Tensor:
        # to float and to NCHW planes in one pass (.float() of the permuted view would keep NHWC
        # strides); the augmentation reads the planes, and its output is laid out for the model
        x = torch.empty(batch.shape[0], 3, *batch.shape[1:3], device=batch.device)
        x.copy_(batch.permute(0, 3, 1, 2))
        if x.shape[-1] != size or x.shape[-2] != size:
            # antialias: the cache is usually larger than a CNN's input, and plain bilinear aliases
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def __call__(self, batch: torch.Tensor, augment: Augment | None = None, draws: Draws | None = None
                 ) -> torch.Tensor:
        """`draws`: the augmentation's random numbers for these images (`Augment.draw`), when
        drawn for a larger batch than this one (a data-parallel rank's share); else drawn here."""
        if augment is None or augment.flips_only:
            x = self.resize(batch)
            if augment is not None:  # the whole affine resampling would be an exact copy: flip instead
                u = augment.draw(x.shape[0]) if draws is None else draws
                horizontal, vertical = (u.flips < 0.5).unbind(1)
                x = flip(flip(x, horizontal, 3), vertical, 2)
            x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        else:
            # The crop is sampled straight from the cache at the model's size, one resampling,
            # so a crop keeps the cache's detail: resizing to the model's size first and then
            # enlarging a crop of that would throw the detail away before cropping. Only a cache
            # far larger than the smallest crop needs (1:1 from cache to output) is first reduced
            # to that, with antialiasing, or large crops would alias; a reduction by less than
            # 1.5x would blur more than it saves.
            needed = math.ceil(self.size / math.sqrt(augment.crop_area[0]))
            x = self.planes(batch, needed if batch.shape[1] > 1.5 * needed else batch.shape[1])
            u = augment.draw(x.shape[0]) if draws is None else draws
            x = augment.geometry(x, u, self.size)
            matrix, offset = augment.colour(x, u)
            # normalising is affine too: fold it in, (A x + b - mean) / std
            x = colour_affine(x, matrix / self.std[:, None], (offset - self.mean) / self.std, self.low, self.high,
                              self.memory_format)
        return x.contiguous(memory_format=self.memory_format)


def flip(x: torch.Tensor, which: torch.Tensor, dim: int) -> torch.Tensor:
    """x with the images `which` selects (a bool per image) flipped along `dim`."""
    return torch.where(which.view(-1, *([1] * (x.dim() - 1))), x.flip(dim), x)


def colour_affine(x: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor, low: torch.Tensor,
                  high: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """clamp(matrix[i] @ pixel + offset[i], low, high) for every pixel of each image i of an NCHW
    batch: `matrix` (n, 3, 3), `offset` (n, 3), `low` and `high` per channel (3,).

    Three multiply-adds over the batch, written straight into `memory_format`: a batched matrix
    product with an inner size of 3 is far slower on a GPU (cuBLAS is not made for it; the
    profile is in BENCHMARKS.md).
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
    sampling grid is x-part + y-part, one full-size add, instead of F.affine_grid's batched
    product with an inner size of 3 (slow on a GPU, as `colour_affine` says)."""
    n = theta.shape[0]
    xs, ys = _pixel_centres(height, width, theta.device)
    return theta[:, :, 0].view(n, 1, 1, 2) * xs + (theta[:, :, 1].view(n, 1, 1, 2) * ys + theta[:, :, 2].view(n, 1, 1, 2))


@functools.lru_cache(maxsize=8)
def _pixel_centres(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y of the pixel centres in [-1, 1] (align_corners=False), shaped to broadcast."""
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=device).view(1, 1, width, 1)
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=device).view(1, height, 1, 1)
    return xs, ys


# The random quantities of one image's augmentation, each with its number of columns, in the
# order of their columns in a batch's draw (`Draws`): drawn together, they cost one kernel.
FIELDS = {"crop_area": 1, "log_ratio": 1, "angle": 1, "flips": 2, "centre": 2,
          "brightness": 1, "contrast": 1, "saturation": 1}
_COLUMNS = dict(zip(FIELDS, (slice(end - width, end) for end, width in
                             zip(itertools.accumulate(FIELDS.values()), FIELDS.values()))))


def _field(name: str, doc: str) -> property:
    """A read-only view of the quantity `name`'s columns."""
    return property(lambda draws: draws.values[:, _COLUMNS[name]], doc=doc)


@dataclass(frozen=True)
class Draws:
    """A batch's augmentation draws, one row per image, each quantity by its name (FIELDS): views
    of the columns of one (n, 10) tensor, which a data-parallel rank slices by rows."""
    values: torch.Tensor

    @staticmethod
    def columns(name: str) -> slice:
        """Where the quantity `name` sits in `values`."""
        return _COLUMNS[name]

    def __getitem__(self, rows: torch.Tensor) -> Draws:
        """The draws of the images `rows` selects (a rank's share of the batch)."""
        return Draws(self.values[rows])

    def __len__(self) -> int:
        return len(self.values)

    crop_area = _field("crop_area", "(n, 1): the crop's area, a fraction of the image's")
    log_ratio = _field("log_ratio", "(n, 1): the log of the crop's width / height")
    angle = _field("angle", "(n, 1): the rotation, radians")
    flips = _field("flips", "(n, 2): horizontal, vertical; an image is flipped that way where below 0.5")
    centre = _field("centre", "(n, 2): the crop's centre, x and y, from -1 to 1 of the room the crop leaves")
    brightness = _field("brightness", "(n, 1): the colour jitter's brightness factor")
    contrast = _field("contrast", "(n, 1): the colour jitter's contrast factor")
    saturation = _field("saturation", "(n, 1): the colour jitter's saturation factor")


class Augment:
    """Flips both ways, any rotation, random resized crop and mild colour jitter, for a whole
    batch at once on its device: one affine grid_sample does crop, rotation and flips, and one
    per-sample 3x3 colour matrix does brightness, contrast and saturation.

    All of a batch's random numbers come from one draw on `generator`, so a step costs a few
    kernel launches, not dozens: on a GPU, a small model's step is bound by launches.
    """

    def __init__(self, generator: torch.Generator, crop_area: tuple[float, float] = (0.35, 1.0),
                 rotation: float = 180.0, jitter: float = 0.1):
        """Batches must be on `generator`'s device. `crop_area`: the crop's area as a fraction of
        the image (torchvision's default lower bound, 0.08, crops most of a lesion away);
        `rotation`: largest angle either way, in degrees (180: any, lesions have no "up");
        `jitter`: brightness, contrast and saturation factors in [1 - jitter, 1 + jitter]."""
        self.generator, self.crop_area = generator, crop_area
        # no crop, rotation or colour change: only the flips act (ModelInput then flips directly)
        self.flips_only = crop_area[0] >= 1 and rotation == 0 and jitter == 0
        device = generator.device
        angle = math.radians(rotation)
        # each quantity's (low, high) of its uniform draw, one per column
        ranges = {"crop_area": [crop_area], "log_ratio": [(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))],
                  "angle": [(-angle, angle)], "flips": [(0, 1)] * 2, "centre": [(-1, 1)] * 2,
                  "brightness": [(1 - jitter, 1 + jitter)], "contrast": [(1 - jitter, 1 + jitter)],
                  "saturation": [(1 - jitter, 1 + jitter)]}
        self.ranges = [bounds for name in FIELDS for bounds in ranges[name]]
        ranges = torch.tensor(self.ranges, dtype=torch.float32, device=device)
        self.low, self.span = ranges[:, 0], ranges[:, 1] - ranges[:, 0]
        self.gray = torch.tensor(GRAY, device=device)
        self.eye = torch.eye(3, device=device)
        self.signs = torch.tensor([1.0, -1.0], device=device)

    def draw(self, n: int) -> Draws:
        """All the random numbers of `n` images, each in its range: one kernel."""
        r = torch.rand(n, len(self.ranges), generator=self.generator, device=self.generator.device)
        return Draws(torch.addcmul(self.low, r, self.span))

    def geometry(self, x: torch.Tensor, u: Draws, size: int | None = None) -> torch.Tensor:
        """Random resized crop, rotation and flips of a float NCHW batch, as drawn in `u`,
        sampled at `size` x `size` (default: the batch's own size)."""
        area = u.crop_area
        extent = torch.sqrt(area * torch.exp(u.log_ratio * self.signs))  # width, height
        # a side longer than the image is cut to it and the other side keeps the drawn area, so
        # the crop's area is always the drawn one: area 1 is the whole image, unstretched
        # (clamping each side alone cropped up to 13% off one side and stretched the rest)
        too_long = extent > 1
        extent = torch.where(too_long, 1.0, torch.where(too_long.flip(1), area, extent))
        scale = extent * torch.where(u.flips < 0.5, -1.0, 1.0)
        shift = u.centre * (1 - extent)
        cos, sin = torch.cos(u.angle), torch.sin(u.angle)
        # theta = [[w cos fx, -h sin fy, dx], [w sin fx, h cos fy, dy]], w h in fractions of the side
        rotation = torch.cat([cos, -sin, sin, cos], dim=1).view(-1, 2, 2)
        theta = torch.cat([rotation * scale.unsqueeze(1), shift.unsqueeze(2)], dim=2)
        grid = affine_grid(theta, size or x.shape[2], size or x.shape[3])
        # reflection: rotated corners show mirrored skin rather than black wedges
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def colour(self, x: torch.Tensor, u: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """The colour jitter drawn in `u`, as `matrix @ pixel + offset`, then clamped to 0..255
        (tests/test_augment.py holds it to the step-by-step definition). Brightness b, contrast c
        about the mean grey level, saturation s about each pixel's grey: with grey weights w
        (summing to 1) and S = sI + (1-s) 1 w^T, matrix = c b S and offset = (1-c) b mean(w.x)
        on every channel, since S keeps grey."""
        b, c, s = (factor.view(-1, 1, 1) for factor in (u.brightness, u.contrast, u.saturation))
        saturation = s * self.eye + (1 - s) * self.gray.view(1, 1, 3)  # row i: s e_i + (1 - s) w
        mean_gray = (x.mean(dim=(2, 3)) @ self.gray).view(-1, 1)
        offset = ((1 - c) * b).view(-1, 1) * mean_gray
        return c * b * saturation, offset.expand(-1, 3)


class Mixer:
    """Mixup / CutMix of a training batch (timm's `Mixup`, in batch mode: one mixing ratio per
    batch, each image paired with the batch reversed): mixed images and soft targets, rows of
    class proportions that training.SmoothedCrossEntropy smooths and weights. timm draws from
    numpy's global generator, which the training state saves and restores. An odd batch leaves
    its last image unmixed (timm pairs images two by two)."""

    def __init__(self, mixup: float, cutmix: float, prob: float, num_classes: int):
        from timm.data import Mixup

        # smoothing 0: the loss smooths, so mixed and unmixed batches are smoothed alike
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, label_smoothing=0.0,
                           num_classes=num_classes)
        self.num_classes = num_classes

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = F.one_hot(labels, self.num_classes).float()
        even = len(x) - len(x) % 2
        if even:
            x = x.clone()  # timm mixes in place
            x[:even], targets[:even] = self.mixup(x[:even], labels[:even])
        return x, targets
