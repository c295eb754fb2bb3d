"""Device, precision, the training step's pieces and inference: what train, evaluate, predict
and the benchmark share.

The device is decided here (`resolve_device`), never in a stage; the forward pass runs under
`autocast`, bf16 on the GPU, fp32 on the CPU.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from contextlib import nullcontext
from typing import Any, ContextManager, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hmnist.augment import ModelInput, memory_format
from hmnist.config import CLASSES, TTA
from hmnist.errors import UserError, first_line


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """`auto` is CUDA when present; `cuda:K` the K-th visible GPU; `setting` names where the
    choice came from, for the error."""
    if name.startswith("cuda:") and name[5:].isdigit():
        if int(name[5:]) >= torch.cuda.device_count():
            raise UserError(f"{setting} is {name} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
        return torch.device(name)
    if name not in ("auto", "cuda", "cpu"):
        raise UserError(f"{setting} must be one of auto, cuda, cuda:K, cpu, got {name!r}")
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


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The uint8 NHWC cache as a tensor on `device`, copied once."""
    # a slice of the read-only memory-mapped cache is copied here; a gathered subset already is one
    images = np.ascontiguousarray(images) if images.flags.writeable else np.array(images)
    tensor = torch.from_numpy(images)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """With `enabled`, only deterministic kernels (PyTorch raises on an op that has none), so
    two GPU runs of the same params give the same weights; the previous settings come back
    after. cuBLAS reads its workspace setting when it starts, so this must wrap the first CUDA
    work of the process to take effect there."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    except RuntimeError as e:
        if "deterministic" not in str(e):
            raise
        raise UserError(f"an operation of this model has no deterministic implementation on this device "
                        f"({first_line(e, type(e).__name__)}): set train.deterministic to false") from None
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        if saved[2] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Every random generator a training run draws from: torch's CPU generator (weight init,
    dropout and drop path on the CPU), each CUDA device's (dropout and drop path on the GPU),
    numpy's (timm's Mixup) and the given ones (sampling, augmentation). A resume restores them
    all, so it continues exactly as the uninterrupted run would have."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": _numpy_state(),
                             "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    _set_numpy_state(state["numpy"])
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved.cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _numpy_state() -> dict[str, Any]:
    # as tensors and plain numbers, so that the resume file loads with weights_only=True
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def class_weights(labels: np.ndarray, power: float) -> torch.Tensor:
    """(1 / frequency) ** power, scaled so that the average sample weighs 1."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    weights = np.where(counts > 0, (counts.sum() / np.maximum(counts, 1)) ** power, 0.0)
    weights *= counts.sum() / (weights * counts).sum()
    return torch.tensor(weights, dtype=torch.float32)


