"""Stage `evaluate`: test-split metrics with 95% lesion-bootstrap intervals, a confusion matrix,
ROC curves and a reliability diagram; with cv.folds K >= 2, the K fold models' ensemble
(averaged probabilities) on the test split, each fold's own test metrics (mean and standard
deviation over folds) and the out-of-fold validation metrics.

The test split is never seen in training or model selection. Probabilities come from the
checkpoint through `engine.inference_model` and `engine.predict_probs`, the path `hmnist predict`
takes too, so predicting the test images reproduces predictions/test.csv.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, roc_curve

from hmnist.config import CLASSES, load_params
from hmnist.data import (METRICS, PLOTS, PREDICTIONS, PREPARED, fold_paths, fold_split, load_folds, load_prepared,
                         load_split, split_rows)
from hmnist.engine import inference_model, predict_probs, resolve_device, to_device
from hmnist.errors import UserError, cli
from hmnist.metrics import (INTERVAL_METRICS, bootstrap_intervals, calibration_table, compute_metrics,
                            expected_calibration_error, roc_table, submission_frame)
from hmnist.models import load_checkpoint


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

    table = calibration_table(labels, probs)
    fig, ax = plt.subplots(figsize=(6, 6))
    used = table["images"] > 0
    ax.bar(table["bin_low"], table["accuracy"].where(used, 0), width=table["bin_high"] - table["bin_low"],
           align="edge", edgecolor="black", alpha=0.7, label="share right, per confidence bin")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("share classified right")
    ax.set_title(f"{title}: reliability, ECE {metrics['ece']:.3f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)


def evaluate(checkpoint: dict[str, Any], images: np.ndarray, batch_size: int, device_name: str = "auto",
             tta: str = "none") -> np.ndarray:
    """Test-set probabilities, preprocessed exactly as the checkpoint says."""
    if int(images.shape[1]) != checkpoint["prepare_size"]:
        raise UserError(f"the prepared cache is {images.shape[1]}px but the model was trained on "
                        f"{checkpoint['prepare_size']}px: run `dvc repro`")
    device = resolve_device(device_name)
    model, model_input = inference_model(checkpoint, device)
    return predict_probs(model, to_device(images, device), model_input, batch_size, device, progress=True, tta=tta)


def report_metrics(labels: np.ndarray, probs: np.ndarray, lesion_ids: np.ndarray | None, resamples: int,
                   seed: int) -> dict[str, Any]:
    """compute_metrics, the ECE, and `<metric>_low`/`<metric>_high`: 95% lesion-bootstrap
    intervals as plain keys, so `dvc metrics diff` and `dvc exp show` show them as columns."""
    metrics = compute_metrics(labels, probs)
    metrics["ece"] = expected_calibration_error(labels, probs)
    if resamples:
        for name, (low, high) in bootstrap_intervals(labels, probs, lesion_ids, resamples, seed).items():
            # NaN (no AUC defined in any resample) is not JSON: null, as compute_metrics writes it
            metrics[f"{name}_low"], metrics[f"{name}_high"] = (None, None) if math.isnan(low) else (low, high)
    order = [*INTERVAL_METRICS, "ece"]  # each metric beside its interval
    keys = [k for name in order for k in (name, f"{name}_low", f"{name}_high") if k in metrics]
    return {**{k: metrics[k] for k in keys}, **{k: v for k, v in metrics.items() if k not in keys}}


def cv_summary(fold_metrics: list[dict[str, Any]], oof: dict[str, Any]) -> dict[str, Any]:
    """Each metric's mean and standard deviation over the folds' own test metrics, and the
    out-of-fold validation metrics (every non-test image predicted by the fold that held it out)."""
    summary: dict[str, Any] = {"folds": len(fold_metrics)}
    for name in (*INTERVAL_METRICS, "ece"):
        values = np.array([m[name] if m[name] is not None else np.nan for m in fold_metrics], dtype=float)
        defined = values[~np.isnan(values)]
        summary[f"{name}_mean"] = float(defined.mean()) if len(defined) else None
        summary[f"{name}_sd"] = float(defined.std(ddof=1)) if len(defined) > 1 else None
    summary["out_of_fold"] = {name: oof[name] for name in (*INTERVAL_METRICS, "ece")}
    summary["out_of_fold"]["images"] = oof["test_images"]
    return summary


@cli
def main() -> None:
    params = load_params()
    images, index = load_prepared(PREPARED)
    split = load_split()
    rows = split_rows(index, split, "test")
    labels = index["label"].to_numpy().astype(np.int64)
    lesions = index["lesion_id"].to_numpy()
    checkpoints = [load_checkpoint(fold_paths(fold).checkpoint) for fold in range(params.cv.folds)]
    ev = params.evaluate

    def predict(checkpoint: dict[str, Any], rows: np.ndarray) -> np.ndarray:
        return evaluate(checkpoint, images[rows], ev.batch_size, params.train.device, ev.tta)

    fold_probs = [predict(checkpoint, rows) for checkpoint in checkpoints]
    probs = np.mean(fold_probs, axis=0)  # with one fold, that fold's probabilities
    first = checkpoints[0]
    metrics = {"model": first["model_name"], "arch": first["arch"], "tta": ev.tta,
               **report_metrics(labels[rows], probs, lesions[rows], ev.bootstrap, ev.bootstrap_seed)}
    if len(checkpoints) > 1:
        metrics["ensemble_of"] = len(checkpoints)
        folds, oof_probs = load_folds(), np.zeros((len(index), len(CLASSES)))
        held_out = np.zeros(len(index), dtype=bool)
        for fold, checkpoint in enumerate(checkpoints):
            val = split_rows(index, fold_split(split, folds, fold), "val")
            oof_probs[val], held_out[val] = predict(checkpoint, val), True
        fold_metrics = [report_metrics(labels[rows], p, lesions[rows], 0, 0) for p in fold_probs]
        metrics["cv"] = cv_summary(fold_metrics, report_metrics(labels[held_out], oof_probs[held_out], None, 0, 0))

    METRICS.parent.mkdir(parents=True, exist_ok=True)
    METRICS.write_text(json.dumps(metrics, indent=2) + "\n")
    PLOTS.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"actual": [CLASSES[i] for i in labels[rows]], "predicted": [CLASSES[i] for i in probs.argmax(1)]}
                 ).to_csv(PLOTS / "confusion.csv", index=False, lineterminator="\n")
    roc_table(labels[rows], probs).to_csv(PLOTS / "roc.csv", index=False, lineterminator="\n")
    calibration_table(labels[rows], probs).round(6).to_csv(PLOTS / "calibration.csv", index=False,
                                                           lineterminator="\n")
    title = first["model_name"] + (f", {len(checkpoints)}-fold ensemble" if len(checkpoints) > 1 else "")
    plot_pngs(labels[rows], probs, metrics, title, PLOTS)
    PREDICTIONS.parent.mkdir(parents=True, exist_ok=True)
    # the submission's columns, then what `hmnist compare` needs to compare two runs on their own
    frame = submission_frame(index["image_id"].iloc[rows].tolist(), probs)
    truth = index.iloc[rows].set_index("image_id").loc[frame["image"]]
    frame["lesion_id"], frame["dx"] = truth["lesion_id"].to_numpy(), truth["dx"].to_numpy()
    frame.to_csv(PREDICTIONS, index=False, lineterminator="\n")

    def interval(name: str) -> str:
        low, high = metrics.get(f"{name}_low"), metrics.get(f"{name}_high")
        return f" [{low:.4f}, {high:.4f}]" if low is not None else ""

    print(f"{title} on {len(rows)} test images: balanced accuracy {metrics['balanced_accuracy']:.4f}"
          f"{interval('balanced_accuracy')}, accuracy {metrics['accuracy']:.4f}{interval('accuracy')}, "
          f"macro AUC {metrics['macro_auc'] or math.nan:.4f}, melanoma sensitivity "
          f"{metrics['melanoma_sensitivity']:.4f}{interval('melanoma_sensitivity')}, ECE {metrics['ece']:.4f}")


if __name__ == "__main__":
    main()
