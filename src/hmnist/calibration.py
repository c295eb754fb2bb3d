"""Calibrated probabilities and decision thresholds, fitted on the validation split.

The class-weighted, label-smoothed loss leaves the model's probabilities underconfident and each
class's prior shifted: "60%" is right far more often than 60% of the time. Temperature scaling
(Guo et al. 2017) divides the log-probabilities by one T fitted by NLL: it fixes the confidence
without changing a single argmax. A bias per class on top can also undo the prior shift, and so
can move an argmax. Both are fitted at the end of the train stage on the validation split (the
test split never comes near) and travel in the checkpoint as

    {"method": "temperature" | "temperature_bias", "temperature": T, "bias": [7 floats]}

with calibrated = softmax(log(p) / T + bias), p the (TTA-averaged) softmax probabilities.

An operating point flags an image when the sum of its calibrated probabilities over some classes
(melanoma; or melanoma, basal cell carcinoma and actinic keratosis) reaches a threshold, the
highest one that reaches the target sensitivity on the validation split.

scikit-learn has no multi-class temperature scaling (CalibratedClassifierCV fits one-vs-rest
sigmoids, which change the argmax and do not sum to one), so the fit is a few lines of
torch's L-BFGS on the NLL.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from hmnist.config import CLASSES

METHODS = ("temperature", "temperature_bias")
HELD_OUT_FOLDS = 5  # auto: NLL on held-out lesions, 5-fold over the validation split


def log_probs(probs: np.ndarray) -> np.ndarray:
    """log p in float64; a probability that underflowed to 0 in fp32 counts as 1e-12."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))


def fit(probs: np.ndarray, labels: np.ndarray, method: str) -> dict[str, Any]:
    """The calibration of `method` minimising the NLL of `labels` under softmax(log(probs)/T + b)."""
    import torch

    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    logits = torch.from_numpy(log_probs(probs))
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    bias = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=method == "temperature_bias")
    trained = [log_t, bias] if bias.requires_grad else [log_t]
    optimizer = torch.optim.LBFGS(trained, lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits * torch.exp(-log_t) + bias, targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    centred = (bias - bias.mean()).detach()  # softmax ignores a shift shared by every class: report the centred one
    return {"method": method, "temperature": float(torch.exp(log_t).item()),
            "bias": [float(b) for b in centred]}


def apply(probs: np.ndarray, calibration: dict[str, Any] | None) -> np.ndarray:
    """The calibrated probabilities (fp32, as the model's); `None` (no calibration) leaves them as they are."""
    if not calibration:
        return probs
    z = log_probs(probs) / float(calibration["temperature"]) + np.asarray(calibration["bias"], dtype=np.float64)
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(np.asarray(probs, np.float64)[np.arange(len(labels)), labels], 1e-12, None)).mean())


def held_out_nll(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, method: str) -> float:
    """The NLL of `method` fitted on the other folds, over every image: what it does on images
    (whole lesions) it was not fitted on."""
    from sklearn.model_selection import GroupKFold

    folds = min(HELD_OUT_FOLDS, len(np.unique(groups)))
    total = 0.0
    for fit_rows, held_rows in GroupKFold(folds).split(probs, labels, groups):
        calibration = fit(probs[fit_rows], labels[fit_rows], method)
        total += nll(apply(probs[held_rows], calibration), labels[held_rows]) * len(held_rows)
    return total / len(labels)


def choose(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, setting: str
           ) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """The calibration `setting` (train.calibration) asks for, fitted on all of `probs`, and for
    auto each method's held-out NLL. auto keeps the per-class bias only when it predicts held-out
    lesions better than the temperature alone: with a few dozen images of the rare classes the
    bias can fit noise."""
    if setting == "none":
        return None, {}
    if setting != "auto":
        return fit(probs, labels, setting), {}
    if len(np.unique(groups)) < 2:  # nothing to hold out: the method that cannot move an argmax
        return fit(probs, labels, "temperature"), {}
    scores = {method: held_out_nll(probs, labels, groups, method) for method in METHODS}
    best = min(METHODS, key=lambda m: (scores[m], METHODS.index(m)))  # a tie: temperature
    return fit(probs, labels, best), scores


# -- operating points ---------------------------------------------------------------------------

def class_indices(classes: list[str]) -> list[int]:
    return [CLASSES.index(c) for c in classes]


def flag_scores(calibrated: np.ndarray, classes: list[str]) -> np.ndarray:
    """Each image's score for an operating point: its calibrated probability of any of `classes`."""
    return np.asarray(calibrated, np.float64)[:, class_indices(classes)].sum(1)


def positives_of(labels: np.ndarray, classes: list[str]) -> np.ndarray:
    return np.isin(labels, class_indices(classes))


def choose_threshold(scores: np.ndarray, positives: np.ndarray, sensitivity: float) -> float:
    """The highest threshold at which at least `sensitivity` of the positives score >= it: the
    k-th highest positive score, k = ceil(sensitivity * positives)."""
    ranked = np.sort(scores[positives])[::-1]
    if len(ranked) == 0:
        raise ValueError("no positives to choose a threshold on")
    k = max(1, math.ceil(sensitivity * len(ranked) - 1e-9))  # 0.8 * 10 is 8.000000000000002 in floats
    return float(ranked[k - 1])


def operating_points(calibrated: np.ndarray, labels: np.ndarray, settings: list[Any]) -> list[dict[str, Any]]:
    """The checkpoint's operating points (docs/metrics.md): each setting's threshold chosen on
    these (validation) images, with the sensitivity and specificity it reaches on them."""
    points = []
    for op in settings:
        scores, positives = flag_scores(calibrated, op.classes), positives_of(labels, op.classes)
        threshold = choose_threshold(scores, positives, op.sensitivity)
        flagged = scores >= threshold
        points.append({"name": op.name, "classes": list(op.classes), "target_sensitivity": float(op.sensitivity),
                       "threshold": threshold, "val_sensitivity": float(flagged[positives].mean()),
                       "val_specificity": float((~flagged[~positives]).mean()) if (~positives).any() else None})
    return points


def ensemble_operating_points(checkpoints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operating points of several checkpoints averaged together (cv.folds): those every
    member has, at the mean of the members' thresholds (each chosen on that fold's validation
    images). A checkpoint from before operating points has none."""
    lists = [{op["name"]: op for op in c.get("operating_points") or []} for c in checkpoints]
    out = []
    for name, first in lists[0].items():
        if all(name in ops for ops in lists[1:]):
            out.append({**first, "threshold": float(np.mean([ops[name]["threshold"] for ops in lists]))})
    return out


def decisions(calibrated: np.ndarray, points: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """For each operating point, by name, which images it flags."""
    return {op["name"]: flag_scores(calibrated, op["classes"]) >= op["threshold"] for op in points}
