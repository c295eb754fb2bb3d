"""Stage `evaluate`: test-split metrics, a confusion matrix and ROC curves.

Balanced accuracy (mean per-class recall) is the ISIC 2018 challenge's headline metric:
with nv at 67% of the images, plain accuracy rewards a model that ignores the rare classes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score, roc_curve)

from hmnist.config import CLASSES, load_params
from hmnist.engine import inference_model, predict_probs, resolve_device, to_device
from hmnist.errors import UserError, cli
from hmnist.models import load_checkpoint

METRICS = Path("metrics/metrics.json")
PLOTS = Path("plots")
PREDICTIONS = Path("predictions/test.csv")
FPR_GRID = np.linspace(0, 1, 101)  # one shared x axis, so one CSV holds every class's ROC curve


def _auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    if y_true.min() == y_true.max():
        return None  # undefined when the class is absent (or alone) in the test set
    return float(roc_auc_score(y_true, score))


def compute_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    predicted = probs.argmax(1)
    all_labels = list(range(len(CLASSES)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=all_labels, zero_division=0)
    per_class = {}
    for i, name in enumerate(CLASSES):
        per_class[name] = {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                           "auc": _auc(labels == i, probs[:, i]), "support": int(support[i])}
    aucs = [c["auc"] for c in per_class.values() if c["auc"] is not None]
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=all_labels, average="macro", zero_division=0)),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "melanoma_sensitivity": per_class["mel"]["recall"],
        "per_class": per_class,
        "test_images": int(len(labels)),
    }


def roc_table(labels: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """TPR of each class's one-vs-rest ROC curve at fixed FPR points."""
    table = {"fpr": FPR_GRID}
    for i, name in enumerate(CLASSES):
        positives = labels == i
        if positives.all() or not positives.any():
            table[name] = np.full_like(FPR_GRID, np.nan)
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, i])
        table[name] = np.interp(FPR_GRID, fpr, tpr)
    return pd.DataFrame(table).round(6)


def plot_pngs(labels: np.ndarray, probs: np.ndarray, metrics: dict[str, Any], title: str, out: Path) -> None:
    """PNGs a user can open without a browser (DVC's HTML loads its chart library from the web)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.upper() for c in CLASSES]
    cm = confusion_matrix(labels, probs.argmax(1), labels=list(range(len(CLASSES))))
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(j, i, f"{cm[i, j]}\n{rows[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"{title}: accuracy {metrics['accuracy']:.3f}, balanced {metrics['balanced_accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 6))
    for i, name in enumerate(CLASSES):
        auc = metrics["per_class"][name]["auc"]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(labels == i, probs[:, i])
        ax.plot(fpr, tpr, label=f"{name.upper()} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"{title}: one-vs-rest ROC, macro AUC {metrics['macro_auc'] or math.nan:.3f}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=120)
    plt.close(fig)


def submission_frame(image_ids: list[str], probs: np.ndarray) -> pd.DataFrame:
    """The ISIC 2018 Task 3 format: image,MEL,NV,BCC,AKIEC,BKL,DF,VASC, sorted by image."""
    frame = pd.DataFrame(probs, columns=[c.upper() for c in CLASSES])
    frame.insert(0, "image", image_ids)
    return frame.sort_values("image", kind="stable").reset_index(drop=True)


def evaluate(checkpoint: dict[str, Any], images: np.ndarray, labels: np.ndarray, batch_size: int,
             device_name: str = "auto") -> np.ndarray:
    """Test-set probabilities, preprocessed exactly as the checkpoint says."""
    if int(images.shape[1]) != checkpoint["prepare_size"]:
        raise UserError(f"the prepared cache is {images.shape[1]}px but the model was trained on "
                        f"{checkpoint['prepare_size']}px: run `dvc repro`")
    device = resolve_device(device_name)
    model, normalize = inference_model(checkpoint, device)
    return predict_probs(model, to_device(images, device), normalize, batch_size, device, progress=True)


@cli
def main() -> None:
    from hmnist.prepare import load_prepared
    from hmnist.train import CHECKPOINT, PREPARED, SPLIT, split_rows

    params = load_params()
    checkpoint = load_checkpoint(CHECKPOINT)
    images, index = load_prepared(PREPARED)
    split = pd.read_csv(SPLIT, dtype=str)
    rows = split_rows(index, split, "test")
    labels = index["label"].to_numpy()[rows].astype(np.int64)
    probs = evaluate(checkpoint, images[rows], labels, params.evaluate.batch_size, params.train.device)

    metrics = {"model": checkpoint["model_name"], "arch": checkpoint["arch"], **compute_metrics(labels, probs)}
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    METRICS.write_text(json.dumps(metrics, indent=2) + "\n")
    PLOTS.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"actual": [CLASSES[i] for i in labels], "predicted": [CLASSES[i] for i in probs.argmax(1)]}
                 ).to_csv(PLOTS / "confusion.csv", index=False, lineterminator="\n")
    roc_table(labels, probs).to_csv(PLOTS / "roc.csv", index=False, lineterminator="\n")
    plot_pngs(labels, probs, metrics, checkpoint["model_name"], PLOTS)
    PREDICTIONS.parent.mkdir(parents=True, exist_ok=True)
    submission_frame(index["image_id"].iloc[rows].tolist(), probs).to_csv(PREDICTIONS, index=False,
                                                                          lineterminator="\n")
    print(f"{checkpoint['model_name']} on {len(labels)} test images: accuracy {metrics['accuracy']:.4f}, "
          f"balanced accuracy {metrics['balanced_accuracy']:.4f}, macro AUC {metrics['macro_auc'] or math.nan:.4f}, "
          f"melanoma sensitivity {metrics['melanoma_sensitivity']:.4f}")


if __name__ == "__main__":
    main()
