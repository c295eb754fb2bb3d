"""hmnist compare on predictions CSV files: the paired test, its verdicts, its errors, and the
recipe comparison over several runs per side (with a known-answer simulation).
(On experiments and git revisions: tests/test_pipeline.py.)"""
import json

import numpy as np
import pandas as pd
import pytest

from hmnist.commands.compare import compare
from hmnist.runs import _with_truth, check_same_test_set, read_run
from hmnist.config import CLASSES
from hmnist.errors import UserError
from hmnist.bootstrap import paired_bootstrap, verdict

from conftest import BIN, make_project, run

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
    from hmnist.commands.cli import main

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
    assert "one run per side: the interval holds the test set's noise, not training noise" in text
    assert [line.split()[-2:] for line in text.splitlines()[3:]] == [["B", "better"]] * 5
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
    for seed in ("-1", "4294967296"):  # before any run is read: argparse's usage and one error line
        code, out, err = in_process(capsys, runs["weak"], runs["strong"], "--seed", seed)
        assert code == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].endswith(f"argument --seed: must be between 0 and 4294967295, got {seed}"), err
    code, out, err = in_process(capsys, runs["weak"], runs["strong"], "--resamples", "50")
    assert code == 2 and err.strip().splitlines()[-1].endswith("argument --resamples: must be at least 100, got 50"), err