class SmoothedCrossEntropy(nn.Module):
    """Per-sample cross-entropy against label-smoothed targets q = (1 - s) t + s / K (t: the
    one-hot label, or Mixup/CutMix's row of class proportions), class-weighted one of two ways:

    - `per_class=True` (`train.balance: loss`): each class's term is weighted by that class's
      weight, sum_c w[c] q_c -log p_c, which is nn.CrossEntropyLoss(weight=w, label_smoothing=s).
      The smoothing mass each sample spreads over the other classes is weighted too, so every
      image pulls the rare classes' probabilities up, and no fit of the training set can undo
      that: the decision boundary moves toward the rare classes, as a logit adjustment would.
    - `per_class=False` (`train.balance: sample_loss`): each sample is weighted by its own
      class, (t . w) sum_c q_c -log p_c, minimised at p = q for every class (calibrated). But a
      network that fits its training set, as a pretrained one does within epochs, is then
      hardly moved by the weights: in a plain loop fine-tuning EfficientNet-Lite0 on real
      images, test balanced accuracy fell from 0.587 to 0.534 against the per-class form
      (BENCHMARKS.md, "Fine-tuning EfficientNet-Lite0").

    Either way the train stage divides the batch's summed loss by the batch's total class
    weight, as nn.CrossEntropyLoss's mean does.
    """

    def __init__(self, weights: torch.Tensor | None, smoothing: float, num_classes: int = len(CLASSES),
                 per_class: bool = True):
        super().__init__()
        self.weights, self.smoothing, self.num_classes, self.per_class = weights, smoothing, num_classes, per_class

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = logits.log_softmax(dim=1)
        if not targets.is_floating_point():
            targets = F.one_hot(targets, self.num_classes).to(log_p.dtype)
        q = (1 - self.smoothing) * targets + self.smoothing / self.num_classes
        if self.weights is None:
            return -(q * log_p).sum(dim=1)
        if self.per_class:
            return -(q * self.weights * log_p).sum(dim=1)
        return -(q * log_p).sum(dim=1) * (targets @ self.weights)


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warmup to the peak, then cosine decay to zero, as a factor of the peak."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None,
                 decay_all: bool = False) -> list[dict[str, Any]]:
    """AdamW groups as timm makes them: no weight decay on biases, norms and whatever the model
    names in `no_weight_decay()` (DeiT's position embedding and class token, Swin's relative
    position bias tables); with `layer_decay`, each layer's learning rate is `lr` times
    layer_decay ** (layers above it), for models that say which layer a parameter is in.
    `decay_all`: the same groups, each with `weight_decay` (train.decay_all)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    if layer_decay is not None and layer_decay < 1 and hasattr(model, "group_matcher"):
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)  # the schedule scales each group's own peak
        if decay_all:
            group["weight_decay"] = weight_decay
    return groups


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """train.schedule: `cosine` (lr_lambda), or `onecycle`: PyTorch's OneCycleLR with its
    defaults (the plain fine-tuning loop's), warming up over the same share of the steps."""
    if schedule == "onecycle" and total_steps >= 3:
        # OneCycleLR divides by each phase's length in steps minus one: at least 2 steps of warmup
        # and 1 after (a run of 1 or 2 steps, as in smoke tests, keeps the cosine schedule)
        warmup = min(max(warmup_steps, 2), total_steps - 1)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, [group["lr"] for group in optimizer.param_groups], total_steps=total_steps,
            pct_start=warmup / total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps))


def backward_batch(model: nn.Module, inputs, targets: torch.Tensor, criterion: nn.Module,
                   loss_weights: torch.Tensor | None, batch: torch.Tensor, micro_batches: int,
                   device: torch.device, shard=lambda rows: rows, ranks: int = 1, mix=None) -> torch.Tensor:
    """Accumulate the gradient of one batch's mean loss over `micro_batches` forward passes;
    with data parallelism, of this rank's `shard` of the batch, out of `ranks`.

    Each micro-batch's summed loss is divided by the whole batch's weight (what a weighted
    mean-reduced cross-entropy divides by), so the gradient is the full batch's, exactly,
    for models without batch statistics. Likewise over ranks: every shard is divided by the
    whole batch's weight (not its own, which differs from shard to shard with class weights
    or unequal shards), and times `ranks`, since DDP averages the ranks' gradients: the
    average is then the sum of the shards' gradients, the whole batch's. Returns this rank's
    part of the batch's loss (the ranks' parts sum to it).

    `mix` (augment.Mixer) turns a micro-batch's inputs and labels into mixed inputs and soft
    targets. It pairs images within the micro-batch (this rank's, when several), which keeps
    the batch's total weight; so with Mixup, micro-batches and processes change which images
    are mixed together.
    """
    labels = targets[batch]
    total_weight = loss_weights[labels].sum() if loss_weights is not None else len(batch)
    total = torch.zeros((), device=targets.device)
    for chunk in shard(batch).tensor_split(micro_batches):
        x, y = inputs(chunk), targets[chunk]
        if mix is not None:
            x, y = mix(x, y)
        with autocast(device):  # the forward pass only; the loss is taken in fp32
            # a metadata model's inputs are (images, metadata) (fusion.py; never mixed: config refuses it)
            logits = model(*x) if isinstance(x, tuple) else model(x)
        loss = criterion(logits.float(), y).sum() / total_weight
        (loss * ranks).backward()
        total += loss.detach()  # stays on the device: a .item() here would stall the GPU every step
    return total


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
        from tqdm import tqdm

        if self.size == 1:
            raise UserError("out of GPU memory even for one image at a time: free the GPU (other processes?) "
                            "or run on the CPU (train.device: cpu, or --device cpu)")
        self.size //= 2
        if not self.halved:
            tqdm.write(f"notice: out of GPU memory in inference; continuing with batches of {self.size} "
                       f"(halved until they fit; same results)", file=sys.stderr)
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
