"""The training step's pieces: class weights, the smoothed and weighted loss, the learning-rate
schedule, the optimizer's parameter groups, one batch's backward pass in micro-batches, an
epoch's batches, and `Optimisation`, the one owner of what an optimizer step changes.
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.optim.swa_utils import AveragedModel, update_bn

from hmnist.collectives import Ranks, data_parallel
from hmnist.config import CLASSES, Params, TrainConfig
from hmnist.engine import autocast
from hmnist.errors import UserError

if TYPE_CHECKING:
    from hmnist.augment import Mixer


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
      images, it lost test balanced accuracy against the per-class form (the figures:
      BENCHMARKS.md, "Fine-tuning EfficientNet-Lite0").

    Either way the train stage divides the batch's summed loss by the batch's total class
    weight (`total_weight`), as nn.CrossEntropyLoss's mean does.
    """

    def __init__(self, weights: torch.Tensor | None, smoothing: float, num_classes: int = len(CLASSES),
                 per_class: bool = True):
        super().__init__()
        self.weights, self.smoothing, self.num_classes, self.per_class = weights, smoothing, num_classes, per_class

    def total_weight(self, labels: torch.Tensor) -> torch.Tensor | int:
        """What a batch with these labels divides its summed loss by: its total class weight
        (the number of images when unweighted)."""
        return self.weights[labels].sum() if self.weights is not None else len(labels)

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


def objective(tc: TrainConfig, train_labels: torch.Tensor) -> tuple[SmoothedCrossEntropy, torch.Tensor | None]:
    """The loss, and the sampler's weight for each train image: class imbalance weighs on one or
    the other, or on neither (train.balance)."""
    weights = class_weights(train_labels.cpu().numpy(), tc.balance_power).to(train_labels.device)
    loss_weights = weights if tc.balance in ("loss", "sample_loss") else None
    criterion = SmoothedCrossEntropy(loss_weights, tc.label_smoothing, per_class=tc.balance == "loss")
    return criterion, weights[train_labels] if tc.balance == "sampler" else None


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


def backward_batch(model: nn.Module, inputs: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                   criterion: SmoothedCrossEntropy, micro_batches: int, device: torch.device,
                   ranks: Ranks = Ranks(), mix: Mixer | None = None) -> torch.Tensor:
    """Accumulate the gradient of one batch's mean loss over `micro_batches` forward passes;
    with data parallelism, of this rank's share of the batch (`ranks.shard`).

    `labels`: the whole batch's; `inputs(positions)`: the model's input for those positions of
    the batch (a micro-batch of this rank's share). Each micro-batch's summed loss is divided by
    the whole batch's weight (`criterion.total_weight`, what a weighted mean-reduced
    cross-entropy divides by), so the gradient is the full batch's, exactly, for models without
    batch statistics. Likewise over ranks: every shard is divided by the whole batch's weight
    (not its own, which differs from shard to shard with class weights or unequal shards), and
    times the number of ranks, since DDP averages the ranks' gradients: the average is then the
    sum of the shards' gradients, the whole batch's. Returns this rank's part of the batch's
    loss (the ranks' parts sum to it).

    `mix` (augment.Mixer) turns a micro-batch's inputs and labels into mixed inputs and soft
    targets. It pairs images within the micro-batch (this rank's, when several), which keeps
    the batch's total weight; so with Mixup, micro-batches and processes change which images
    are mixed together.
    """
    total_weight = criterion.total_weight(labels)
    total = torch.zeros((), device=labels.device)
    positions = torch.arange(len(labels), device=labels.device)
    for chunk in ranks.shard(positions).tensor_split(micro_batches):
        x, y = inputs(chunk), labels[chunk]
        if mix is not None:
            x, y = mix(x, y)
        with autocast(device):  # the forward pass only; the loss is taken in fp32
            # a metadata model's inputs are (images, metadata) (fusion.py; never mixed: config refuses it)
            logits = model(*x) if isinstance(x, tuple) else model(x)
        loss = criterion(logits.float(), y).sum() / total_weight
        (loss * ranks.world).backward()
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


def own(params: Params, key: str) -> Any:
    """The model's own `key` (warmup_epochs, schedule, decay_all, clip_grad) when its entry sets
    one, else the train block's."""
    value = getattr(params.model_config, key)
    return getattr(params.train, key) if value is None else value


