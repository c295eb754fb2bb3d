"""End to end through DVC on the synthetic archive: what a user runs, on a CPU: repro, an
experiment, metrics diff, hmnist compare, and sharing the experiment with a second clone
through a git remote and a DVC remote (docs/sharing.md, "Sharing experiments")."""
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import balanced_accuracy_score

from conftest import BIN, PIPELINE as STAGES, REPO, run, run_here
from synthetic import image_folder

pytestmark = pytest.mark.slow


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_repro_exp_diff_compare_and_share(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"] = yaml.safe_load((REPO / "params.yaml").read_text())["model"]  # the shipped default
    params["models"]["resnet9"]["arch"] = "resnet9"  # the experiment below must learn, not only run
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    first = run(["dvc", "repro"], project)
    assert ran(first.stdout) == list(STAGES)
    metrics = json.loads((project / "metrics/metrics.json").read_text())
    assert metrics["model"] == "lite0" and metrics["arch"] == "tf_efficientnet_lite0"  # by default
    assert set(metrics["per_class"]) == {"mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"}
    # the metrics are those of the stage's own predictions, on exactly the test split's images
    split = pd.read_csv(project / "data/split.csv")
    test = split[split["split"] == "test"].sort_values("image_id")
    predictions = pd.read_csv(project / "predictions/test.csv")
    assert predictions["image"].tolist() == test["image_id"].tolist() == sorted(test["image_id"])
    predicted = predictions[["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]].to_numpy().argmax(1)
    actual = test["dx"].map({c: i for i, c in enumerate(("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"))})
    assert metrics["test_images"] == len(test)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(actual, predicted))
    assert metrics["accuracy"] == pytest.approx((actual.to_numpy() == predicted).mean())
    # every headline metric with its 95% interval, and the truth beside each prediction for `hmnist compare`
    for name in ("balanced_accuracy", "accuracy", "macro_f1", "melanoma_sensitivity"):
        assert metrics[f"{name}_low"] <= metrics[name] <= metrics[f"{name}_high"], name
    assert metrics["balanced_accuracy_high"] - metrics["balanced_accuracy_low"] > 0.01
    assert 0 <= metrics["ece"] <= 1
    for name in ("ece", "nll", "brier"):  # before and after the calibration, each with its interval
        for key in (name, f"{name}_uncalibrated"):
            assert metrics[f"{key}_low"] <= metrics[key] <= metrics[f"{key}_high"], key
    assert metrics["tta"] == "hflip" and metrics["calibration"] in ("temperature", "temperature_bias")
    assert set(metrics["operating_points"]) == {"mel@sens0.80", "malignant@sens0.90"}
    calibrated = pd.read_csv(project / "predictions/test_calibrated.csv")
    assert calibrated["image"].tolist() == predictions["image"].tolist()
    assert np.allclose(calibrated[["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]].sum(axis=1), 1, atol=1e-5)
    assert predictions["lesion_id"].tolist() == test["lesion_id"].tolist()
    assert predictions["dx"].tolist() == test["dx"].tolist()
    for path in ("plots/confusion_matrix.png", "plots/roc.png", "plots/reliability.png", "plots/training_curves.png"):
        assert (project / path).read_bytes().startswith(b"\x89PNG")
    assert split.groupby("lesion_id")["split"].nunique().max() == 1
    assert (project / "dvclive/plots/metrics/val/balanced_accuracy.tsv").exists()
    assert (project / "export/model.onnx").stat().st_size > 0
    assert "Model card: lite0 (tf_efficientnet_lite0)" in (project / "export/MODEL_CARD.md").read_text()

    second = run(["dvc", "repro"], project)
    assert ran(second.stdout) == [] and "up to date" in second.stdout.lower()

    # another model's settings are not this run's params: nothing to do but check the file
    other = yaml.safe_load((project / "params.yaml").read_text())
    other["models"]["swin"]["lr"] = 1e-3
    (project / "params.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    assert list(json.loads(run(["dvc", "status", "--json"], project).stdout)) == ["check_params"]
    assert ran(run(["dvc", "repro"], project).stdout) == ["check_params"]

    # a git remote for the commits and experiment refs, a DVC remote (a folder) for the data
    origin = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    run(["git", "remote", "add", "origin", str(origin)], project)
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "dvc-store")], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "lite0 baseline"], project)
    run(["dvc", "push"], project)  # the baseline's outputs, before an experiment changes the workspace
    bad_values_keep_the_outputs(project)
    exp = run(["dvc", "exp", "run", "-S", "model=resnet9", "-n", "resnet9-exp"], project)
    assert ran(exp.stdout) == ["check_params", "train", "evaluate", "export"]
    resnet9 = json.loads((project / "metrics/metrics.json").read_text())
    assert resnet9["model"] == "resnet9"
    # the synthetic classes are learnable: two tiny epochs already beat chance (1/7) by far
    # chance is 1/7 = 0.143; two epochs at 32 px of the per-class weighted loss reached 0.286 here
    assert resnet9["balanced_accuracy"] > 0.2, resnet9

    diff = run(["dvc", "metrics", "diff", "HEAD", "resnet9-exp", "--all", "--json"], project)  # --all: unchanged too
    rows = json.loads(diff.stdout)["metrics/metrics.json"]
    for key in ("accuracy", "balanced_accuracy", "balanced_accuracy_low", "balanced_accuracy_high", "ece",
                "macro_auc", "melanoma_sensitivity", "per_class.mel.recall", "ece_uncalibrated", "brier",
                "operating_points.mel@sens0.80.specificity"):
        assert "old" in rows[key] and "new" in rows[key], key
    text = run(["dvc", "metrics", "diff", "HEAD", "resnet9-exp"], project).stdout
    assert "balanced_accuracy" in text

    show = run(["dvc", "exp", "show", "--csv"], project).stdout
    assert "resnet9-exp" in show and "balanced_accuracy" in show
    plots = run(["dvc", "plots", "diff", "HEAD", "resnet9-exp", "--json"], project)
    assert "plots/confusion.csv" in plots.stdout and "plots/calibration.csv" in plots.stdout

    compared = compare_experiments(project, tmp_path)
    share_experiment(project, tmp_path, compared)


def bad_values_keep_the_outputs(project) -> None:
    """Issue 28: `dvc exp run -S models.deit.lr=-1` failed in train, after DVC had removed the
    model, metrics and plots; `epochs=true` passed DVC's params comparison (true == 1) and
    recorded an experiment. check_params stops both before any other stage, outputs untouched,
    and `git checkout params.yaml && dvc checkout` is the whole way back."""
    outputs = ("models/model.pt", "metrics/metrics.json", "dvclive/metrics.json", "plots/roc.png",
               "predictions/test.csv")
    before = {path: (project / path).read_bytes() for path in outputs}
    experiments = run(["dvc", "exp", "list", "--name-only"], project).stdout
    for value, message in (("models.deit.lr=-1", "models.deit.lr must be positive, got -1.0"),
                           ("models.deit.epochs=true", "models.deit.epochs must be int, got True")):
        bad = run(["dvc", "exp", "run", "-S", value], project, check=False)
        assert bad.returncode != 0
        assert ran(bad.stdout) == ["check_params"], bad.stdout
        assert (f"error: params.yaml: {message} (checked before any later stage ran, so their outputs are as "
                "they were: `git checkout params.yaml` takes back this and any other `-S` values)") in bad.stdout + bad.stderr
        assert "Traceback" not in bad.stdout + bad.stderr
        assert {path: (project / path).read_bytes() for path in outputs} == before, value
        run(["git", "checkout", "params.yaml"], project)
    assert run(["dvc", "exp", "list", "--name-only"], project).stdout == experiments  # none recorded
    run(["dvc", "checkout"], project)  # check_params's own output, which DVC removed before it ran
    assert "up to date" in run(["dvc", "status"], project).stdout.lower()


def hmnist_compare(cwd, *args, check=True):
    """`hmnist compare ARGS` in `cwd`, in this process (conftest.run_here): each a process of its
    own spent seconds importing pandas and DVC's API again; compare_experiments's first is one."""
    return run_here([BIN / "hmnist", "compare", *args], cwd, check=check)


def compare_experiments(project, tmp_path) -> dict:
    """hmnist compare on the baseline and the experiment, and its errors."""
    # the console script once, as a user runs it after `dvc exp run`
    result = json.loads(run([str(BIN / "hmnist"), "compare", "HEAD", "resnet9-exp", "--json"], project).stdout)
    assert result["images"] == len(pd.read_csv(project / "predictions/test.csv"))
    assert result["a"] == "HEAD" and result["b"] == "resnet9-exp"
    row = result["metrics"]["balanced_accuracy"]
    baseline = json.loads(run(["git", "show", "HEAD:metrics/metrics.json"], project).stdout)
    experiment = json.loads((project / "metrics/metrics.json").read_text())
    assert row["a"] == pytest.approx(baseline["balanced_accuracy"])
    assert row["b"] == pytest.approx(experiment["balanced_accuracy"])
    assert row["low"] <= row["difference"] <= row["high"]
    # `dvc exp run` leaves the experiment's outputs in the workspace: no difference at all
    same = json.loads(hmnist_compare(project, "workspace", "resnet9-exp", "--json").stdout)["metrics"]["accuracy"]
    assert same["difference"] == same["low"] == same["high"] == 0 and same["verdict"] == "no detectable difference"
    # each operating point: each run's test specificity at its own validation threshold, B - A
    points = result["operating_points"]
    assert set(points) == {"mel@sens0.80", "malignant@sens0.90"}
    for name, op in points.items():
        row = op["specificity"]
        assert row["a"] == pytest.approx(baseline["operating_points"][name]["specificity"])
        assert row["b"] == pytest.approx(experiment["operating_points"][name]["specificity"])
        assert row["low"] <= row["difference"] <= row["high"] and op["target_sensitivity"] in (0.8, 0.9)
    assert "mel@sens0.80 spec." in hmnist_compare(project, "HEAD", "resnet9-exp").stdout

    missing = hmnist_compare(project, "HEAD", "no-such-exp", check=False)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: 'no-such-exp' is not an experiment, git revision, branch or predictions")
    pd.read_csv(project / "predictions/test.csv").iloc[1:].to_csv(tmp_path / "fewer.csv", index=False)
    mismatch = hmnist_compare(project, "resnet9-exp", str(tmp_path / "fewer.csv"), check=False)
    assert mismatch.returncode == 2 and "are not on the same test images" in mismatch.stderr
    return result


def share_experiment(project, tmp_path, compared: dict) -> None:
    """dvc exp push, then in a second clone dvc exp pull: metrics diff, compare and predict work there."""
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], project)
    run(["dvc", "exp", "push", "origin", "resnet9-exp"], project)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", "-b", "main", str(tmp_path / "origin.git"), str(clone)], tmp_path)
    run(["dvc", "exp", "pull", "origin", "resnet9-exp"], clone)
    assert "resnet9-exp" in run(["dvc", "exp", "list", "--name-only"], clone).stdout
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "resnet9-exp", "--json", "--all"], clone).stdout)
    assert diff["metrics/metrics.json"]["balanced_accuracy"]["new"] == pytest.approx(
        compared["metrics"]["balanced_accuracy"]["b"])
    assert json.loads(hmnist_compare(clone, "HEAD", "resnet9-exp", "--json").stdout)["metrics"] == compared["metrics"]

    run(["dvc", "exp", "apply", "resnet9-exp"], clone)  # the experiment's files, checkpoint included
    predictions = pd.read_csv(clone / "predictions/test.csv")
    images = tmp_path / "images"
    images.mkdir()
    with zipfile.ZipFile(project / "data/raw/skin-cancer-mnist-ham10000.zip") as archive:
        for image_id in predictions["image"][:5]:
            (images / f"{image_id}.jpg").write_bytes(archive.read(f"{image_folder(image_id)}/{image_id}.jpg"))
    # predict in this process (conftest.run_here), reading the clone's files: the console
    # script's own process is test_predict's
    run_here([BIN / "hmnist", "predict", "--checkpoint", "models/model.pt", images, "--out", "new.csv",
              "--device", "cpu"], clone)
    columns = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    pd.testing.assert_frame_equal(pd.read_csv(clone / "new.csv")[columns], predictions[columns][:5], atol=1e-5)
    # the experiment's ONNX export came with it and says the same (onnx_export.TOLERANCE)
    run_here([BIN / "hmnist", "predict", "--checkpoint", "export/model.onnx", images, "--out", "onnx.csv"], clone)
    pd.testing.assert_frame_equal(pd.read_csv(clone / "onnx.csv")[columns], predictions[columns][:5], atol=1e-4)

    # the model registry (docs/workflow.md): register the baseline's ONNX model with gto, push the
    # tag, and `dvc artifacts get` downloads that version's file from the DVC remote
    run(["gto", "register", "skin-lesion-classifier-onnx", "HEAD", "--version", "v1.0.0"], project)
    run(["git", "push", "-q", "origin", "--tags"], project)
    # the bare origin's HEAD names the branch pushed (git init --bare names master): DVC clones its HEAD
    run(["git", "symbolic-ref", "HEAD", "refs/heads/main"], tmp_path / "origin.git")
    run(["dvc", "artifacts", "get", str(tmp_path / "origin.git"), "skin-lesion-classifier-onnx", "-o", "got.onnx"],
        tmp_path)
    lock = yaml.safe_load(run(["git", "show", "HEAD:dvc.lock"], project).stdout)
    md5 = next(o["md5"] for o in lock["stages"]["export"]["outs"] if o["path"] == "export/model.onnx")
    import hashlib

    assert hashlib.md5((tmp_path / "got.onnx").read_bytes()).hexdigest() == md5


def test_typo_fails_first_stage(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["split"]["tset"] = 0.2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    assert "error: params.yaml: unknown key 'split.tset'" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert not (project / "data/raw/skin-cancer-mnist-ham10000.zip").exists()
