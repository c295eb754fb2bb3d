"""Stage `train`: fit `models.${model}` on the train split, keep the epoch `train.select` picks.

AdamW with linear warmup and cosine decay, augmentation on the device (and Mixup/CutMix when
set), class imbalance handled by a weighted loss or sampler, label smoothing, optionally an
EMA of the weights: each epoch both the raw and the EMA weights are validated and the better
is that epoch's candidate. The checkpoint keeps the last epoch's (default), the best one's, or
the best by a 3-epoch mean of the validation score (`train.select`). After every epoch the
full training state is saved under models/.resume/, so an interrupted run continues where it
stopped. With `train.devices` above 1, the stage starts one process per device through
torchrun (hmnist.distributed, hmnist.collectives); each trains on its share of every batch, and rank 0 alone writes.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3, dispatch_clip_grad
from tqdm import tqdm

from hmnist import calibration, collectives, distributed, fusion, gpus
from hmnist.augment import Augment, Mixer, ModelInput, memory_format
from hmnist.config import CLASSES, ModelConfig, Params, load_params
from hmnist.data import PREPARED, fold_paths, fold_split, load_folds, load_prepared, load_split, split_rows
from hmnist.engine import deterministic, resolve_device, rng_state, set_rng_state, to_device
from hmnist.inference import BatchSize, predict_probs
from hmnist.training import (SmoothedCrossEntropy, backward_batch, class_weights, epoch_batches, make_scheduler,
                             param_groups)
from hmnist.errors import UserError, cli
from hmnist.metrics import summary_metrics
from hmnist.models import create_model, data_config, save_checkpoint
from hmnist.selection import Selection


def evaluate_split(model, images, labels, model_input, batch_size, device, metadata=None) -> dict[str, float]:
    return summary_metrics(labels, predict_probs(model, images, model_input, batch_size, device, metadata=metadata))


def own(params: Params, key: str) -> Any:
    """The model's own `key` (warmup_epochs, schedule, decay_all, clip_grad) when its entry sets
    one, else the train block's."""
    value = getattr(params.model_config, key)
    return getattr(params.train, key) if value is None else value


def resume_key(params: Params, split: pd.DataFrame, cache_shape: tuple[int, ...]) -> str:
    """Which run a saved state belongs to: same params, same split, same cache size."""
    # what is fitted after the last epoch does not change the epochs: a state survives a change to it
    after = ("calibration", "operating_points")
    train = {k: v for k, v in asdict(params.train).items() if k not in after}
    config = {k: v for k, v in asdict(params.model_config).items() if k != "tta"}
    # "state": the resume file's format (2: epochs counted from 1), so a state of another is never resumed
    payload = json.dumps({"model": params.model, "config": config, "train": train, "cache": list(cache_shape),
                          "state": 2}, sort_keys=True)
    digest = hashlib.sha256(payload.encode())
    digest.update(pd.util.hash_pandas_object(split, index=False).values.tobytes())
    return digest.hexdigest()[:16]


def shared_batch_size(params: Params, train_images: int, processes: int) -> int:
    """The global batch (at most the training set), which each of `processes` needs a share of."""
    batch_size = min(params.model_config.batch_size, train_images)
    if batch_size < processes:
        raise UserError(f"a batch of {batch_size} cannot be shared by {processes} processes: "
                        f"raise models.{params.model}.batch_size or lower train.devices")
    return batch_size


@dataclass
class Run:
    """One training run: its data and objective on the device, what it trains, and how far it has
    got (the last three fields, with the weights, optimizer and random state, are what the resume
    state saves)."""
    params: Params
    ranks: collectives.Ranks
    device: torch.device
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: np.ndarray
    val_lesions: np.ndarray  # the calibration's held-out folds are whole lesions
    model_input: ModelInput
    generator: torch.Generator  # batch sampling and augmentation
    augment: Augment | None
    criterion: SmoothedCrossEntropy
    sample_weights: torch.Tensor | None
    mixer: Mixer | None
    batch_size: int
    val_batch_size: BatchSize
    steps_per_epoch: int
    model: nn.Module
    step_model: nn.Module  # the model as the train step calls it: wrapped by DDP, compiled when set
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ModelEmaV3 | None
    norm: dict[str, Any]  # the model's input mean and std, for the checkpoint
    selection: Selection  # which epoch's weights are kept so far
    epochs_done: int = 0
    accum: int = 1  # micro-batches per batch: doubles when the GPU runs out of memory
    # a metadata model's (models.<name>.metadata) encoding, fitted on the train split, and the
    # train and val splits' encoded rows on the device; None for an image-only model
    encoding: fusion.Encoding | None = None
    train_metadata: torch.Tensor | None = None
    val_metadata: torch.Tensor | None = None

    @property
    def config(self) -> ModelConfig:
        return self.params.model_config