class _Unpacked(nn.Module):
    """`model` called with a dict's "inputs" unpacked: torch's update_bn passes a loader's tuples
    on as their first item only, which would drop a metadata model's second input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(*batch["inputs"])


class Optimisation:
    """What an optimizer step changes, owned here alone: the weights and their moving average
    (EMA) or stochastic weight average (SWA), the optimizer and its schedule, and the
    micro-batches per batch. The resume state saves and restores it whole (`state_dict`).

    With `train.swa_epochs` N, the schedule spans the model's first epochs - N epochs; the last
    N run at a constant `train.swa_lr` times each group's peak rate, and `end_epoch` adds the
    weights after each of them to the average."""

    def __init__(self, params: Params, model: nn.Module, device: torch.device, ranks: Ranks, steps_per_epoch: int):
        config, tc = params.model_config, params.train
        self.params, self.model, self.device, self.ranks = params, model, device, ranks
        groups = param_groups(model, config.lr, config.weight_decay, config.layer_decay, own(params, "decay_all"))
        self.swa_lrs = [tc.swa_lr * group["lr"] for group in groups]  # each group's own peak, scaled
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=device.type == "cuda")
        self.scheduled_epochs = config.epochs - tc.swa_epochs
        self.scheduled_steps = self.scheduled_epochs * steps_per_epoch
        self.scheduler = make_scheduler(self.optimizer, own(params, "schedule"),
                                        round(own(params, "warmup_epochs") * steps_per_epoch), self.scheduled_steps)
        # the model as the step calls it: wrapped by DDP, compiled when set
        step_model = data_parallel(model, device, ranks)
        self.step_model = torch.compile(step_model) if tc.compile else step_model
        self.ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True) if tc.ema_decay > 0 else None
        self.swa = AveragedModel(model) if tc.swa_epochs > 0 else None
        self.accum = 1  # micro-batches per batch: doubles when the GPU runs out of memory

    def step(self, inputs: Callable[[torch.Tensor], Any], labels: torch.Tensor, criterion: SmoothedCrossEntropy,
             mix: Mixer | None = None) -> torch.Tensor:
        """One optimizer step on a batch (`inputs` and `labels` as backward_batch takes them);
        on running out of GPU memory, the same step again in twice as many micro-batches.
        Returns this rank's part of the batch's loss."""
        while True:
            try:
                loss = backward_batch(self.step_model, inputs, labels, criterion, self.accum,
                                      self.device, self.ranks, mix)
                self._update()
                return loss
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                self._more_micro_batches(len(labels))

    def _update(self) -> None:
        """The optimizer's step from the accumulated gradient, the schedule's, and the EMA's."""
        clip = own(self.params, "clip_grad")
        if clip > 0:  # after DDP's all-reduce: every rank clips the same gradient
            dispatch_clip_grad(self.model.parameters(), clip, mode=self.params.train.clip_mode)
        # the scheduler counts its own steps (resumed with it) and stops at the schedule's end:
        # OneCycleLR refuses a step past its total. After it, SWA's constant rate
        scheduled = self.scheduler.last_epoch < self.scheduled_steps
        if not scheduled:
            for group, lr in zip(self.optimizer.param_groups, self.swa_lrs):
                group["lr"] = lr
        self.optimizer.step()
        if scheduled:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # free the gradients now, not at the next step
        if self.ema is not None:
            self.ema.update(self.model, step=self.scheduler.last_epoch)  # optimizer steps so far, resumed with it

    def _more_micro_batches(self, batch: int) -> None:
        """Twice the micro-batches, after running out of GPU memory on a batch of `batch` images;
        a user error where that cannot help."""
        config, ranks = self.params.model_config, self.ranks
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if ranks.world > 1:  # the ranks would have to agree on micro-batches mid-step
            raise UserError(f"out of GPU memory at {math.ceil(batch / ranks.world)} images per GPU for "
                            f"{config.arch}: lower models.{self.params.model}.batch_size or train on more GPUs")
        if batch // self.accum <= 1:
            raise UserError(f"out of GPU memory even with micro-batches of 1 for {config.arch} "
                            f"at {config.resize}px: lower resize or use a smaller model") from None
        self.accum *= 2
        print(f"notice: out of GPU memory at batch {batch}; continuing with {self.accum} micro-batches "
              f"of {math.ceil(batch / self.accum)} and gradient accumulation (same effective batch)",
              file=sys.stderr)

    def end_epoch(self, epoch: int) -> None:
        """After epoch `epoch` (from 1): in the SWA epochs, add the weights to the average."""
        if self.swa is not None and epoch > self.scheduled_epochs:
            self.swa.update_parameters(self.model)

    def averaged(self, batches: Iterable[Any]) -> nn.Module:
        """The SWA model in eval mode, its BatchNorm statistics recomputed over `batches` (the
        model's inputs: images, or (images, metadata)): averaged weights need their own
        statistics, which neither snapshot's running ones are."""
        module = self.swa.module
        update_bn(({"inputs": x if isinstance(x, tuple) else (x,)} for x in batches), _Unpacked(module))
        return module.eval()

    @property
    def lr(self) -> float:
        """The learning rate of the last step (the first group's)."""
        return self.optimizer.param_groups[0]["lr"]

    def candidates(self) -> dict[str, nn.Module]:
        """The weight sets to validate: the trained ones, and their moving average when there is one."""
        return {"raw": self.model} if self.ema is None else {"raw": self.model, "ema": self.ema.module}

    def kept(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        """The model with `weights` loaded (the epoch that training kept), in eval mode."""
        self.model.load_state_dict(weights)
        return self.model.eval()

    def state_dict(self) -> dict[str, Any]:
        """Its part of the resume state, under the resume file's keys."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "accum": self.accum,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "swa": self.swa.state_dict() if self.swa is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.swa is not None:
            self.swa.load_state_dict(state["swa"])
        self.accum = state["accum"]
