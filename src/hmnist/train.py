"""Stage `train`: fit `models.${model}` on the train split, keep the best validation epoch.

AdamW with linear warmup and cosine decay, augmentation on the device, class imbalance
handled by a weighted loss or sampler, label smoothing. After every epoch the full training
state is saved under models/.resume/, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn as nn
from sklearn.metrics import balanced_accuracy_score
from tqdm import tqdm

from hmnist.config import CLASSES, Params, load_params
from hmnist.engine import (Augment, Normalize, autocast, epoch_batches, memory_format,
                           predict_probs, resolve_device, to_device)
from hmnist.errors import UserError, cli
from hmnist.models import create_model, data_config, save_checkpoint

PREPARED = Path("data/prepared")
SPLIT = Path("data/split.csv")
CHECKPOINT = Path("models/model.pt")
RESUME_DIR = Path("models/.resume")
LIVE_DIR = "dvclive"
CURVES = Path("plots/training_curves.png")


def split_rows(index: pd.DataFrame, split: pd.DataFrame, name: str) -> np.ndarray:
    """Row numbers in the prepared cache of the images in split `name`, in cache order."""
    if len(index) != len(split) or set(index["image_id"]) != set(split["image_id"]):
        raise UserError(f"{SPLIT} does not match {PREPARED}/index.csv: run `dvc repro split`")
    wanted = set(split.loc[split["split"] == name, "image_id"])
    return np.flatnonzero(index["image_id"].isin(wanted).to_numpy())


def class_weights(labels: np.ndarray, power: float) -> torch.Tensor:
    """(1 / frequency) ** power, scaled so that the average sample weighs 1."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    weights = np.where(counts > 0, (counts.sum() / np.maximum(counts, 1)) ** power, 0.0)
    weights *= counts.sum() / (weights * counts).sum()
    return torch.tensor(weights, dtype=torch.float32)


def lr_lambda(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and embeddings (1-d parameters), as timm does."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def backward_batch(model: nn.Module, inputs, targets: torch.Tensor, criterion: nn.Module,
                   loss_weights: torch.Tensor | None, batch: torch.Tensor, micro_batches: int,
                   device: torch.device) -> torch.Tensor:
    """Accumulate the gradient of one batch's mean loss over `micro_batches` forward passes.

    Each micro-batch's summed loss is divided by the whole batch's weight (what a weighted
    mean-reduced cross-entropy divides by), so the gradient is the full batch's, exactly,
    for models without batch statistics.
    """
    labels = targets[batch]
    total_weight = loss_weights[labels].sum() if loss_weights is not None else len(batch)
    total = torch.zeros((), device=targets.device)
    for chunk in batch.tensor_split(micro_batches):
        x = inputs(chunk)
        with autocast(device):  # the forward pass only; the loss is taken in fp32
            logits = model(x)
        loss = criterion(logits.float(), targets[chunk]).sum() / total_weight
        loss.backward()
        total += loss.detach()  # stays on the device: a .item() here would stall the GPU every step
    return total


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = -1.0


def evaluate_split(model, images, labels, normalize, batch_size, device) -> dict[str, float]:
    probs = predict_probs(model, images, normalize, batch_size, device)
    predicted = probs.argmax(1)
    likelihood = probs[np.arange(len(labels)), labels]
    return {
        "loss": float(-np.log(np.clip(likelihood, 1e-12, None)).mean()),
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
    }


def resume_key(params: Params, split: pd.DataFrame, cache_shape: tuple[int, ...]) -> str:
    """Which run a saved state belongs to: same params, same split, same cache size."""
    payload = json.dumps({"model": params.model, "config": asdict(params.model_config),
                          "train": asdict(params.train), "cache": list(cache_shape)}, sort_keys=True)
    digest = hashlib.sha256(payload.encode())
    digest.update(pd.util.hash_pandas_object(split, index=False).values.tobytes())
    return digest.hexdigest()[:16]