def train(params: Params, images: np.ndarray, index: pd.DataFrame, split: pd.DataFrame,
          resume_path: Path | None = None, live: Any = None,
          curves: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train the selected model; returns the model of the epoch `train.select` kept and checkpoint metadata."""
    with deterministic(params.train.deterministic):
        run = _setup(params, images, index, split)
        _resume(run, resume_path, live)
        for epoch in range(run.epochs_done + 1, run.config.epochs + 1):  # numbered from 1
            started = time.perf_counter()
            train_loss = _train_epoch(run, epoch)
            train_seconds = time.perf_counter() - started
            vals = _validate(run)
            record = epoch_record(epoch, train_loss, run.scheduler.get_last_lr()[0], vals)
            record["epoch_seconds"] = time.perf_counter() - started
            record["train_images_per_second"] = run.steps_per_epoch * run.batch_size / train_seconds
            run.selection.history.epochs.append(record)
            _print_epoch(run, record, vals)
            run.selection.update(epoch, vals, _candidates(run))
            if live is not None:
                _log(live, record)
            _save_state(run, resume_path, epoch)
        return _finish(run, images, curves)


def epoch_record(epoch: int, train_loss: float, lr: float, vals: dict[str, dict[str, float]]) -> dict[str, float]:
    """What the curves and the resume state keep of an epoch: its loss, learning rate and each
    weight set's validation metrics (`val/...` the trained weights', `val_ema/...` their EMA's)."""
    record = {"epoch": epoch, "train/loss": train_loss, "lr": lr}
    for name, val in vals.items():
        prefix = "val" if name == "raw" else "val_ema"
        record.update({f"{prefix}/{key}": value for key, value in val.items()})
    return record


def _setup(params: Params, images: np.ndarray, index: pd.DataFrame, split: pd.DataFrame) -> Run:
    """Everything a run needs. The order is part of the result: the model's initialisation
    draws from the seeds set first."""
    config, tc = params.model_config, params.train
    ranks = collectives.ranks()
    device = gpus.device(tc.device, ranks, resolve_device(tc.device))
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)

    labels = index["label"].to_numpy().astype(np.int64)
    train_rows, val_rows = split_rows(index, split, "train"), split_rows(index, split, "val")
    check_operating_points(params, labels[val_rows])  # before any training: a threshold needs positives
    train_images, val_images = to_device(images[train_rows], device), to_device(images[val_rows], device)
    train_labels = torch.from_numpy(labels[train_rows]).to(device)

    encoding = (fusion.Encoding.fit(index.iloc[train_rows], config.metadata, config.metadata_dropout)
                if config.metadata else None)
    model = fusion.fuse(create_model(config), encoding, len(CLASSES))
    model = model.to(device).to(memory_format=memory_format(device, config.arch))
    norm = data_config(model)
    model_input = ModelInput(config.resize, norm["mean"], norm["std"], device, config.arch)
    if ranks.main and config.resize > images.shape[1]:
        print(upsampling_notice(params.model, config.resize, images.shape[1]), file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(tc.seed + 1)
    augment = Augment(generator, (tc.crop_area_min, 1.0), tc.rotation, tc.color_jitter) if tc.augment else None

    weights = class_weights(labels[train_rows], tc.balance_power).to(device)
    loss_weights = weights if tc.balance in ("loss", "sample_loss") else None
    criterion = SmoothedCrossEntropy(loss_weights, tc.label_smoothing, per_class=tc.balance == "loss")
    sample_weights = weights[train_labels] if tc.balance == "sampler" else None
    mixing = (tc.mixup > 0 or tc.cutmix > 0) and tc.mixup_prob > 0
    mixer = Mixer(tc.mixup, tc.cutmix, tc.mixup_prob, len(CLASSES)) if mixing else None

    batch_size = shared_batch_size(params, len(train_rows), ranks.world)
    steps_per_epoch = max(1, len(train_rows) // batch_size)
    optimizer = torch.optim.AdamW(param_groups(model, config.lr, config.weight_decay, config.layer_decay,
                                               own(params, "decay_all")),
                                  lr=config.lr, fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, own(params, "schedule"), round(own(params, "warmup_epochs") * steps_per_epoch),
                               config.epochs * steps_per_epoch)
    step_model = collectives.data_parallel(model, device, ranks)
    step_model = torch.compile(step_model) if tc.compile else step_model
    ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True) if tc.ema_decay > 0 else None
    return Run(params=params, ranks=ranks, device=device, train_images=train_images, train_labels=train_labels,
               val_images=val_images, val_labels=labels[val_rows], val_lesions=index["lesion_id"].to_numpy()[val_rows],
               model_input=model_input, generator=generator,
               augment=augment, criterion=criterion, sample_weights=sample_weights,
               mixer=mixer, batch_size=batch_size,
               # inference keeps no activations for backward: twice the training batch fits where
               # it does (and predict_probs halves it if not), and the batch size does not change the result
               val_batch_size=BatchSize(2 * config.batch_size), steps_per_epoch=steps_per_epoch,
               model=model, step_model=step_model, optimizer=optimizer, scheduler=scheduler, ema=ema, norm=norm,
               encoding=encoding, **_encoded(encoding, index, {"train_metadata": train_rows, "val_metadata": val_rows},
                                             device),
               selection=Selection(tc.select, config.epochs))


def _encoded(encoding: fusion.Encoding | None, index: pd.DataFrame, rows: dict[str, np.ndarray],
             device: torch.device) -> dict[str, torch.Tensor | None]:
    return {name: None if encoding is None else torch.from_numpy(encoding.encode(index.iloc[r])).to(device)
            for name, r in rows.items()}


def upsampling_notice(model: str, resize: int, cache_side: int) -> str:
    """Said once per run, not refused: upsampling adds no detail and costs time, but a pretrained
    model fine-tuned at its pretraining size from a smaller cache is a choice someone may make."""
    return (f"notice: models.{model}.resize is {resize} but the prepared images are {cache_side} px (prepare.size): "
            f"the model trains on them upsampled, with no more detail than {cache_side} px, at "
            f"{(resize / cache_side) ** 2:.1f}x the pixels per image; for the detail set prepare.size to {resize}, "
            f"for the speed models.{model}.resize to {cache_side}")


def _resume(run: Run, resume_path: Path | None, live: Any) -> None:
    """Continue from the state saved after the last finished epoch, if there is one."""
    state = None
    if resume_path is not None and resume_path.exists() and run.ranks.main:
        state = torch.load(resume_path, map_location="cpu", weights_only=True)  # loading copies to the device
    state = collectives.from_main(state)  # rank 0's: every rank resumes alike, on other machines too
    if state is None:
        return
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    rng = state["rng"]  # one per rank when several (their dropout draws differ)
    set_rng_state(rng[run.ranks.rank] if isinstance(rng, list) else rng, run.generator)
    run.selection.load_state_dict(state)
    run.epochs_done, run.accum = state["epochs_done"], state["accum"]
    if run.ranks.main:
        print(f"resuming after epoch {run.epochs_done} of {run.config.epochs} from {resume_path}", file=sys.stderr)
    if live is not None:
        for record in run.selection.history.epochs:  # DVC deleted the old plots: write them again
            _log(live, record)


def _train_epoch(run: Run, epoch: int) -> float:
    """One pass over the train split; returns its mean loss over every rank's share."""
    run.model.train()
    losses = []
    batches = epoch_batches(len(run.train_labels), run.batch_size, run.generator, run.sample_weights)
    bar = tqdm(batches, total=run.steps_per_epoch, desc=f"epoch {epoch}/{run.config.epochs}", unit="batch",
               disable=not run.ranks.main)
    for i, batch in enumerate(bar):
        losses.append(_train_step(run, batch))
        if i % 20 == 0:  # reading the loss waits for the GPU: not every step
            bar.set_postfix(loss=f"{losses[-1].item() * run.ranks.world:.3f}")
    return collectives.all_sum(torch.stack(losses).mean()).item()  # the ranks' parts of each batch's loss


def _train_step(run: Run, batch: torch.Tensor) -> torch.Tensor:
    """One optimizer step on `batch` (rows of the train split); on running out of GPU memory,
    the same step again in twice as many micro-batches."""
    config, tc, ranks = run.config, run.params.train, run.ranks
    # the whole batch's augmentation, drawn on every rank and sliced: the same whatever the
    # number of processes (and micro-batches)
    draws = run.augment.draw(len(batch)) if run.augment is not None else None
    labels = run.train_labels[batch]
    # a metadata model's rows, whole fields dropped at random: drawn for the whole batch, as the augmentation
    metadata = None if run.encoding is None else fusion.drop_fields(
        run.train_metadata[batch], run.encoding, config.metadata_dropout, run.generator)

    def inputs(at: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # positions in the batch
        x = run.model_input(run.train_images[batch[at]], run.augment, None if draws is None else draws[at])
        return x if metadata is None else (x, metadata[at])

    while True:
        try:
            loss = backward_batch(run.step_model, inputs, labels, run.criterion, run.accum, run.device, ranks,
                                  run.mixer)
            clip = own(run.params, "clip_grad")
            if clip > 0:  # after DDP's all-reduce: every rank clips the same gradient
                dispatch_clip_grad(run.model.parameters(), clip, mode=tc.clip_mode)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)  # free the gradients now, not at the next step
            if run.ema is not None:
                run.ema.update(run.model, step=run.scheduler.last_epoch)  # optimizer steps so far, resumed with it
            return loss
        except torch.OutOfMemoryError:
            run.optimizer.zero_grad(set_to_none=True)
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
            if ranks.world > 1:  # the ranks would have to agree on micro-batches mid-step
                raise UserError(f"out of GPU memory at {math.ceil(len(batch) / ranks.world)} images per GPU for "
                                f"{config.arch}: lower models.{run.params.model}.batch_size or train on more GPUs")
            if len(batch) // run.accum <= 1:
                raise UserError(f"out of GPU memory even with micro-batches of 1 for {config.arch} "
                                f"at {config.resize}px: lower resize or use a smaller model") from None
            run.accum *= 2
            print(f"notice: out of GPU memory at batch {len(batch)}; continuing with {run.accum} micro-batches "
                  f"of {math.ceil(len(batch) / run.accum)} and gradient accumulation (same effective batch)",
                  file=sys.stderr)


def _candidates(run: Run) -> dict[str, nn.Module]:
    """The epoch's two weight sets: the trained ones, and their moving average when there is one."""
    return {"raw": run.model} if run.ema is None else {"raw": run.model, "ema": run.ema.module}


def _validate(run: Run) -> dict[str, dict[str, float]]:
    """Each candidate's validation metrics: rank 0 computes them, and every rank receives them,
    so that every rank keeps the same epoch and weights."""
    vals = {name: evaluate_split(model, run.val_images, run.val_labels, run.model_input, run.val_batch_size,
                                 run.device, run.val_metadata)
            for name, model in _candidates(run).items()} if run.ranks.main else None
    return collectives.from_main(vals)


def _print_epoch(run: Run, record: dict[str, float], vals: dict[str, dict[str, float]]) -> None:
    if not run.ranks.main:
        return
    for name, val in vals.items():
        print(f"epoch {record['epoch']}{' EMA' if name == 'ema' else ''}: train loss {record['train/loss']:.4f}, "
              f"val loss {val['loss']:.4f}, accuracy {val['accuracy']:.4f}, "
              f"balanced accuracy {val['balanced_accuracy']:.4f}", file=sys.stderr)


def _save_state(run: Run, resume_path: Path | None, epoch: int) -> None:
    """The whole training state after `epoch` (from 1), written whole or not at all (an interrupted
    write leaves the previous state)."""
    # every rank's generator state, gathered on every rank (a collective: all take part)
    rng = collectives.gather(rng_state(run.generator)) if run.ranks.world > 1 else rng_state(run.generator)
    if resume_path is None or not run.ranks.main:
        return
    resume_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), "rng": rng,
                **run.selection.state_dict(), "epochs_done": epoch, "accum": run.accum,
                "ema": run.ema.state_dict() if run.ema is not None else None},
               resume_path.with_suffix(".tmp"))
    resume_path.with_suffix(".tmp").replace(resume_path)


