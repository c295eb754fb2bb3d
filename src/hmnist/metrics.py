"""Classification and calibration metrics of predicted probabilities, and the ISIC 2018 submission frame.

Balanced accuracy (mean per-class recall) is the ISIC 2018 challenge's headline metric:
with nv at 67% of the images, plain accuracy rewards a model that ignores the rare classes.
Their 95% intervals, by resampling the test set's lesions, and the paired comparisons of two
runs are bootstrap.py's.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, precision_recall_fscore_support,
                             roc_auc_score, roc_curve)

from hmnist.config import CLASS_COLUMNS, CLASSES

FPR_GRID = np.linspace(0, 1, 101)  # one shared x axis, so one CSV holds every class's ROC curve


def one_vs_rest_auc(positives: np.ndarray, score: np.ndarray) -> float | None:
    if positives.min() == positives.max():
        return None  # undefined when the class is absent (or alone) in the test set
    return float(roc_auc_score(positives, score))


def summary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Mean log loss, accuracy and balanced accuracy: what training watches on validation."""
    predicted = probs.argmax(1)
    likelihood = probs[np.arange(len(labels)), labels]
    return {
        "loss": float(-np.log(np.clip(likelihood, 1e-12, None)).mean()),
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
    }


def compute_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """The test metrics of metrics/metrics.json (docs/metrics.md, "Metrics")."""
    predicted = probs.argmax(1)
    all_labels = list(range(len(CLASSES)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=all_labels, zero_division=0)
    per_class = {}
    for i, name in enumerate(CLASSES):
        per_class[name] = {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                           "auc": one_vs_rest_auc(labels == i, probs[:, i]), "support": int(support[i])}
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


def submission_frame(image_ids: list[str], probs: np.ndarray) -> pd.DataFrame:
    """The ISIC 2018 Task 3 format: image,MEL,NV,BCC,AKIEC,BKL,DF,VASC, sorted by image."""
    frame = pd.DataFrame(probs, columns=CLASS_COLUMNS)
    frame.insert(0, "image", image_ids)
    return frame.sort_values("image", kind="stable").reset_index(drop=True)


# -- calibration --------------------------------------------------------------------------------

def calibration_table(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """The reliability diagram's data: for equal-width bins of the top-class probability
    (confidence), the images in the bin, their mean confidence and the share classified right."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_confidence = np.bincount(which, confidence, bins) / count
        accuracy = np.bincount(which, correct, bins) / count
    edges = np.linspace(0, 1, bins + 1)
    return pd.DataFrame({"bin_low": edges[:-1], "bin_high": edges[1:], "images": count,
                         "confidence": mean_confidence, "accuracy": accuracy})


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over the bins weighted by their
    images (Guo et al. 2017, 15 equal-width bins). 0 = the probabilities can be taken at face value."""
    table = calibration_table(labels, probs, bins).dropna()
    return float(((table["confidence"] - table["accuracy"]).abs() * table["images"]).sum() / len(labels))
