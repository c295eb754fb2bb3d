"""Which epoch's weights a training run keeps (`train.select`): scored after each epoch's
validation, owned by one object (`Selection`) that the resume state saves and restores; and the
training curves, drawn from its history.
Epochs are numbered from 1, as the logs, the curves and the checkpoint's `best_epoch` show them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)  # each epoch's record, epoch 1 first
    best_epoch: int = -1
    best_score: float = -1.0
    best_weights: str = "raw"  # or "ema": which of the epoch's two weight sets was kept
    # per epoch: the validation balanced accuracy of its candidate (the better of its raw and
    # EMA weights) and which weights those are
    scores: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def record(self, epoch: int) -> dict[str, float]:
        return self.epochs[epoch - 1]


def epoch_record(epoch: int, train_loss: float, lr: float, vals: dict[str, dict[str, float]]) -> dict[str, float]:
    """What the curves and the resume state keep of an epoch: its loss, learning rate and each
    weight set's validation metrics (`val/...` the trained weights', `val_ema/...` their EMA's)."""
    record = {"epoch": epoch, "train/loss": train_loss, "lr": lr}
    for name, val in vals.items():
        prefix = "val" if name == "raw" else "val_ema"
        record.update({f"{prefix}/{key}": value for key, value in val.items()})
    return record


def smoothed(scores: list[float], epoch: int) -> float:
    """Epoch `epoch`'s score averaged with its neighbours' (one side only at either end)."""
    window = scores[max(0, epoch - 2):epoch + 1]
    return sum(window) / len(window)


class Selection:
    """The kept weights so far: the last epoch's (`last`), the best-scoring one's (`best`), or
    the best by a 3-epoch mean of the scores (`smoothed`, whose epoch is scored once the next
    is validated, so the last epoch's weights wait as `pending_state`)."""

    def __init__(self, select: str, epochs: int):
        self.select, self.epochs = select, epochs
        self.history = History()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.pending_state: dict[str, torch.Tensor] | None = None

    def update(self, record: dict[str, float], vals: dict[str, dict[str, float]],
               candidates: dict[str, nn.Module]) -> None:
        """Record an epoch (`record`, epoch_record's) and score its candidate, the better of its
        weight sets by `vals` (raw on a tie), and keep the weights `select` chooses so far."""
        history, epoch = self.history, record["epoch"]
        history.epochs.append(record)
        name = max(vals, key=lambda n: vals[n]["balanced_accuracy"])
        history.scores.append(vals[name]["balanced_accuracy"])
        history.names.append(name)
        current = {k: v.detach().to("cpu", copy=True) for k, v in candidates[name].state_dict().items()}
        if self.select == "smoothed":
            options = [(epoch - 1, self.pending_state)] if epoch > 1 else []
            options += [(epoch, current)] if epoch == self.epochs else []
            self.pending_state = current
        else:
            options = [(epoch, current)]
        for scored, weights in options:
            score = smoothed(history.scores, scored) if self.select == "smoothed" else history.scores[scored - 1]
            if self.select == "last" or score > history.best_score:
                history.best_score, history.best_epoch, history.best_weights = score, scored, history.names[scored - 1]
                self.best_state = weights

    def state_dict(self) -> dict[str, Any]:
        return {"history": asdict(self.history), "best_state": self.best_state, "pending_state": self.pending_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = History(**state["history"])
        self.best_state, self.pending_state = state["best_state"], state["pending_state"]


def plot_history(history: History, path: Path) -> None:
    """Training curves, with the kept epoch marked, as a PNG that opens without a browser (dvc
    plots show needs the web)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs, best_epoch, best_weights = history.epochs, history.best_epoch, history.best_weights
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