def check_operating_points(params: Params, val_labels: np.ndarray) -> None:
    for i, op in enumerate(params.train.operating_points):
        if not calibration.positives_of(val_labels, op.classes).any():
            raise UserError(f"train.operating_points[{i}] ({op.name}): the validation split has no image of "
                            f"{', '.join(op.classes)} to choose its threshold on: use more images, or remove it")


def calibrate(run: Run) -> dict[str, Any]:
    """The kept model's calibration and operating points, fitted on the validation split's
    probabilities (averaged over the model's TTA views, as evaluate and predict will see them)."""
    tc = run.params.train
    probs = predict_probs(run.model, run.val_images, run.model_input, run.val_batch_size, run.device,
                          tta=run.config.tta, metadata=run.val_metadata)
    fitted, held_out = calibration.choose(probs, run.val_labels, run.val_lesions, tc.calibration)
    calibrated = calibration.apply(probs, fitted)
    return {"tta": run.config.tta, "calibration": fitted,
            "calibration_held_out_nll": held_out,  # auto: each method's NLL on held-out validation lesions
            "val_nll_uncalibrated": calibration.nll(probs, run.val_labels),
            "val_nll": calibration.nll(calibrated, run.val_labels),
            "operating_points": calibration.operating_points(calibrated, run.val_labels, tc.operating_points)}


