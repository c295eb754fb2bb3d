"""Uncertainty: 95% intervals of the test metrics by resampling the test set's lesions, and the
paired comparison of two runs (or two recipes' runs) on the same lesion resamples, for the
classification metrics, the calibration metrics and the operating points' rates.

The test split is small where it matters (about 17 dermatofibromas and 21 vascular lesions in
1,500 images), so a difference of 0.02 in balanced accuracy can be noise. Each metric gets a
95% percentile interval from resampling the test set. Images of one lesion are near-copies
whose predictions go right or wrong together, so the unit resampled is the lesion, as in the
split: resampling images would treat them as independent and give intervals too narrow.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pandas as pd
from threadpoolctl import ThreadpoolController

from hmnist.config import CLASS_COLUMNS, CLASS_INDEX, CLASSES

INTERVAL_METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "melanoma_sensitivity")


@functools.cache
def _blas() -> ThreadpoolController:
    """The loaded BLAS libraries, found once: threadpool_limits scans every shared library of the
    process on each call (7 ms with torch loaded, more than the metrics it guards). numpy's BLAS,
    the one these products run on, is loaded by the time this first runs."""
    return ThreadpoolController()


def one_blas_thread():
    """threadpool_limits(1, user_api="blas"), from the libraries found once."""
    return _blas().limit(limits=1, user_api="blas")


def lesion_weights(lesion_ids: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """resamples x images: how often each image is drawn when the test set's lesions are drawn
    with replacement (every image of a drawn lesion comes along, once per draw)."""
    codes, inverse = np.unique(np.asarray(lesion_ids), return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(codes), size=(resamples, len(codes)))
    flat = (draws + len(codes) * np.arange(resamples)[:, None]).ravel()  # one bincount for every resample
    counts = np.bincount(flat, minlength=resamples * len(codes)).reshape(resamples, len(codes))
    return counts[:, inverse].astype(np.float64)


def weighted_metrics(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray,
                     names: tuple[str, ...] = INTERVAL_METRICS) -> dict[str, np.ndarray]:
    """`names` (of INTERVAL_METRICS) for each row of `weights` (an image drawn w times counts w
    times), all rows at once; a row of ones gives the plain metrics. NaN where a metric is
    undefined (a class absent from a resample drops out of the means, as in compute_metrics)."""
    # products of a (resamples x images) matrix with thin (images x 7) ones: BLAS's threads only
    # wait on each other there (25x slower on a busy 2-core machine), so one thread
    with one_blas_thread():
        return _weighted_metrics(labels, probs, np.atleast_2d(weights).astype(np.float64), names)


def _weighted_metrics(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray,
                      names: tuple[str, ...]) -> dict[str, np.ndarray]:
    k = len(CLASSES)
    predicted = probs.argmax(1)
    actual = np.eye(k)[labels]                       # images x classes
    hit = actual * (predicted == labels)[:, None]
    support, true_pos = weights @ actual, weights @ hit
    called = weights @ np.eye(k)[predicted]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN: NaN is the answer
        recall = true_pos / support
        out = {"balanced_accuracy": np.nanmean(recall, axis=1), "accuracy": true_pos.sum(1) / weights.sum(1),
               "melanoma_sensitivity": recall[:, CLASSES.index("mel")]}
        if "macro_f1" in names:
            # F1 of a class neither present nor predicted counts as 0, as sklearn's zero_division=0
            out["macro_f1"] = np.where(support + called > 0, 2 * true_pos / (support + called), 0.0).mean(1)
        if "macro_auc" in names:  # the costly one: a cumulative sum per class over every resample
            aucs = np.stack([_weighted_auc(labels == i, probs[:, i], weights) for i in range(k)], axis=1)
            out["macro_auc"] = np.nanmean(aucs, axis=1)
        return {name: out[name] for name in names}


def _weighted_auc(positives: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC per row of weights: the weighted share of (positive, negative) pairs
    ranked right, ties counting half (Mann-Whitney), from one sort shared by every row."""
    order = np.argsort(score, kind="stable")
    score, positives, weights = score[order], positives[order], weights[:, order]
    negative_mass = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(weights * ~positives, axis=1)], axis=1)
    first, past = np.searchsorted(score, score, "left"), np.searchsorted(score, score, "right")
    below, tied = negative_mass[:, first], negative_mass[:, past] - negative_mass[:, first]
    pos_weights = weights * positives
    pairs = pos_weights.sum(1) * negative_mass[:, -1]
    auc = (pos_weights * (below + 0.5 * tied)).sum(1) / pairs
    return np.where(pairs > 0, auc, np.nan)


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, lesion_ids: np.ndarray, resamples: int,
                        seed: int, level: float = 0.95, names: tuple[str, ...] = INTERVAL_METRICS
                        ) -> dict[str, tuple[float, float]]:
    """(low, high): the percentile interval of each metric in `names` over lesion resamples."""
    samples = weighted_metrics(labels, probs, lesion_weights(lesion_ids, resamples, seed), names)
    return {name: percentiles(values, level) for name, values in samples.items()}


def percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN (e.g. no AUC defined): NaN
        low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(labels: np.ndarray, probs_a: np.ndarray | list[np.ndarray], probs_b: np.ndarray | list[np.ndarray],
                     lesion_ids: np.ndarray, resamples: int, seed: int, level: float = 0.95,
                     names: tuple[str, ...] = INTERVAL_METRICS) -> dict[str, dict[str, float]]:
    """B - A for each metric in `names`, with its percentile interval over lesion resamples
    shared by both: the same test set redrawn for A and for B, so what the two have in common
    (which lesions are hard) cancels out of the difference.

    A and B are each one run's probabilities, or a list of several runs of one recipe (training
    seeds) on the same images: then a side's metric is the mean over its runs, and each resample
    also redraws the runs of each side with replacement (a two-level bootstrap: seeds, and the
    lesions shared by every run), so the interval holds the training noise as well as the test
    set's. With one run per side it is the lesion bootstrap alone."""
    weights = lesion_weights(lesion_ids, resamples, seed)
    seeds = np.random.default_rng([seed, 1])  # the runs' draws, apart from the lesions'
    point_a, sample_a = _recipe_samples(labels, probs_a, weights, seeds, names)
    point_b, sample_b = _recipe_samples(labels, probs_b, weights, seeds, names)
    out = {}
    for name in names:
        low, high = percentiles(sample_b[name] - sample_a[name], level)
        out[name] = {"a": point_a[name], "b": point_b[name], "difference": point_b[name] - point_a[name],
                     "low": low, "high": high}
    return out


def recipe_intervals(labels: np.ndarray, probs: list[np.ndarray], lesion_ids: np.ndarray, resamples: int,
                     seed: int, level: float = 0.95, names: tuple[str, ...] = INTERVAL_METRICS
                     ) -> dict[str, tuple[float, float, float]]:
    """(mean over the runs, low, high) of each metric for one recipe's runs: the two-level
    bootstrap of paired_bootstrap on one side; for one run, bootstrap_intervals' interval."""
    weights = lesion_weights(lesion_ids, resamples, seed)
    point, samples = _recipe_samples(labels, probs, weights, np.random.default_rng([seed, 1]), names)
    return {name: (point[name], *percentiles(samples[name], level)) for name in names}


