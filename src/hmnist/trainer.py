"""The training run behind the train stage: `train(params, images, index, split)` fits
`models.${model}` on the train split and returns the model of the epoch `train.select` kept,
with its checkpoint metadata (`stages/train.py` reads the files, writes the checkpoint and
starts the processes).

AdamW with linear warmup and cosine decay, augmentation on the device (and Mixup/CutMix when
set), class imbalance handled by a weighted loss or sampler, label smoothing, optionally an
EMA of the weights: each epoch both the raw and the EMA weights are validated and the better
is that epoch's candidate; or a stochastic weight average (SWA) of the last epochs, which is
then the model kept. The checkpoint keeps the last epoch's (default), the best one's, or
the best by a 3-epoch mean of the validation score (`train.select`). After every epoch the
full training state is saved to the resume path, so an interrupted run continues where it
stopped. Under torchrun (hmnist.distributed, hmnist.collectives) each process trains on its
share of every batch, and rank 0 alone writes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn as nn
from tqdm import tqdm

from hmnist import calibration, collectives, fusion, gpus
from hmnist.augment import Augment, Mixer, ModelInput, memory_format
from hmnist.config import CLASSES, ModelConfig, Params
from hmnist.engine import deterministic, resolve_device, rng_state, set_rng_state
from hmnist.inference import BatchSize, predict_probs
from hmnist.metrics import summary_metrics
from hmnist.models import create_model, data_config
from hmnist.resume import read_state, write_state
from hmnist.selection import Selection, epoch_record, plot_history
from hmnist.train_data import Splits, splits_on_device
from hmnist.training import Optimisation, SmoothedCrossEntropy, epoch_batches, objective

log = logging.getLogger(__name__)


def evaluate_split(model, images, labels, model_input, batch_size, device, metadata=None) -> dict[str, float]:
    return summary_metrics(labels, predict_probs(model, images, model_input, batch_size, device, metadata=metadata))


@dataclass(frozen=True)
class Run:
    """One training run, in parts that each own their state: the splits, how a batch becomes the
    model's input and loss, the optimisation (weights, optimizer, schedule, EMA, micro-batches)
    and the epoch selection. The resume state is the last two's, with the generator's."""
    params: Params
    ranks: collectives.Ranks
    device: torch.device
    data: Splits
    model_input: ModelInput
    generator: torch.Generator  # batch sampling, augmentation and metadata dropout
    augment: Augment | None
    criterion: SmoothedCrossEntropy
    sample_weights: torch.Tensor | None
    mixer: Mixer | None
    batch_size: int
    val_batch_size: BatchSize
    steps_per_epoch: int
    norm: dict[str, Any]  # the model's input mean and std, for the checkpoint
    optimisation: Optimisation
    selection: Selection  # which epoch's weights are kept so far

    @property
    def config(self) -> ModelConfig:
        return self.params.model_config


def train(params: Params, images: np.ndarray, index: pd.DataFrame, split: pd.DataFrame,
          resume_path: Path | None = None, live: Any = None,
          curves: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train the selected model; returns the model of the epoch `train.select` kept and checkpoint metadata."""
    with deterministic(params.train.deterministic):
        run = _setup(params, images, index, split)
        epochs_done = _resume(run, resume_path, live)
        for epoch in range(epochs_done + 1, run.config.epochs + 1):  # numbered from 1
            started = time.perf_counter()
            train_loss = _train_epoch(run, epoch)
            train_seconds = time.perf_counter() - started
            vals = _validate(run)
            record = epoch_record(epoch, train_loss, run.optimisation.lr, vals)
            record["epoch_seconds"] = time.perf_counter() - started
            record["train_images_per_second"] = run.steps_per_epoch * run.batch_size / train_seconds
            _print_epoch(run, record, vals)
            run.selection.update(record, vals, run.optimisation.candidates())
            run.optimisation.end_epoch(epoch)
            if live is not None:
                _log(live, record)
            _save_state(run, resume_path, epoch)
        return _finish(run, images, curves)


