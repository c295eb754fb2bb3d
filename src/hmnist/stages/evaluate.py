"""Stage `evaluate`: test-split metrics with 95% lesion-bootstrap intervals, calibration metrics
before and after the checkpoint's calibration, each operating point's test sensitivity and
specificity, a confusion matrix, ROC curves and a reliability diagram; with cv.folds K >= 2, the
K fold models' ensemble (averaged probabilities) on the test split, each fold's own test metrics
(mean and standard deviation over folds) and the out-of-fold validation metrics.

Each model is run with its checkpoint's test-time augmentation and calibrated with its
checkpoint's calibration (both fitted or chosen in training, never here). The decisions that
balanced accuracy scores are the argmax of the uncalibrated probabilities, in predictions/test.csv;
the calibrated probabilities go beside it, in predictions/test_calibrated.csv (docs/metrics.md).
Every output is written under a temporary name and renamed when whole.

The test split is never seen in training or model selection. Probabilities come from the
checkpoint through `inference.inference_model` and `inference.predict_probs`, the path `hmnist predict`
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

from hmnist import calibration, fusion
from hmnist.config import CLASS_COLUMNS, CLASSES, load_params
from hmnist.data import (CALIBRATED_PREDICTIONS, METRICS, OOF_PREDICTIONS, PLOTS, PREDICTIONS, PREPARED, fold_paths,
                         fold_split, load_folds, load_prepared, load_split, split_rows, write_whole)
from hmnist.engine import resolve_device, to_device
from hmnist.inference import inference_model, predict_probs
from hmnist.errors import UserError, cli
from hmnist.bootstrap import (CALIBRATION_METRICS, INTERVAL_METRICS, bootstrap_intervals, calibration_metrics,
                              operating_point_metrics)
from hmnist.metrics import calibration_table, compute_metrics, roc_table, submission_frame
from hmnist.models import load_checkpoint


def save_figure(fig: Any, path: Path) -> None:
    write_whole(path, lambda partial: fig.savefig(partial, dpi=120, format="png"))


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    write_whole(path, lambda partial: frame.to_csv(partial, index=False, lineterminator="\n"))


def plot_pngs(labels: np.ndarray, probs: np.ndarray, calibrated: np.ndarray, points: list[dict[str, Any]],
              metrics: dict[str, Any], title: str, out: Path) -> None:
    """PNGs a user can open without a browser (DVC's HTML loads its chart library from the web)."""
    import matplotlib
    matplotlib.use("Agg")

    plot_confusion(labels, probs, metrics, title, out / "confusion_matrix.png")
    plot_roc(labels, probs, calibrated, points, metrics, title, out / "roc.png")
    plot_reliability(labels, probs, calibrated, metrics, title, out / "reliability.png")


def plot_confusion(labels: np.ndarray, probs: np.ndarray, metrics: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    names = CLASS_COLUMNS
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
    save_figure(fig, path)
    plt.close(fig)


def plot_roc(labels: np.ndarray, probs: np.ndarray, calibrated: np.ndarray, points: list[dict[str, Any]],
             metrics: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    for i, name in enumerate(CLASSES):
        auc = metrics["per_class"][name]["auc"]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(labels == i, probs[:, i])
        ax.plot(fpr, tpr, label=f"{name.upper()} (AUC {auc:.3f})")
    # each operating point on the ROC curve of its own score (the calibrated probability of its
    # classes), at the test sensitivity and specificity its validation threshold reaches
    for op in points:
        positives = calibration.positives_of(labels, op["classes"])
        if positives.all() or not positives.any():
            continue
        scores = calibration.flag_scores(calibrated, op["classes"])
        fpr, tpr, _ = roc_curve(positives, scores)
        line, = ax.plot(fpr, tpr, linestyle="--", linewidth=1, label=f"{'+'.join(op['classes']).upper()}, calibrated")
        tested = metrics["operating_points"][op["name"]]
        ax.plot(1 - tested["specificity"], tested["sensitivity"], marker="o", markersize=8, color=line.get_color(),
                linestyle="none", label=f"{op['name']}: sensitivity {tested['sensitivity']:.2f}, "
                                        f"specificity {tested['specificity']:.2f}")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"{title}: one-vs-rest ROC, macro AUC {metrics['macro_auc'] or math.nan:.3f}")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_reliability(labels: np.ndarray, probs: np.ndarray, calibrated: np.ndarray, metrics: dict[str, Any],
                     title: str, path: Path) -> None:
    """Each bin's share right at its images' mean confidence: on the diagonal when calibrated."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for name, p, ece in (("uncalibrated", probs, metrics["ece_uncalibrated"]), ("calibrated", calibrated, metrics["ece"])):
        table = calibration_table(labels, p).dropna()
        ax.plot(table["confidence"], table["accuracy"], marker="o", label=f"{name}, ECE {ece:.3f}")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability, bin mean)")
    ax.set_ylabel("share classified right")
    ax.set_title(f"{title}: reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def evaluate(checkpoint: dict[str, Any], images: np.ndarray, batch_size: int, device_name: str = "auto",
             tta: str | None = None, metadata: pd.DataFrame | None = None, remove: list[str] = ()) -> np.ndarray:
    """Test-set probabilities (uncalibrated), preprocessed exactly as the checkpoint says, with
    its test-time augmentation unless `tta` names another. A metadata model reads the images'
    rows of `metadata` (the prepared index's), encoded as in training, the fields in `remove`
    (evaluate.remove_metadata) read as missing; `metadata` None: every field missing."""
    if int(images.shape[1]) != checkpoint["prepare_size"]:
        raise UserError(f"the prepared cache is {images.shape[1]}px but the model was trained on "
                        f"{checkpoint['prepare_size']}px: run `dvc repro`")
    device = resolve_device(device_name)
    model, model_input = inference_model(checkpoint, device)
    tta = checkpoint.get("tta", "none") if tta is None else tta  # a checkpoint from before per-model TTA: none
    encoded = fusion.encoded_for(checkpoint, metadata, len(images), remove)
    return predict_probs(model, to_device(images, device), model_input, batch_size, device, progress=True, tta=tta,
                         metadata=encoded)


def metadata_keys(checkpoint: dict[str, Any], removed: list[str]) -> dict[str, str]:
    """A metadata model's fields, and those evaluate.remove_metadata took away (none for an
    image-only model: metrics.json stays as it was)."""
    encoding = fusion.checkpoint_encoding(checkpoint)
    if encoding is None:
        return {}
    gone = [f for f in encoding.fields if f in removed]
    return {"metadata": ",".join(encoding.fields), "metadata_removed": ",".join(gone) or "none"}


def report_metrics(labels: np.ndarray, probs: np.ndarray, calibrated: np.ndarray, lesion_ids: np.ndarray | None,
                   resamples: int, seed: int) -> dict[str, Any]:
    """compute_metrics of the decisions (the uncalibrated argmax), ECE, NLL and Brier of the
    calibrated probabilities and (`_uncalibrated`) of the model's own, and `<metric>_low`/
    `<metric>_high`: 95% lesion-bootstrap intervals as plain keys, so `dvc metrics diff` and
    `dvc exp show` show them as columns."""
    metrics = compute_metrics(labels, probs)
    if resamples:
        for name, (low, high) in bootstrap_intervals(labels, probs, lesion_ids, resamples, seed).items():
            # NaN (no AUC defined in any resample) is not JSON: null, as compute_metrics writes it
            metrics[f"{name}_low"], metrics[f"{name}_high"] = (None, None) if math.isnan(low) else (low, high)
    metrics.update(calibration_metrics(labels, calibrated, lesion_ids, resamples, seed))
    for key, value in calibration_metrics(labels, probs, lesion_ids, resamples, seed).items():
        name, _, end = key.partition("_")  # ece_low -> ece_uncalibrated_low
        metrics[f"{name}_uncalibrated{'_' + end if end else ''}"] = value
    # each metric beside its interval
    order = [*INTERVAL_METRICS, *(f"{n}{c}" for n in CALIBRATION_METRICS for c in ("", "_uncalibrated"))]
    keys = [k for name in order for k in (name, f"{name}_low", f"{name}_high") if k in metrics]
    return {**{k: metrics[k] for k in keys}, **{k: v for k, v in metrics.items() if k not in keys}}


def test_operating_points(labels: np.ndarray, calibrated: np.ndarray, points: list[dict[str, Any]],
                          lesion_ids: np.ndarray | None, resamples: int, seed: int) -> dict[str, Any]:
    """Each operating point's test sensitivity and specificity at its validation threshold, with
    their intervals: a threshold chosen on a few hundred validation images misses its target on
    test by some amount, and this shows by how much."""
    flagged = calibration.decisions(calibrated, points)
    return {op["name"]: {"classes": op["classes"], "target_sensitivity": op["target_sensitivity"],
                         "threshold": op["threshold"],
                         **operating_point_metrics(calibration.positives_of(labels, op["classes"]), flagged[op["name"]],
                                                   lesion_ids, resamples, seed)}
            for op in points}


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

    def predict(checkpoint: dict[str, Any], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A checkpoint's probabilities for `rows`, and their calibration by the checkpoint's own."""
        probs = evaluate(checkpoint, images[rows], ev.batch_size, params.train.device,
                         metadata=index.iloc[rows], remove=ev.remove_metadata)
        return probs, calibration.apply(probs, checkpoint.get("calibration"))

    fold_outputs = [predict(checkpoint, rows) for checkpoint in checkpoints]
    # with one fold, that fold's probabilities; an ensemble averages the members' own (the
    # decisions) and their calibrated ones (each member calibrated on its own validation fold)
    probs = np.mean([p for p, _ in fold_outputs], axis=0)
    calibrated = np.mean([c for _, c in fold_outputs], axis=0)
    points = calibration.ensemble_operating_points(checkpoints)
    first = checkpoints[0]
    metrics = {"model": first["model_name"], "arch": first["arch"], "tta": first.get("tta", "none"),
               "calibration": (first.get("calibration") or {}).get("method", "none"),
               **metadata_keys(first, ev.remove_metadata),
               **report_metrics(labels[rows], probs, calibrated, lesions[rows], ev.bootstrap, ev.bootstrap_seed),
               "operating_points": test_operating_points(labels[rows], calibrated, points, lesions[rows],
                                                         ev.bootstrap, ev.bootstrap_seed)}
    if len(checkpoints) > 1:
        metrics["ensemble_of"] = len(checkpoints)
        oof_rows, oof_probs, oof_calibrated = out_of_fold(checkpoints, predict, index, split)
        fold_metrics = [report_metrics(labels[rows], p, c, lesions[rows], 0, 0) for p, c in fold_outputs]
        metrics["cv"] = cv_summary(fold_metrics, report_metrics(labels[oof_rows], oof_probs[oof_rows],
                                                                oof_calibrated[oof_rows], None, 0, 0))
    else:
        oof_rows, oof_probs = rows[:0], np.zeros((len(index), len(CLASSES)))
    title = first["model_name"] + (f", {len(checkpoints)}-fold ensemble" if len(checkpoints) > 1 else "")
    write_outputs(metrics, index, rows, probs, calibrated, points, title, oof_rows, oof_probs[oof_rows])
    print_summary(metrics, title, len(rows))


def out_of_fold(checkpoints: list[dict[str, Any]], predict, index: pd.DataFrame, split: pd.DataFrame
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, probabilities, calibrated probabilities) of every non-test image, each predicted by
    the fold model that held it out (`predict(checkpoint, rows)`); the arrays span the index."""
    folds, oof_probs = load_folds(), np.zeros((len(index), len(CLASSES)))
    oof_calibrated = np.zeros_like(oof_probs)
    held_out = np.zeros(len(index), dtype=bool)
    for fold, checkpoint in enumerate(checkpoints):
        val = split_rows(index, fold_split(split, folds, fold), "val")
        (oof_probs[val], oof_calibrated[val]), held_out[val] = predict(checkpoint, val), True
    return np.flatnonzero(held_out), oof_probs, oof_calibrated


def write_outputs(metrics: dict[str, Any], index: pd.DataFrame, rows: np.ndarray, probs: np.ndarray,
                  calibrated: np.ndarray, points: list[dict[str, Any]], title: str, oof_rows: np.ndarray,
                  oof_probs: np.ndarray) -> None:
    """metrics.json, the plots' CSVs and PNGs, and the test (and out-of-fold) predictions."""
    labels = index["label"].to_numpy().astype(np.int64)[rows]
    write_whole(METRICS, lambda partial: partial.write_text(json.dumps(metrics, indent=2) + "\n"))
    write_csv(pd.DataFrame({"actual": [CLASSES[i] for i in labels],
                            "predicted": [CLASSES[i] for i in probs.argmax(1)]}), PLOTS / "confusion.csv")
    write_csv(roc_table(labels, probs), PLOTS / "roc.csv")
    # DVC's plot reads confidence and accuracy: the calibrated probabilities'; the model's own beside
    table = calibration_table(labels, calibrated)
    own = calibration_table(labels, probs)[["images", "confidence", "accuracy"]].add_suffix("_uncalibrated")
    write_csv(pd.concat([table, own], axis=1).round(6), PLOTS / "calibration.csv")
    plot_pngs(labels, probs, calibrated, points, metrics, title, PLOTS)
    # the submission's columns, then what `hmnist compare` needs to compare two runs on their own
    for path, where, p in ((PREDICTIONS, rows, probs), (CALIBRATED_PREDICTIONS, rows, calibrated),
                           (OOF_PREDICTIONS, oof_rows, oof_probs)):
        truth = index.iloc[where].set_index("image_id")
        frame = submission_frame(truth.index.tolist(), p)
        frame["lesion_id"] = truth.loc[frame["image"], "lesion_id"].to_numpy()
        frame["dx"] = truth.loc[frame["image"], "dx"].to_numpy()
        write_csv(frame, path)


def print_summary(metrics: dict[str, Any], title: str, test_images: int) -> None:
    """The headline metrics with their intervals, and each operating point's test rates."""
    if "metadata" in metrics:
        title += f" with metadata ({metrics['metadata']}; removed: {metrics['metadata_removed']})"
    print(f"{title} on {test_images} test images: balanced accuracy {metrics['balanced_accuracy']:.4f}"
          f"{interval_of(metrics, 'balanced_accuracy')}, accuracy {metrics['accuracy']:.4f}"
          f"{interval_of(metrics, 'accuracy')}, macro AUC {metrics['macro_auc'] or math.nan:.4f}, melanoma sensitivity "
          f"{metrics['melanoma_sensitivity']:.4f}{interval_of(metrics, 'melanoma_sensitivity')}, "
          f"ECE {metrics['ece_uncalibrated']:.4f} -> {metrics['ece']:.4f} calibrated ({metrics['calibration']})")
    for name, op in metrics["operating_points"].items():
        print(f"  {name} (threshold {op['threshold']:.4f} from validation): test sensitivity "
              f"{op['sensitivity'] if op['sensitivity'] is not None else math.nan:.4f}{interval_of(op, 'sensitivity')}, "
              f"specificity {op['specificity'] if op['specificity'] is not None else math.nan:.4f}"
              f"{interval_of(op, 'specificity')}")


def interval_of(values: dict[str, Any], name: str) -> str:
    low, high = values.get(f"{name}_low"), values.get(f"{name}_high")
    return f" [{low:.4f}, {high:.4f}]" if low is not None else ""


if __name__ == "__main__":
    main()
