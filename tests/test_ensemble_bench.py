"""benchmarks/ensemble.py: a post-hoc ensemble is the mean of its runs' probabilities, scored
as the evaluate stage scores, and written so that `hmnist compare` reads it."""
import json
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from hmnist.commands import compare
from hmnist.config import CLASS_COLUMNS, CLASSES

sys.path.insert(0, str(REPO / "benchmarks"))
import ensemble  # noqa: E402  (a script beside the other benchmarks, not a package module)


def _run(path, probs, truth, order):
    frame = pd.DataFrame(probs, columns=CLASS_COLUMNS)
    frame.insert(0, "image", [f"img{i}" for i in range(len(truth))])
    frame["lesion_id"] = [f"les{i}" for i in range(len(truth))]
    frame["dx"] = [CLASSES[t] for t in truth]
    frame.iloc[order].to_csv(path, index=False)  # rows in another order: matched by image, not position
    return path


def test_ensemble_averages_runs_by_image(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    truth = np.arange(40) % len(CLASSES)
    a, b = rng.dirichlet(np.ones(len(CLASSES)), 40), rng.dirichlet(np.ones(len(CLASSES)), 40)
    # each run alone is wrong on half the images; their mean puts the most weight on the truth
    a[np.arange(0, 40, 2), truth[::2]] += 3.0
    b[np.arange(1, 40, 2), truth[1::2]] += 3.0
    a[np.arange(40), truth] += 0.5
    b[np.arange(40), truth] += 0.5
    files = [_run(tmp_path / "a.csv", a, truth, rng.permutation(40)),
             _run(tmp_path / "b.csv", b, truth, rng.permutation(40))]
    out = tmp_path / "ens.csv"
    monkeypatch.setattr(sys, "argv", ["ensemble.py", *map(str, files), "--out", str(out)])
    ensemble.main()
    printed = json.loads(capsys.readouterr().out)
    assert printed["models"] == 2 and printed["accuracy"] == 1.0 and printed["balanced_accuracy"] == 1.0

    written = pd.read_csv(out)
    assert list(written["image"]) == sorted(written["image"])
    by_image = written.set_index("image").loc[[f"img{i}" for i in range(40)]]
    np.testing.assert_allclose(by_image[CLASS_COLUMNS].to_numpy(), (a + b) / 2, rtol=1e-6)

    compare.main([str(files[0]), str(out), "--resamples", "100"])  # hmnist compare reads what it wrote
    assert "accuracy" in capsys.readouterr().out


def test_ensemble_refuses_runs_on_other_images(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    truth = np.arange(10) % len(CLASSES)
    probs = rng.dirichlet(np.ones(len(CLASSES)), 10)
    a = _run(tmp_path / "a.csv", probs, truth, np.arange(10))
    b = _run(tmp_path / "b.csv", probs[:8], truth[:8], np.arange(8))
    monkeypatch.setattr(sys, "argv", ["ensemble.py", str(a), str(b)])
    with pytest.raises(Exception, match="b.csv"):
        ensemble.main()