def _setup(params: Params, images: np.ndarray, index: pd.DataFrame, split: pd.DataFrame) -> Run:
    """Everything a run needs. The order is part of the result: the model's initialisation
    draws from the seeds set first."""
    config, tc = params.model_config, params.train
    ranks = collectives.ranks()
    device = gpus.device(tc.device, ranks, resolve_device(tc.device))
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    data = splits_on_device(params, images, index, split, device)
    model = fusion.fuse(create_model(config), data.encoding, len(CLASSES))
    model = model.to(device).to(memory_format=memory_format(device, config.arch))
    norm = data_config(model)
    if ranks.main and config.resize > images.shape[1]:
        log.info(upsampling_notice(params.model, config.resize, images.shape[1]))
    generator = torch.Generator(device=device).manual_seed(tc.seed + 1)
    augment = Augment(generator, (tc.crop_area_min, 1.0), tc.rotation, tc.color_jitter) if tc.augment else None
    criterion, sample_weights = objective(tc, data.train_labels)
    mixing = (tc.mixup > 0 or tc.cutmix > 0) and tc.mixup_prob > 0
    mixer = Mixer(tc.mixup, tc.cutmix, tc.mixup_prob, len(CLASSES)) if mixing else None
    batch_size = collectives.shared_batch_size(params, len(data.train_labels), ranks.world)
    steps_per_epoch = max(1, len(data.train_labels) // batch_size)
    return Run(params=params, ranks=ranks, device=device, data=data,
               model_input=ModelInput(config.resize, norm["mean"], norm["std"], device, config.arch),
               generator=generator, augment=augment, criterion=criterion, sample_weights=sample_weights,
               mixer=mixer, batch_size=batch_size,
               # inference keeps no activations for backward: twice the training batch fits where
               # it does (and predict_probs halves it if not), and the batch size does not change the result
               val_batch_size=BatchSize(2 * config.batch_size), steps_per_epoch=steps_per_epoch, norm=norm,
               optimisation=Optimisation(params, model, device, ranks, steps_per_epoch),
               selection=Selection(tc.select, config.epochs))


def upsampling_notice(model: str, resize: int, cache_side: int) -> str:
    """Said once per run, not refused: upsampling adds no detail and costs time, but a pretrained
    model fine-tuned at its pretraining size from a smaller cache is a choice someone may make."""
    return (f"notice: models.{model}.resize is {resize} but the prepared images are {cache_side} px (prepare.size): "
            f"the model trains on them upsampled, with no more detail than {cache_side} px, at "
            f"{(resize / cache_side) ** 2:.1f}x the pixels per image; for the detail set prepare.size to {resize}, "
            f"for the speed models.{model}.resize to {cache_side}")


def _resume(run: Run, resume_path: Path | None, live: Any) -> int:
    """Continue from the state saved after the last finished epoch, if there is one; returns
    the epochs it had done (0: none)."""
    state = read_state(resume_path, run.ranks)
    if state is None:
        return 0
    run.optimisation.load_state_dict(state)
    rng = state["rng"]  # one per rank when several (their dropout draws differ)
    set_rng_state(rng[run.ranks.rank] if isinstance(rng, list) else rng, run.generator)
    run.selection.load_state_dict(state)
    if run.ranks.main:
        log.info(f"resuming after epoch {state['epochs_done']} of {run.config.epochs} from {resume_path}")
    if live is not None:
        for record in run.selection.history.epochs:  # DVC deleted the old plots: write them again
            _log(live, record)
    return state["epochs_done"]


def _train_epoch(run: Run, epoch: int) -> float:
    """One pass over the train split; returns its mean loss over every rank's share."""
    run.optimisation.model.train()
    losses = []
    batches = epoch_batches(len(run.data.train_labels), run.batch_size, run.generator, run.sample_weights)
    bar = tqdm(batches, total=run.steps_per_epoch, desc=f"epoch {epoch}/{run.config.epochs}", unit="batch",
               disable=not run.ranks.main)
    for i, batch in enumerate(bar):
        losses.append(_train_step(run, batch))
        if i % 20 == 0:  # reading the loss waits for the GPU: not every step
            bar.set_postfix(loss=f"{losses[-1].item() * run.ranks.world:.3f}")
    return collectives.all_sum(torch.stack(losses).mean()).item()  # the ranks' parts of each batch's loss


def _train_step(run: Run, batch: torch.Tensor) -> torch.Tensor:
    """One optimizer step on `batch` (rows of the train split); returns this rank's part of its loss."""
    data = run.data
    # the whole batch's augmentation, drawn on every rank and sliced: the same whatever the
    # number of processes (and micro-batches)
    draws = run.augment.draw(len(batch)) if run.augment is not None else None
    # a metadata model's rows, whole fields dropped at random: drawn for the whole batch, as the augmentation
    metadata = None if data.encoding is None else fusion.drop_fields(
        data.train_metadata[batch], data.encoding, run.config.metadata_dropout, run.generator)

    def inputs(at: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # positions in the batch
        x = run.model_input(data.train_images[batch[at]], run.augment, None if draws is None else draws[at])
        return x if metadata is None else (x, metadata[at])

    return run.optimisation.step(inputs, data.train_labels[batch], run.criterion, run.mixer)


def _validate(run: Run) -> dict[str, dict[str, float]]:
    """Each candidate's validation metrics: rank 0 computes them, and every rank receives them,
    so that every rank keeps the same epoch and weights."""
    data = run.data
    vals = {name: evaluate_split(model, data.val_images, data.val_labels, run.model_input, run.val_batch_size,
                                 run.device, data.val_metadata)
            for name, model in run.optimisation.candidates().items()} if run.ranks.main else None
    return collectives.from_main(vals)


def _print_epoch(run: Run, record: dict[str, float], vals: dict[str, dict[str, float]]) -> None:
    if not run.ranks.main:
        return
    for name, val in vals.items():
        log.info(f"epoch {record['epoch']}{' EMA' if name == 'ema' else ''}: train loss {record['train/loss']:.4f}, "
                 f"val loss {val['loss']:.4f}, accuracy {val['accuracy']:.4f}, "
                 f"balanced accuracy {val['balanced_accuracy']:.4f}")


def _save_state(run: Run, resume_path: Path | None, epoch: int) -> None:
    """The whole training state after `epoch` (from 1): each part's own, and the generators'."""
    # every rank's generator state, gathered on every rank (a collective: all take part)
    rng = collectives.gather(rng_state(run.generator)) if run.ranks.world > 1 else rng_state(run.generator)
    if resume_path is None or not run.ranks.main:
        return
    write_state(resume_path, {**run.optimisation.state_dict(), "rng": rng, **run.selection.state_dict(),
                              "epochs_done": epoch})


def calibrate(run: Run, model: nn.Module) -> dict[str, Any]:
    """The kept `model`'s calibration and operating points, fitted on the validation split's
    probabilities (averaged over the model's TTA views, as evaluate and predict will see them)."""
    tc, data = run.params.train, run.data
    probs = predict_probs(model, data.val_images, run.model_input, run.val_batch_size, run.device,
                          tta=run.config.tta, metadata=data.val_metadata)
    fitted, held_out = calibration.choose(probs, data.val_labels, data.val_lesions, tc.calibration)
    calibrated = calibration.apply(probs, fitted)
    return {"tta": run.config.tta, "calibration": fitted,
            "calibration_held_out_nll": held_out,  # auto: each method's NLL on held-out validation lesions
            "val_nll_uncalibrated": calibration.nll(probs, data.val_labels),
            "val_nll": calibration.nll(calibrated, data.val_labels),
            "operating_points": calibration.operating_points(calibrated, data.val_labels, tc.operating_points)}


def _finish(run: Run, images: np.ndarray, curves: Path | None) -> tuple[nn.Module, dict[str, Any]]:
    """The kept weights loaded, the curves drawn, the calibration fitted, and the checkpoint's
    metadata: how the model was made."""
    params, config, history = run.params, run.config, run.selection.history
    model = run.optimisation.kept(run.selection.best_state)
    best = history.record(history.best_epoch)
    prefix = "val" if history.best_weights == "raw" else "val_ema"
    kept = {"kept_weights": history.best_weights,  # raw, ema (the moving average's), or swa
            "val_balanced_accuracy": best[f"{prefix}/balanced_accuracy"], "val_accuracy": best[f"{prefix}/accuracy"]}
    if run.optimisation.swa is not None and run.ranks.main:  # only rank 0 writes the checkpoint
        model, kept = _averaged(run)
    fitted = calibrate(run, model) if run.ranks.main else {}
    if curves is not None and run.ranks.main:
        plot_history(history, curves)
    meta = {
        "model_name": params.model,
        "arch": config.arch,
        "model_config": asdict(config),
        "classes": list(CLASSES),
        "input_size": config.resize,
        "prepare_size": int(images.shape[1]),
        "mean": list(run.norm["mean"]),
        "std": list(run.norm["std"]),
        # the params this stage reads (dvc.yaml), not the whole file: the checkpoint must not
        # claim settings, such as data.source, that DVC does not re-run training for
        "params": {"model": params.model, f"models.{params.model}": asdict(config), "train": asdict(params.train)},
        "best_epoch": history.best_epoch,
        **kept,
        "effective_batch_size": run.batch_size,
        "micro_batches": run.optimisation.accum,
        "processes": run.ranks.world,
        "train_images_per_second": float(np.median([r["train_images_per_second"] for r in history.epochs])),
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
        **fitted,
        # a metadata model's field encoding (absent for an image-only model: readers take that as one)
        **({"metadata": run.data.encoding.to_checkpoint()} if run.data.encoding is not None else {}),
    }
    return model, meta


def _averaged(run: Run) -> tuple[nn.Module, dict[str, Any]]:
    """The SWA model, its BatchNorm statistics taken over the train split (without
    augmentation or metadata dropout), and its validation figures."""
    data, optimisation = run.data, run.optimisation

    def batches():
        for rows in torch.arange(len(data.train_labels), device=data.train_labels.device).split(run.batch_size):
            x = run.model_input(data.train_images[rows])  # not augmented
            yield x if data.encoding is None else (x, data.train_metadata[rows])

    model = optimisation.averaged(batches())
    val = evaluate_split(model, data.val_images, data.val_labels, run.model_input, run.val_batch_size, run.device,
                         data.val_metadata)
    first = optimisation.scheduled_epochs + 1
    log.info(f"weights averaged over epochs {first}-{run.config.epochs} (SWA): val loss {val['loss']:.4f}, "
             f"accuracy {val['accuracy']:.4f}, balanced accuracy {val['balanced_accuracy']:.4f}")
    return model, {"kept_weights": "swa", "swa_epochs": list(range(first, run.config.epochs + 1)),
                   "val_balanced_accuracy": val["balanced_accuracy"], "val_accuracy": val["accuracy"]}


def _log(live: Any, record: dict[str, float]) -> None:
    for key, value in record.items():
        # wall time varies run to run: keep it out of the metrics, so same params give same metrics
        if key not in ("epoch", "epoch_seconds", "train_images_per_second"):
            live.log_metric(key, value)
    live.next_step()