def _finish(run: Run, images: np.ndarray, curves: Path | None) -> tuple[nn.Module, dict[str, Any]]:
    """The kept weights loaded, the curves drawn, the calibration fitted, and the checkpoint's
    metadata: how the model was made."""
    params, config, history = run.params, run.config, run.selection.history
    run.model.load_state_dict(run.selection.best_state)
    fitted = calibrate(run) if run.ranks.main else {}  # only rank 0 writes the checkpoint
    best = history.record(history.best_epoch)
    prefix = "val" if history.best_weights == "raw" else "val_ema"
    if curves is not None and run.ranks.main:
        plot_history(history.epochs, history.best_epoch, history.best_weights, curves)
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
        "kept_weights": history.best_weights,  # raw, or ema: the moving average's
        "val_balanced_accuracy": best[f"{prefix}/balanced_accuracy"],
        "val_accuracy": best[f"{prefix}/accuracy"],
        "effective_batch_size": run.batch_size,
        "micro_batches": run.accum,
        "processes": run.ranks.world,
        "train_images_per_second": float(np.median([r["train_images_per_second"] for r in history.epochs])),
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
        **fitted,
        # a metadata model's field encoding (absent for an image-only model: readers take that as one)
        **({"metadata": run.encoding.to_checkpoint()} if run.encoding is not None else {}),
    }
    return run.model.eval(), meta


