"""Stage `evaluate`: test-split metrics, a confusion matrix and ROC curves.

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
from hmnist.data import CHECKPOINT, METRICS, PLOTS, PREDICTIONS, PREPARED, load_prepared, load_split, split_rows
from hmnist.engine import inference_model, predict_probs, resolve_device, to_device
from hmnist.errors import UserError, cli
from hmnist.metrics import compute_metrics, roc_table, submission_frame
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


def evaluate(checkpoint: dict[str, Any], images: np.ndarray, batch_size: int, device_name: str = "auto",
             tta: str = "none") -> np.ndarray:
    """Test-set probabilities, preprocessed exactly as the checkpoint says."""
    if int(images.shape[1]) != checkpoint["prepare_size"]:
        raise UserError(f"the prepared cache is {images.shape[1]}px but the model was trained on "
                        f"{checkpoint['prepare_size']}px: run `dvc repro`")
    device = resolve_device(device_name)
    model, model_input = inference_model(checkpoint, device)
    return predict_probs(model, to_device(images, device), model_input, batch_size, device, progress=True, tta=tta)


@cli
def main() -> None:
    params = load_params()
    checkpoint = load_checkpoint(CHECKPOINT)
    images, index = load_prepared(PREPARED)
    rows = split_rows(index, load_split(), "test")
    labels = index["label"].to_numpy()[rows].astype(np.int64)
    probs = evaluate(checkpoint, images[rows], params.evaluate.batch_size, params.train.device, params.evaluate.tta)

    metrics = {"model": checkpoint["model_name"], "arch": checkpoint["arch"], "tta": params.evaluate.tta,
               **compute_metrics(labels, probs)}
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
