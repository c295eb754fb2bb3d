"""Metrics with their uncertainty: the lesion bootstrap, its coverage, the paired comparison,
calibration."""
import numpy as np
import pytest

from hmnist.config import CLASSES
from hmnist.bootstrap import INTERVAL_METRICS, bootstrap_intervals, lesion_weights, paired_bootstrap, weighted_metrics
from hmnist.metrics import calibration_table, compute_metrics, expected_calibration_error

K = len(CLASSES)


def noisy_probs(labels, rng, signal=1.5, decimals=2):
    logits = rng.normal(size=(len(labels), K))
    logits[np.arange(len(labels)), labels] += signal
    probs = np.exp(logits)
    return (probs / probs.sum(1, keepdims=True)).round(decimals)  # rounding makes ties, as real outputs have


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_unit_weights_give_the_plain_metrics():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 4, 5], size=400, p=[0.2, 0.5, 0.1, 0.15, 0.05])  # akiec and vasc absent
    probs = noisy_probs(labels, rng)
    plain, weighted = compute_metrics(labels, probs), weighted_metrics(labels, probs, np.ones((1, len(labels))))
    for name in INTERVAL_METRICS:
        assert weighted[name][0] == pytest.approx(plain[name], abs=1e-12), name
    # integer weights are repeated images
    weights = rng.integers(0, 3, size=len(labels))
    repeated = np.repeat(np.arange(len(labels)), weights)
    by_weights = weighted_metrics(labels, probs, weights[None].astype(float))
    for name in INTERVAL_METRICS:
        assert by_weights[name][0] == pytest.approx(compute_metrics(labels[repeated], probs[repeated])[name]), name


def test_lesion_resampling_keeps_a_lesions_images_together():
    lesions = np.array(["a", "b", "b", "c", "c", "c", "d"])
    weights = lesion_weights(lesions, 5000, seed=1)
    assert weights.shape == (5000, 7)
    for lesion in "bc":
        same = weights[:, lesions == lesion]
        assert (same == same[:, :1]).all()  # drawn together, as often as each other
    assert (weights[:, [0, 1, 3, 6]].sum(1) == 4).all()  # 4 lesions drawn per resample, sizes aside
    assert len({tuple(row) for row in weights}) == 35  # every way to draw 4 of 4 lesions turns up
    np.testing.assert_array_equal(weights, lesion_weights(lesions, 5000, seed=1))  # seeded


def simulated_test_set(rng, recall):
    """Lesions of each class with 1-4 images that a model gets right or wrong together."""
    lesions_per_class = [20, 150, 10, 8, 20, 6, 6]
    labels, lesions, correct = [], [], []
    for c, n in enumerate(lesions_per_class):
        for _ in range(n):
            size = rng.integers(1, 5)
            labels += [c] * size
            lesions += [len(lesions)] * size
            correct += [rng.random() < recall[c]] * size
    labels, correct = np.array(labels), np.array(correct)
    predicted = np.where(correct, labels, (labels + 1) % K)
    return labels, np.eye(K)[predicted] * 0.9 + 0.1 / K, np.array(lesions)


def test_interval_coverage_on_a_known_answer():
    """95% intervals from many simulated test sets cover the true balanced accuracy 90-99% of the
    time; resampling images instead of lesions covers it less often (too narrow)."""
    recall = np.array([0.6, 0.9, 0.7, 0.5, 0.6, 0.5, 0.8])
    truth = recall.mean()
    rng = np.random.default_rng(0)
    covered = {"lesions": 0, "images": 0}
    sims = 200
    for i in range(sims):
        labels, probs, lesions = simulated_test_set(rng, recall)
        for unit, ids in (("lesions", lesions), ("images", np.arange(len(labels)))):
            low, high = bootstrap_intervals(labels, probs, ids, 400, seed=i, names=("balanced_accuracy",))[
                "balanced_accuracy"]
            covered[unit] += low <= truth <= high
    coverage = {unit: n / sims for unit, n in covered.items()}
    assert 0.90 <= coverage["lesions"] <= 0.99, coverage
    assert coverage["images"] < coverage["lesions"] - 0.03, coverage


def test_paired_bootstrap():
    rng = np.random.default_rng(2)
    labels = rng.choice(K, size=600)
    lesions = np.arange(600) // 2
    weak, strong = noisy_probs(labels, rng, 0.5), noisy_probs(labels, rng, 3.0)
    same = paired_bootstrap(labels, weak, weak, lesions, 500, seed=0)
    for name in INTERVAL_METRICS:
        assert same[name]["difference"] == same[name]["low"] == same[name]["high"] == 0, name
    better = paired_bootstrap(labels, weak, strong, lesions, 500, seed=0)
    for name in INTERVAL_METRICS:
        row = better[name]
        assert row["difference"] == pytest.approx(row["b"] - row["a"])
        assert 0 < row["low"] < row["difference"] < row["high"], (name, row)
    assert better["balanced_accuracy"]["a"] == pytest.approx(compute_metrics(labels, weak)["balanced_accuracy"])


def test_calibration():
    rng = np.random.default_rng(3)
    n = 20000
    confidence = rng.uniform(0.2, 1.0, n)
    labels = rng.choice(K, n)
    right = rng.random(n) < confidence  # calibrated: right as often as it is confident
    top = np.where(right, labels, (labels + 1) % K)
    probs = np.full((n, K), 0.0)
    probs[np.arange(n), top] = confidence
    probs[np.arange(n), (top + 2) % K] = 1 - confidence  # below the top whenever confidence > 0.5
    keep = confidence > 0.5
    labels, probs = labels[keep], probs[keep]
    assert expected_calibration_error(labels, probs) < 0.02
    overconfident = probs.copy()
    overconfident[overconfident == overconfident.max(1, keepdims=True)] = 1.0
    assert expected_calibration_error(labels, overconfident) > 0.2
    table = calibration_table(labels, probs)
    assert table["images"].sum() == len(labels) and len(table) == 15
    assert table["images"][table["bin_high"] <= 0.5].sum() == 0