def plot_history(epochs: list[dict[str, float]], best_epoch: int, best_weights: str, path: Path) -> None:
    """Training curves as a PNG that opens without a browser (dvc plots show needs the web)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["epoch"] for r in epochs]
    fig, (losses, scores) = plt.subplots(1, 2, figsize=(11, 4))
    losses.plot(x, [r["train/loss"] for r in epochs], marker="o", label="train loss (weighted, smoothed)")
    losses.plot(x, [r["val/loss"] for r in epochs], marker="o", label="val loss")
    scores.plot(x, [r["val/accuracy"] for r in epochs], marker="o", label="val accuracy")
    scores.plot(x, [r["val/balanced_accuracy"] for r in epochs], marker="o", label="val balanced accuracy")
    if "val_ema/loss" in epochs[0]:
        losses.plot(x, [r["val_ema/loss"] for r in epochs], marker="s", label="val loss, EMA weights")
        scores.plot(x, [r["val_ema/balanced_accuracy"] for r in epochs], marker="s",
                    label="val balanced accuracy, EMA weights")
    for ax in (losses, scores):
        ax.axvline(best_epoch, color="gray", linestyle=":", label=f"kept: epoch {best_epoch} ({best_weights} weights)")
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log(live: Any, record: dict[str, float]) -> None:
    for key, value in record.items():
        # wall time varies run to run: keep it out of the metrics, so same params give same metrics
        if key not in ("epoch", "epoch_seconds", "train_images_per_second"):
            live.log_metric(key, value)
    live.next_step()


def remove_abandoned_states(folder: Path, keep: Path) -> list[Path]:
    """Delete the resume states of runs whose params changed before they finished: they can
    never be resumed (the key is the params' hash) and each holds a whole training state."""
    removed = [path for path in folder.glob("*") if path.is_file() and path != keep]
    for path in removed:
        path.unlink()
    return removed


@cli
def main(argv: list[str] | tuple[str, ...] = ()) -> None:
    """`python -m hmnist.stages.train [--fold K]`: fold 0 is the train stage, fold k >= 1 train_fold@k."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hmnist.stages.train")
    parser.add_argument("--fold", type=int, default=0, help="which cross-validation fold validates (default 0)")
    fold = parser.parse_args(argv).fold
    params = load_params()
    processes = distributed.process_count(params.train.devices, params.train.device)
    if processes > 1 and not distributed.in_worker():
        # checked before any worker starts: each would load the cache and build a model first
        split = fold_split(load_split(), load_folds(), fold)
        shared_batch_size(params, int((split["split"] == "train").sum()), processes)
        # torchrun runs this main() in each worker, with the same fold
        distributed.launch("hmnist.stages.train", processes, params.train.device, [f"--fold={fold}"])
        return
    with distributed.worker(params.train.device) as ranks:
        _main(params, fold, ranks)


def _main(params: Params, fold: int, ranks: collectives.Ranks) -> None:
    from dvclive import Live

    split = fold_split(load_split(), load_folds(), fold)  # this fold's images are its val split
    out = fold_paths(fold)
    images, index = load_prepared(PREPARED)
    resume_path = out.resume / f"{resume_key(params, split, images.shape)}.pt"
    if not ranks.main:  # only rank 0 writes; the others train and agree
        train(params, images, index, split, resume_path=resume_path)
        return
    removed = remove_abandoned_states(out.resume, keep=resume_path)
    if removed:
        print(f"removed {len(removed)} resume state(s) of earlier unfinished runs with other params: "
              f"{', '.join(p.name for p in removed)}", file=sys.stderr)
    with Live(str(out.live), dvcyaml=False, report=None, save_dvc_exp=False) as live:
        model, meta = train(params, images, index, split, resume_path=resume_path, live=live, curves=out.curves)
        live.summary["best/epoch"] = meta["best_epoch"]
        live.summary["best/ema"] = int(meta["kept_weights"] == "ema")  # 1: the EMA weights were kept
        live.summary["best/val_balanced_accuracy"] = meta["val_balanced_accuracy"]
        live.summary["best/val_accuracy"] = meta["val_accuracy"]
        live.summary["calibration/val_nll_uncalibrated"] = meta["val_nll_uncalibrated"]
        live.summary["calibration/val_nll"] = meta["val_nll"]
        live.summary["calibration/temperature"] = (meta["calibration"] or {}).get("temperature", 1.0)
        for op in meta["operating_points"]:
            live.summary[f"operating_points/{op['name']}/threshold"] = op["threshold"]
    save_checkpoint(out.checkpoint, model, {**meta, "fold": fold})
    resume_path.unlink(missing_ok=True)  # finished: a re-run with these params starts afresh
    print(f"saved {out.checkpoint}: {params.model} kept epoch {meta['best_epoch']} ({meta['kept_weights']} weights, "
          f"select {params.train.select}), "
          f"val balanced accuracy {meta['val_balanced_accuracy']:.4f}, calibration "
          f"{(meta['calibration'] or {}).get('method', 'none')} (val NLL {meta['val_nll_uncalibrated']:.4f} -> "
          f"{meta['val_nll']:.4f}), "
          f"{meta['train_images_per_second']:.0f} training images/s")


if __name__ == "__main__":
    main(sys.argv[1:])
