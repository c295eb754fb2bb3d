"""Calibration and operating points on synthetic probabilities with a known answer."""
import numpy as np
import pytest

from hmnist import calibration
from hmnist.config import OperatingPointConfig
from hmnist.bootstrap import calibration_metrics, lesion_weights, operating_point_metrics, weighted_calibration
from hmnist.metrics import expected_calibration_error


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def calibrated_world(rng, n=6000, temperature=1.0, bias=np.zeros(7)):
    """True probabilities softmax(z), labels drawn from them, and a model that reports
    softmax(z * temperature - bias * temperature): calibrating it back needs T = `temperature`
    and the centred `bias`."""
    z = rng.normal(0, 2.0, size=(n, 7))
    labels = np.array([rng.choice(7, p=p) for p in softmax(z)])
    model = softmax(z * temperature - bias * temperature).astype(np.float32)
    return model, labels, softmax(z)


@pytest.mark.parametrize("temperature", [0.5, 2.5])  # over- and underconfident
def test_temperature_fit_recovers_a_known_temperature(temperature):
    probs, labels, _ = calibrated_world(np.random.default_rng(0), temperature=temperature)
    fitted = calibration.fit(probs, labels, "temperature")
    assert fitted["method"] == "temperature" and fitted["bias"] == [0.0] * 7
    assert fitted["temperature"] == pytest.approx(temperature, rel=0.06)
    # it never changes a prediction, and lowers the NLL
    calibrated = calibration.apply(probs, fitted)
    assert (calibrated.argmax(1) == probs.argmax(1)).all()
    assert calibration.nll(calibrated, labels) < calibration.nll(probs, labels) - 0.01


def test_temperature_and_bias_recover_a_prior_shift():
    bias = np.array([1.0, -1.0, 0.5, 0.0, 0.0, -0.5, 0.0])
    probs, labels, truth = calibrated_world(np.random.default_rng(1), temperature=2.0, bias=bias)
    fitted = calibration.fit(probs, labels, "temperature_bias")
    assert fitted["temperature"] == pytest.approx(2.0, rel=0.06)
    np.testing.assert_allclose(fitted["bias"], bias - bias.mean(), atol=0.12)
    assert sum(fitted["bias"]) == pytest.approx(0, abs=1e-9)
    np.testing.assert_allclose(calibration.apply(probs, fitted), truth, atol=0.06)


def test_auto_keeps_the_bias_only_where_held_out_lesions_need_it():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(1500), 2)  # two images per lesion
    shifted, labels, _ = calibrated_world(rng, n=3000, temperature=2.0, bias=np.array([1.5, -1.5, 0, 0, 0, 0, 0]))
    fitted, scores = calibration.choose(shifted, labels, groups, "auto")
    assert fitted["method"] == "temperature_bias" and scores["temperature_bias"] < scores["temperature"]
    assert calibration.choose(shifted, labels, groups, "none") == (None, {})
    assert calibration.choose(shifted, labels, groups, "temperature")[0]["method"] == "temperature"


def test_apply_without_calibration_changes_nothing():
    probs = softmax(np.random.default_rng(3).normal(size=(5, 7))).astype(np.float32)
    assert calibration.apply(probs, None) is probs
    identity = {"method": "temperature", "temperature": 1.0, "bias": [0.0] * 7}
    np.testing.assert_allclose(calibration.apply(probs, identity), probs, atol=1e-6)


@pytest.mark.parametrize("sensitivity", [0.8, 0.9, 0.5, 0.01])
def test_threshold_hits_its_target_on_validation(sensitivity):
    rng = np.random.default_rng(4)
    positives = rng.random(300) < 0.2
    scores = np.clip(rng.normal(0.3 + 0.3 * positives, 0.2), 0, 1).round(2)  # ties, as real probabilities have
    threshold = calibration.choose_threshold(scores, positives, sensitivity)
    assert (scores[positives] >= threshold).mean() >= sensitivity
    # the highest such: any threshold above it misses the target
    above = np.nextafter(threshold, np.inf)
    assert (scores[positives] >= above).mean() < sensitivity