def _recipe_samples(labels: np.ndarray, probs: np.ndarray | list[np.ndarray], weights: np.ndarray,
                    seeds: np.random.Generator, names: tuple[str, ...]
                    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """A recipe's metrics (mean over its runs) on the whole test set, and on each row of
    `weights` with the runs redrawn with replacement for each row (none drawn for one run)."""
    runs = [probs] if isinstance(probs, np.ndarray) else list(probs)
    ones = np.ones((1, len(labels)))
    point = {name: float(np.mean([weighted_metrics(labels, p, ones, names)[name][0] for p in runs])) for name in names}
    per_run = [weighted_metrics(labels, p, weights, names) for p in runs]
    if len(runs) == 1:
        return point, per_run[0]
    draws = seeds.integers(0, len(runs), size=(len(weights), len(runs)))
    rows = np.arange(len(weights))[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN: NaN
        samples = {name: np.nanmean(np.stack([r[name] for r in per_run])[draws, rows], axis=1) for name in names}
    return point, samples


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "B better"
    if high < 0:
        return "A better"
    if low <= 0 <= high:
        return "no detectable difference"
    return "undefined"  # NaN: the metric is undefined on this test set


def compare_runs(a: list[pd.DataFrame], b: list[pd.DataFrame], resamples: int = 2000, seed: int = 0) -> dict:
    """What `hmnist compare` prints (and `hmnist report` shows): B - A per metric, its 95%
    interval and verdict, for two recipes' runs given as predictions frames (image, MEL ... VASC,
    lesion_id, dx) on the same test images, one or more per side."""
    columns = CLASS_COLUMNS
    first = a[0]
    labels = first["dx"].map(CLASS_INDEX).to_numpy()
    rows = paired_bootstrap(labels, [f[columns].to_numpy(float) for f in a], [f[columns].to_numpy(float) for f in b],
                            first["lesion_id"].to_numpy(), resamples, seed)
    for name, row in rows.items():
        row["verdict"] = verdict(row["low"], row["high"])
        # NaN (a metric undefined on these images, e.g. no AUC without negatives) is not JSON
        rows[name] = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()}
    return {"images": len(first), "lesions": int(np.unique(first["lesion_id"]).size), "runs_a": len(a),
            "runs_b": len(b), "note": noise_note(len(a), len(b)), "resamples": resamples, "seed": seed,
            "metrics": rows}


def noise_note(runs_a: int, runs_b: int) -> str:
    """What compare_runs' interval holds: whether training noise is in it."""
    if runs_a > 1 and runs_b > 1:
        return (f"the interval resamples the test lesions and each side's runs ({runs_a} and {runs_b} training "
                "seeds): a verdict on the recipes")
    if runs_a == runs_b == 1:
        return ("one run per side: the interval holds the test set's noise, not training noise (another seed of "
                "either can land elsewhere); for a verdict on the recipes, compare several runs per side: "
                "A1,A2,A3 B1,B2,B3")
    return (f"only {'A' if runs_a > 1 else 'B'}'s training noise is in the interval ({max(runs_a, runs_b)} runs "
            "against 1): give the other side several runs too for a verdict on the recipes")


# -- calibration and operating points ----------------------------------------------------------

# The calibration metrics of metrics.json, each for any rows of lesion-resampling weights (a row
# of ones: the plain value), so that they get bootstrap intervals like the rest.
CALIBRATION_METRICS = ("ece", "nll", "brier")


def weighted_calibration(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray,
                         bins: int = 15) -> dict[str, np.ndarray]:
    """ECE (as metrics.expected_calibration_error), NLL (mean negative log-likelihood of the true class)
    and the Brier score (mean over images of the squared distance between the probability vector
    and the one-hot truth, summed over the classes: 0 to 2) for each row of `weights`."""
    weights = np.atleast_2d(weights).astype(np.float64)
    probs = probs.astype(np.float64)
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    which = np.eye(bins)[np.minimum((confidence * bins).astype(int), bins - 1)]  # images x bins
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    brier = ((probs - np.eye(probs.shape[1])[labels]) ** 2).sum(1)
    with one_blas_thread():  # see weighted_metrics
        gap = weights @ (which * confidence[:, None]) - weights @ (which * correct[:, None])
        total = weights.sum(1)
        return {"ece": np.abs(gap).sum(1) / total, "nll": weights @ nll / total, "brier": weights @ brier / total}


def calibration_metrics(labels: np.ndarray, probs: np.ndarray, lesion_ids: np.ndarray | None = None,
                        resamples: int = 0, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """`ece`, `nll`, `brier`, and with resamples their `_low`/`_high` lesion-bootstrap interval."""
    out = {name: float(v[0]) for name, v in weighted_calibration(labels, probs, np.ones((1, len(labels)))).items()}
    if resamples:
        samples = weighted_calibration(labels, probs, lesion_weights(lesion_ids, resamples, seed))
        for name, values in samples.items():
            out[f"{name}_low"], out[f"{name}_high"] = percentiles(values, level)
    return out


def operating_point_metrics(positives: np.ndarray, flagged: np.ndarray, lesion_ids: np.ndarray | None = None,
                            resamples: int = 0, seed: int = 0, level: float = 0.95) -> dict[str, float | None]:
    """Sensitivity (share of positives flagged) and specificity (share of negatives not flagged),
    with their lesion-bootstrap intervals; None where undefined (no positives, or no negatives)."""
    positives, flagged = positives.astype(np.float64), flagged.astype(np.float64)

    def rates(weights: np.ndarray) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"), one_blas_thread():
            return {"sensitivity": (weights @ (positives * flagged)) / (weights @ positives),
                    "specificity": (weights @ ((1 - positives) * (1 - flagged))) / (weights @ (1 - positives))}

    point = rates(np.ones((1, len(positives))))
    out: dict[str, float | None] = {}
    samples = rates(lesion_weights(lesion_ids, resamples, seed)) if resamples else {}
    for name, value in point.items():
        out[name] = None if np.isnan(value[0]) else float(value[0])
        if resamples:
            low, high = percentiles(samples[name], level)
            out[f"{name}_low"], out[f"{name}_high"] = (None, None) if np.isnan(low) else (low, high)
    return out


def compare_operating_points(labels: np.ndarray, lesion_ids: np.ndarray, points: dict[str, list[str]],
                             flags_a: list[dict[str, np.ndarray]], flags_b: list[dict[str, np.ndarray]],
                             resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """For each operating point (name -> its classes) both sides have: B - A of the test
    sensitivity and specificity each run reaches at its own validation threshold (`flags_*`:
    per run, per point, which test images it flags), with compare_runs' paired interval and
    verdict (several runs per side: the two-level bootstrap of paired_bootstrap)."""
    weights = lesion_weights(lesion_ids, resamples, seed)
    seeds = np.random.default_rng([seed, 2])  # the runs' draws, apart from the lesions'
    ones = np.ones((1, len(labels)))
    out = {}
    for name, classes in points.items():
        positives = np.isin(labels, [CLASSES.index(c) for c in classes]).astype(np.float64)

        def rates(flagged: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
            flagged = flagged.astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"), one_blas_thread():
                return {"sensitivity": (w @ (positives * flagged)) / (w @ positives),
                        "specificity": (w @ ((1 - positives) * (1 - flagged))) / (w @ (1 - positives))}

        def side(flags: list[dict[str, np.ndarray]]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
            point = {k: float(np.mean([rates(f[name], ones)[k][0] for f in flags])) for k in ("sensitivity", "specificity")}
            per_run = [rates(f[name], weights) for f in flags]
            if len(flags) == 1:
                return point, per_run[0]
            draws, rows = seeds.integers(0, len(flags), size=(resamples, len(flags))), np.arange(resamples)[:, None]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return point, {k: np.nanmean(np.stack([r[k] for r in per_run])[draws, rows], axis=1) for k in point}

        (point_a, sample_a), (point_b, sample_b) = side(flags_a), side(flags_b)
        out[name] = {"classes": list(classes)}
        for key in ("sensitivity", "specificity"):
            low, high = percentiles(sample_b[key] - sample_a[key], level)
            row = {"a": point_a[key], "b": point_b[key], "difference": point_b[key] - point_a[key],
                   "low": low, "high": high, "verdict": verdict(low, high)}
            out[name][key] = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()}
    return out
