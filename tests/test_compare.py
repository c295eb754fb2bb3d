"""hmnist compare on predictions CSV files: the paired test, its verdicts, its errors.
(On experiments and git revisions: tests/test_share.py.)"""
import json

import numpy as np
import pandas as pd
import pytest

from hmnist.compare import check_same_test_set, compare, read_run
from hmnist.config import CLASSES
from hmnist.errors import UserError

from conftest import BIN, run

COLUMNS = [c.upper() for c in CLASSES]


def predictions(labels, lesions, signal, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), len(CLASSES)))
    logits[np.arange(len(labels)), labels] += signal
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    frame = pd.DataFrame(probs, columns=COLUMNS)
    frame.insert(0, "image", [f"ISIC_{i:07d}" for i in range(len(labels))])
    frame["lesion_id"] = [f"HAM_{l:07d}" for l in lesions]
    frame["dx"] = [CLASSES[i] for i in labels]
    return frame


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.choice(len(CLASSES), size=500)
    lesions = np.arange(500) // 2
    paths = {}
    for name, signal, seed in (("weak", 0.5, 1), ("weak_again", 0.5, 2), ("strong", 3.0, 3)):
        paths[name] = tmp_path / f"{name}.csv"
        predictions(labels, lesions, signal, seed).to_csv(paths[name], index=False)
    return paths


def hmnist(*args, cwd):
    return run([str(BIN / "hmnist"), "compare", *map(str, args)], cwd, check=False)


def in_process(capsys, *args):
    """`hmnist compare ARGS` without a new interpreter: (exit code, stdout, stderr)."""
    from hmnist.cli import main

    capsys.readouterr()
    try:
        main(["compare", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_verdicts_and_json(runs, tmp_path):
    result = hmnist(runs["weak"], runs["strong"], "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["images"] == 500 and out["lesions"] == 250 and out["resamples"] == 2000
    for name in ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "melanoma_sensitivity"):
        row = out["metrics"][name]
        assert row["verdict"] == "B better" and row["low"] > 0, (name, row)


def test_table_and_verdicts(runs, capsys):
    code, text, _ = in_process(capsys, runs["weak"], runs["strong"])
    assert code == 0 and "95% interval" in text
    assert [line.split()[-2:] for line in text.splitlines()[2:]] == [["B", "better"]] * 5
    code, out, _ = in_process(capsys, runs["strong"], runs["weak"], "--json")
    assert json.loads(out)["metrics"]["balanced_accuracy"]["verdict"] == "A better"
    # two runs of the same quality: the difference is within the noise
    same = compare(read_run(str(runs["weak"])), read_run(str(runs["weak_again"])))
    assert same["metrics"]["balanced_accuracy"]["verdict"] == "no detectable difference"
    low, high = same["metrics"]["balanced_accuracy"]["low"], same["metrics"]["balanced_accuracy"]["high"]
    assert low < 0 < high


def test_errors(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = pd.read_csv(runs["weak"]).iloc[:-10]
    other.to_csv(tmp_path / "fewer.csv", index=False)
    relabelled = pd.read_csv(runs["weak"]).assign(dx="mel")
    relabelled.to_csv(tmp_path / "relabelled.csv", index=False)
    pd.read_csv(runs["weak"]).drop(columns="dx").to_csv(tmp_path / "no_truth.csv", index=False)
    cases = [
        ((runs["weak"], tmp_path / "fewer.csv"), "are not on the same test images (500 and 490 images, 490 in common)"),
        ((runs["weak"], tmp_path / "relabelled.csv"), "disagree on the dx of image"),
        ((runs["weak"], tmp_path / "missing.csv"), "missing.csv: no such predictions file"),
        ((runs["weak"], tmp_path / "no_truth.csv"), "predictions lack column(s) dx"),
        ((runs["weak"], "no-such-experiment"), "is not a DVC project"),
    ]
    for args, message in cases:
        code, out, err = in_process(capsys, *args)
        assert code == 2, (args, out, err)
        assert err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_without_lesion_ids_images_are_the_unit(runs, capsys):
    frame = read_run(str(runs["weak"]))
    bare = frame.drop(columns="lesion_id")
    bare.to_csv(runs["weak"], index=False)
    again = read_run(str(runs["weak"]))
    assert "resampling images, not lesions" in capsys.readouterr().err
    assert (again["lesion_id"] == again["image"]).all()
    with pytest.raises(UserError, match="disagree on the lesion_id"):
        check_same_test_set(again, read_run(str(runs["strong"])), "A", "B")