def test_operating_points_on_validation_and_their_decisions():
    rng = np.random.default_rng(5)
    probs, labels, _ = calibrated_world(rng, n=800)
    settings = [OperatingPointConfig("mel@sens0.80", ["mel"], 0.8),
                OperatingPointConfig("malignant@sens0.90", ["mel", "bcc", "akiec"], 0.9)]
    points = calibration.operating_points(probs, labels, settings)
    assert [p["name"] for p in points] == ["mel@sens0.80", "malignant@sens0.90"]
    flagged = calibration.decisions(probs, points)
    malignant = np.isin(labels, [0, 2, 3])
    assert flagged["malignant@sens0.90"][malignant].mean() == points[1]["val_sensitivity"] >= 0.9
    assert (~flagged["mel@sens0.80"][labels != 0]).mean() == pytest.approx(points[0]["val_specificity"])
    np.testing.assert_array_equal(flagged["malignant@sens0.90"], probs[:, [0, 2, 3]].sum(1) >= points[1]["threshold"])
    # an ensemble: the points every member has, at the mean threshold
    other = [{**p, "threshold": p["threshold"] + 0.1} for p in points[:1]]
    ensemble = calibration.ensemble_operating_points([{"operating_points": points}, {"operating_points": other}])
    assert len(ensemble) == 1 and ensemble[0]["threshold"] == pytest.approx(points[0]["threshold"] + 0.05)
    assert calibration.ensemble_operating_points([{}]) == []  # a checkpoint from before operating points


def test_calibration_metrics_and_their_weighted_form():
    rng = np.random.default_rng(6)
    probs, labels, _ = calibrated_world(rng, n=400, temperature=3.0)
    plain = calibration_metrics(labels, probs)
    assert plain["ece"] == pytest.approx(expected_calibration_error(labels, probs))
    assert plain["nll"] == pytest.approx(calibration.nll(probs, labels))
    onehot = np.eye(7)[labels]
    assert plain["brier"] == pytest.approx(((probs - onehot) ** 2).sum(1).mean())
    # a weight of 2 on an image counts it twice
    weights = np.ones((1, 400))
    weights[0, :100] = 2
    doubled = np.concatenate([np.arange(100), np.arange(400)])
    for name, value in weighted_calibration(labels, probs, weights).items():
        assert value[0] == pytest.approx(calibration_metrics(labels[doubled], probs[doubled])[name])
    lesions = np.arange(400) // 2
    ranged = calibration_metrics(labels, probs, lesions, 200, 0)
    assert ranged["ece_low"] <= plain["ece"] <= ranged["ece_high"]
    assert lesion_weights(lesions, 200, 0).shape == (200, 400)


def test_operating_point_metrics():
    positives = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    flagged = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0], dtype=bool)
    out = operating_point_metrics(positives, flagged, np.arange(9), 500, 0)
    assert out["sensitivity"] == 0.75 and out["specificity"] == 0.8
    assert out["sensitivity_low"] <= 0.75 <= out["sensitivity_high"]
    assert operating_point_metrics(np.zeros(3, bool), np.ones(3, bool))["sensitivity"] is None


def test_compare_operating_points():
    from hmnist.bootstrap import compare_operating_points

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 7, 300)
    lesions = np.arange(300) // 3
    flags = {"mel@sens0.80": rng.random(300) < 0.3}
    everything = {"mel@sens0.80": np.ones(300, bool)}
    same = compare_operating_points(labels, lesions, {"mel@sens0.80": ["mel"]}, [flags], [flags], 300, 0)
    row = same["mel@sens0.80"]["specificity"]
    assert row["difference"] == row["low"] == row["high"] == 0 and row["verdict"] == "no detectable difference"
    worse = compare_operating_points(labels, lesions, {"mel@sens0.80": ["mel"]}, [flags], [everything, everything],
                                     300, 0)["mel@sens0.80"]
    assert worse["specificity"]["b"] == 0 and worse["specificity"]["verdict"] == "A better"
    assert worse["sensitivity"]["b"] == 1 and worse["sensitivity"]["verdict"] == "B better"