def train(params: Params, images: np.ndarray, index: pd.DataFrame, split: pd.DataFrame,
          resume_path: Path | None = None, live: Any = None,
          curves: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train the selected model; returns the best-epoch model and checkpoint metadata."""
    config, tc = params.model_config, params.train
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)

    labels = index["label"].to_numpy().astype(np.int64)
    train_rows, val_rows = split_rows(index, split, "train"), split_rows(index, split, "val")
    train_images, val_images = to_device(images[train_rows], device), to_device(images[val_rows], device)
    train_labels = torch.from_numpy(labels[train_rows]).to(device)
    val_labels = labels[val_rows]

    model = create_model(config).to(device).to(memory_format=memory_format(device))
    norm = data_config(model)
    normalize = Normalize(config.resize, norm["mean"], norm["std"], device)
    generator = torch.Generator(device=device).manual_seed(tc.seed + 1)
    augment = Augment(generator) if tc.augment else None

    weights = class_weights(labels[train_rows], tc.balance_power).to(device)
    loss_weights = weights if tc.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=tc.label_smoothing, reduction="none")
    sample_weights = weights[train_labels] if tc.balance == "sampler" else None

    batch_size = min(config.batch_size, len(train_rows))
    steps_per_epoch = max(1, len(train_rows) // batch_size)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(round(tc.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch))
    step_model = torch.compile(model) if tc.compile else model

    history, best_state, start_epoch, accum = History(), None, 0, 1
    if resume_path is not None and resume_path.exists():
        state = torch.load(resume_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        history = History(**state["history"])
        best_state, start_epoch, accum = state["best_state"], state["epoch"] + 1, state["accum"]
        print(f"resuming after epoch {start_epoch} of {config.epochs} from {resume_path}", file=sys.stderr)
        if live is not None:
            for record in history.epochs:  # DVC deleted the old plots: write them again
                _log(live, record)

    def inputs(rows: torch.Tensor) -> torch.Tensor:
        return normalize(train_images[rows], augment)

    def step(batch: torch.Tensor) -> torch.Tensor:
        nonlocal accum
        while True:
            try:
                loss = backward_batch(step_model, inputs, train_labels, criterion, loss_weights, batch, accum, device)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)  # free the gradients now, not at the next step
                return loss
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                if len(batch) // accum <= 1:
                    raise UserError(f"out of GPU memory even with micro-batches of 1 for {config.arch} "
                                    f"at {config.resize}px: lower resize or use a smaller model") from None
                accum *= 2
                print(f"notice: out of GPU memory at batch {len(batch)}; continuing with {accum} micro-batches "
                      f"of {math.ceil(len(batch) / accum)} and gradient accumulation (same effective batch)",
                      file=sys.stderr)

    for epoch in range(start_epoch, config.epochs):
        model.train()
        started, losses = time.perf_counter(), []
        batches = epoch_batches(len(train_rows), batch_size, generator, sample_weights)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch")
        for i, batch in enumerate(bar):
            losses.append(step(batch))
            if i % 20 == 0:  # reading the loss waits for the GPU: not every step
                bar.set_postfix(loss=f"{losses[-1].item():.3f}")
        val = evaluate_split(model, val_images, val_labels, normalize, params.evaluate.batch_size, device)
        record = {"epoch": epoch + 1, "train/loss": torch.stack(losses).mean().item(), "lr": scheduler.get_last_lr()[0],
                  **{f"val/{k}": v for k, v in val.items()}, "epoch_seconds": time.perf_counter() - started}
        history.epochs.append(record)
        print(f"epoch {epoch + 1}: train loss {record['train/loss']:.4f}, val loss {val['loss']:.4f}, "
              f"accuracy {val['accuracy']:.4f}, balanced accuracy {val['balanced_accuracy']:.4f}", file=sys.stderr)
        if val["balanced_accuracy"] > history.best_score:
            history.best_score, history.best_epoch = val["balanced_accuracy"], epoch + 1
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if live is not None:
            _log(live, record)
        if resume_path is not None:
            resume_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                        "torch_rng": torch.get_rng_state(), "history": asdict(history),
                        "best_state": best_state, "epoch": epoch, "accum": accum}, resume_path.with_suffix(".tmp"))
            resume_path.with_suffix(".tmp").replace(resume_path)

    model.load_state_dict(best_state)
    best = history.epochs[history.best_epoch - 1]
    if curves is not None:
        plot_history(history.epochs, history.best_epoch, curves)
    meta = {
        "model_name": params.model,
        "arch": config.arch,
        "model_config": asdict(config),
        "classes": list(CLASSES),
        "input_size": config.resize,
        "prepare_size": int(images.shape[1]),
        "mean": list(norm["mean"]),
        "std": list(norm["std"]),
        "config": params.to_dict(),
        "best_epoch": history.best_epoch,
        "val_balanced_accuracy": best["val/balanced_accuracy"],
        "val_accuracy": best["val/accuracy"],
        "effective_batch_size": batch_size,
        "micro_batches": accum,
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
    }
    return model.eval(), meta


def plot_history(epochs: list[dict[str, float]], best_epoch: int, path: Path) -> None:
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
    for ax in (losses, scores):
        ax.axvline(best_epoch, color="gray", linestyle=":", label=f"kept: epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log(live: Any, record: dict[str, float]) -> None:
    for key, value in record.items():
        # wall time varies run to run: keep it out of the metrics, so same params give same metrics
        if key not in ("epoch", "epoch_seconds"):
            live.log_metric(key, value)
    live.next_step()


@cli
def main() -> None:
    from dvclive import Live

    from hmnist.prepare import load_prepared

    params = load_params()
    if not SPLIT.exists():
        raise UserError(f"{SPLIT} not found: run `dvc repro split` first")
    images, index = load_prepared(PREPARED)
    split = pd.read_csv(SPLIT, dtype=str)
    resume_path = RESUME_DIR / f"{resume_key(params, split, images.shape)}.pt"
    with Live(LIVE_DIR, dvcyaml=False, report=None, save_dvc_exp=False) as live:
        model, meta = train(params, images, index, split, resume_path=resume_path, live=live, curves=CURVES)
        live.summary["best/epoch"] = meta["best_epoch"]
        live.summary["best/val_balanced_accuracy"] = meta["val_balanced_accuracy"]
        live.summary["best/val_accuracy"] = meta["val_accuracy"]
    save_checkpoint(CHECKPOINT, model, meta)
    resume_path.unlink(missing_ok=True)  # finished: a re-run with these params starts afresh
    print(f"saved {CHECKPOINT}: {params.model} best epoch {meta['best_epoch']}, "
          f"val balanced accuracy {meta['val_balanced_accuracy']:.4f}")


if __name__ == "__main__":
    main()