def test_a_revision_with_no_run_says_how_to_get_one(synthetic_zip, tmp_path, capsys):
    """The README's `hmnist compare main ...` on a fresh clone, where main has no dvc.lock: the
    message says to run and name experiments or commit a run, not `dvc exp pull`, which cannot help."""
    from hmnist.commands.cli import main as hmnist_main

    project = make_project(tmp_path / "project", synthetic_zip)  # committed, never run
    run(["git", "branch", "-M", "main"], project)
    expected = ("error: main has no finished run: its dvc.lock records no evaluate stage (a fresh clone's main has "
                "none). Name experiments and compare those (`dvc exp run -n baseline`, `dvc exp run -n other -S ...`, "
                "`hmnist compare baseline other`), or commit a finished run first (`dvc repro`, then "
                "`git add -A && git commit`)")
    for command in (["compare", "main", "main", "--repo", project],
                    ["report", "main", "--repo", project, "-o", tmp_path / "report.html"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            hmnist_main([str(a) for a in command])
        assert stopped.value.code == 2
        assert capsys.readouterr().err.strip() == expected, command[0]


def test_old_predictions_take_the_truth_from_their_split():
    """An older evaluate stage's predictions have no dx: the run's data/split.csv supplies it,
    and predictions of images that split does not hold are an error, not rows without a class."""
    old = predictions([0, 1], [0, 1], signal=1.0, seed=0).drop(columns=["lesion_id", "dx"])
    split = pd.DataFrame({"image_id": ["ISIC_0000000", "ISIC_0000001"], "lesion_id": ["HAM_a", "HAM_b"],
                          "dx": ["mel", "nv"], "split": ["test", "test"]})
    assert _with_truth(old, split, "old-run")["dx"].tolist() == ["mel", "nv"]
    with pytest.raises(UserError, match="^old-run: predictions/test.csv lists images that data/split.csv does not$"):
        _with_truth(old, split.iloc[:1], "old-run")


def test_without_lesion_ids_images_are_the_unit(runs, capsys):
    frame = read_run(str(runs["weak"]))
    bare = frame.drop(columns="lesion_id")
    bare.to_csv(runs["weak"], index=False)
    again = read_run(str(runs["weak"]))
    assert "resampling images, not lesions" in capsys.readouterr().err
    assert (again["lesion_id"] == again["image"]).all()
    with pytest.raises(UserError, match="disagree on the lesion_id"):
        check_same_test_set(again, read_run(str(runs["strong"])), "A", "B")


def test_log_level_quiets_the_notices_not_the_results(runs, capsys, monkeypatch):
    """By default `hmnist compare` says on stderr that it resamples images; HMNIST_LOG_LEVEL=WARNING
    keeps that notice back and the table unchanged; main() run again in one process says it once."""
    for name in ("weak", "strong"):
        pd.read_csv(runs[name]).drop(columns="lesion_id").to_csv(runs[name], index=False)
    notice = "has no lesion_id column: resampling images, not lesions"
    shown = hmnist(runs["weak"], runs["strong"], cwd=runs["weak"].parent)  # a fresh process: the real default
    assert shown.returncode == 0 and shown.stderr.count(notice) == 2, shown.stderr
    monkeypatch.setenv("HMNIST_LOG_LEVEL", "warning")
    assert in_process(capsys, runs["weak"], runs["strong"]) == (0, shown.stdout, "")
    monkeypatch.setenv("HMNIST_LOG_LEVEL", "INFO")
    code, out, err = in_process(capsys, runs["weak"], runs["strong"])
    assert (code, out, err.count(notice)) == (0, shown.stdout, 2), err  # one handler, however many runs
    monkeypatch.setenv("HMNIST_LOG_LEVEL", "quiet")
    assert in_process(capsys, runs["weak"], runs["strong"]) == (
        2, "", "error: HMNIST_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'quiet'\n")


def test_several_runs_per_side(runs, tmp_path, capsys):
    weak2 = tmp_path / "weak2.csv"
    predictions(np.asarray([CLASSES.index(c) for c in pd.read_csv(runs["weak"])["dx"]]), np.arange(500) // 2,
                0.5, 4).to_csv(weak2, index=False)
    code, out, err = in_process(capsys, f"{runs['weak']},{runs['weak_again']},{weak2}", runs["strong"], "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["runs_a"], result["runs_b"]) == (3, 1) and "only A's training noise" in result["note"]
    single = [compare(read_run(str(p)), read_run(str(runs["strong"])))["metrics"]["accuracy"]["a"]
              for p in (runs["weak"], runs["weak_again"], weak2)]
    assert result["metrics"]["accuracy"]["a"] == pytest.approx(np.mean(single))  # a side is its runs' mean
    assert result["metrics"]["accuracy"]["verdict"] == "B better"
    code, text, _ = in_process(capsys, f"{runs['weak']},{runs['weak_again']}", f"{weak2},{runs['strong']}")
    assert code == 0 and "each side's runs (2 and 2 training seeds): a verdict on the recipes" in text
    code, _, err = in_process(capsys, f"{runs['weak']},{runs['weak']}", runs["strong"])
    assert code == 2 and "names a run twice" in err


def seed_noisy_world(rng, runs, n_lesions=150, seed_sd=1.0, signal=1.5):
    """A test set and `runs` trained models of each of two equal recipes. Each lesion has its
    own difficulty, shared by every model; each training seed leans towards some classes (a
    random bias per class, the same for all its images): training noise that moves balanced
    accuracy from seed to seed as much as in real runs."""
    k = len(CLASSES)
    lesion_labels = rng.choice(k, size=n_lesions, p=[.11, .67, .05, .03, .11, .01, .02])
    images = rng.integers(1, 3, size=n_lesions)
    labels, lesions = np.repeat(lesion_labels, images), np.repeat(np.arange(n_lesions), images)
    difficulty = rng.normal(size=(n_lesions, k))[lesions]

    def trained():
        logits = difficulty + rng.normal(scale=seed_sd, size=k) + rng.normal(scale=0.5, size=(len(labels), k))
        logits[np.arange(len(labels)), labels] += signal
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    return labels, lesions, [trained() for _ in range(runs)], [trained() for _ in range(runs)]


def test_equal_recipes_known_answer():
    """Two equal recipes, seed-noisy runs: three runs per side give "no detectable difference"
    about 95% of the time; one run per side, the same simulations, much less often: the one-run
    interval leaves training noise out, so it calls differences that another seed would undo."""
    rng = np.random.default_rng(0)
    worlds, multi, single = 150, 0, 0
    for i in range(worlds):
        labels, lesions, a, b = seed_noisy_world(rng, runs=3)
        names = ("balanced_accuracy",)
        many = paired_bootstrap(labels, a, b, lesions, 300, i, names=names)["balanced_accuracy"]
        one = paired_bootstrap(labels, a[0], b[0], lesions, 300, i, names=names)["balanced_accuracy"]
        multi += verdict(many["low"], many["high"]) == "no detectable difference"
        single += verdict(one["low"], one["high"]) == "no detectable difference"
    assert 0.90 <= multi / worlds <= 0.995, multi / worlds
    assert single / worlds <= 0.85, single / worlds


def test_oof_needs_a_cross_validated_run(tmp_path, runs):
    """--oof reads predictions/oof.csv; a run trained with cv.folds 1 has only its header."""
    from hmnist.runs import OOF

    (tmp_path / "predictions").mkdir()
    frame = pd.read_csv(runs["weak"])
    frame.iloc[:0].to_csv(tmp_path / OOF, index=False)
    with pytest.raises(UserError, match="has no out-of-fold predictions: it was trained with cv.folds 1"):
        read_run("workspace", str(tmp_path), OOF)
    frame.to_csv(tmp_path / OOF, index=False)
    assert len(read_run("workspace", str(tmp_path), OOF)) == len(frame)
    (tmp_path / OOF).unlink()
    with pytest.raises(UserError, match="has no predictions/oof.csv: its evaluate stage predates"):
        read_run("workspace", str(tmp_path), OOF)
