"""The export stage: the ONNX file (every model family, its self-check, its metadata), predict
with it, its errors, the model card against metrics.json, and the DVC model artifacts.

A tiny network is trained once for the module by running the real stages on the synthetic zip;
the model families are exported from untrained checkpoints at a tiny input size (the graph is
the architecture's either way).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from hmnist.config import CLASSES, ModelConfig
from hmnist.errors import UserError
from hmnist.onnx_export import TOLERANCE, check, export, reference_probs
from hmnist.models import create_model
from hmnist.onnx_model import CALIBRATED, INPUT, OUTPUT, OnnxModel
from synthetic import image_folder

from conftest import BIN, REPO, run, run_here, run_stages, tiny_params

ARCHIVE = Path("data/raw/skin-cancer-mnist-ham10000.zip")
COLUMNS = [c.upper() for c in CLASSES]


@pytest.fixture(scope="module")
def trained(synthetic_zip, tmp_path_factory) -> Path:
    """A project dir after every stage through export (no dvc needed; the stages in this
    process), the model with hflip TTA and the default calibration and operating points."""
    root = tmp_path_factory.mktemp("export_project")
    params = tiny_params(synthetic_zip)
    params["models"]["resnet9"]["tta"] = "hflip"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ARCHIVE).parent.mkdir(parents=True)
    shutil.copy(synthetic_zip, root / ARCHIVE)
    stdout = run_stages(root, ("prepare", "split", "train", "evaluate", "export"))
    assert "exported resnet9" in stdout and "export/MODEL_CARD.md" in stdout
    return root


def write_test_images(trained: Path, dest: Path) -> list[str]:
    """The test split's images as JPEG files in `dest`; their ids."""
    import zipfile

    ids = sorted(pd.read_csv(trained / "predictions/test.csv")["image"])
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(trained / ARCHIVE) as archive:
        for image_id in ids:
            (dest / f"{image_id}.jpg").write_bytes(archive.read(f"{image_folder(image_id)}/{image_id}.jpg"))
    return ids


def checkpoint_of(arch: str, size: int, tta: str = "dihedral", prepare_size: int = 48, seed: int = 0) -> dict:
    """An untrained checkpoint of `arch` at input `size`, with a calibration and an operating point."""
    from hmnist.models import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, create_model, data_config

    torch.manual_seed(seed)
    config = ModelConfig(arch=arch, resize=size, pretrained=False, tta=tta)
    model = create_model(config, pretrained=False).eval()
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model_name": arch.split("_")[0],
            "arch": arch, "model_config": asdict(config), "classes": list(CLASSES), "input_size": size,
            "prepare_size": prepare_size, **{k: list(v) for k, v in data_config(model).items()}, "tta": tta,
            "calibration": {"method": "temperature_bias", "temperature": 1.7,
                            "bias": [0.3, -0.2, 0.1, 0.0, 0.0, -0.1, -0.1]},
            "operating_points": [{"name": "mel@sens0.80", "classes": ["mel"], "target_sensitivity": 0.8,
                                  "threshold": 0.2}],
            "state_dict": model.state_dict()}


def user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, one `error:` line holding `fragments`, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and result.stderr.rstrip().endswith(lines[0]), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- every model family -----------------------------------------------------------------------

# the four families of params.yaml, architecture only, at a tiny input size (Swin's windows and
# DeiT's position embeddings follow img_size)
FAMILIES = [("resnet9", 32), ("tf_efficientnet_lite0", 32), ("deit_tiny_patch16_224", 32),
            ("swin_tiny_patch4_window7_224", 32)]


@pytest.mark.parametrize("arch,size", FAMILIES, ids=[a.split("_")[0] for a, _ in FAMILIES])
def test_every_family_exports_and_matches_pytorch(arch, size):
    """Raw pixels in, predict's probabilities out: normalisation, the TTA views and the
    calibration inside the graph, any batch size; the export's own check passes."""
    # dihedral: all 8 views in the graph for the CNN, the 2 of hflip for the others (their cost)
    checkpoint = checkpoint_of(arch, size, tta="dihedral" if arch == "resnet9" else "hflip")
    data = export([checkpoint], ["model.pt"])
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    worst = check(data, [checkpoint], images, "model.onnx")
    assert worst <= TOLERANCE

    onnx_model = OnnxModel(data, "model.onnx")
    assert (onnx_model.arch, onnx_model.input_size, onnx_model.prepare_size) == (arch, size, 48)
    assert onnx_model.classes == list(CLASSES) and onnx_model.tta == checkpoint["tta"]
    assert onnx_model.calibration == [checkpoint["calibration"]]
    assert onnx_model.operating_points == checkpoint["operating_points"]
    # the graph alone, as a user without hmnist runs it: float32 NHWC RGB 0..255 at the input size
    from hmnist.augment import ModelInput

    pixels = ModelInput.planes(torch.from_numpy(images), size).permute(0, 2, 3, 1).numpy()
    expected, expected_calibrated = reference_probs([checkpoint], images)
    for batch in (1, 3):  # the batch axis is dynamic
        probs, calibrated = onnx_model.session.run([OUTPUT, CALIBRATED], {INPUT: pixels[:batch]})
        np.testing.assert_allclose(probs, expected[:batch], atol=TOLERANCE)
        np.testing.assert_allclose(calibrated, expected_calibrated[:batch], atol=TOLERANCE)
    # the calibration and the views matter: without them the outputs would differ
    assert np.abs(expected - expected_calibrated).max() > 1e-3


def test_the_check_fails_a_wrong_export():
    """A graph that is not the checkpoints' (another calibration, other views) fails the check."""
    checkpoint = checkpoint_of("resnet9", 32, tta="hflip")
    data = export([checkpoint], ["model.pt"])
    images = np.random.default_rng(1).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    for change in ({"calibration": None}, {"tta": "none"}):
        with pytest.raises(UserError, match="ONNX Runtime's probabilities differ from PyTorch's by up to"):
            check(data, [{**checkpoint, **change}], images, "model.onnx")


def test_an_ensemble_exports_as_one_graph():
    """cv.folds' checkpoints: the mean of their probabilities and of their calibrated ones, and
    the operating points at the mean threshold, as predict takes an ensemble."""
    members = [checkpoint_of("resnet9", 32, tta="hflip", seed=s) for s in (0, 1)]
    members[1]["calibration"] = None
    members[1]["operating_points"] = [{**members[0]["operating_points"][0], "threshold": 0.4}]
    data = export(members, ["model.pt", "fold1.pt"])
    images = np.random.default_rng(2).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    assert check(data, members, images, "model.onnx") <= TOLERANCE
    onnx_model = OnnxModel(data, "model.onnx")
    assert onnx_model.members == 2 and onnx_model.operating_points[0]["threshold"] == pytest.approx(0.3)
    with pytest.raises(UserError, match="differ in input_size: one export holds checkpoints of one input size, cache "
                                        "size and class list"):
        export([members[0], checkpoint_of("resnet9", 40)], ["model.pt", "fold1.pt"])


def metadata_checkpoint(seed: int, frame: pd.DataFrame, fields: list[str]) -> dict:
    """An untrained ResNet9 checkpoint fused with `fields`, its encoding fitted on `frame`
    (as a fold's on its own train rows), the metadata branch strong enough to move the output."""
    from hmnist import fusion

    checkpoint = checkpoint_of("resnet9", 32, tta="hflip", seed=seed)
    encoding = fusion.Encoding.fit(frame, fields)
    model = fusion.fuse(create_model(ModelConfig(arch="resnet9", resize=32, pretrained=False), pretrained=False),
                        encoding, len(CLASSES))
    with torch.no_grad():
        for layer in (model.metadata[0], model.metadata[2]):
            layer.weight.mul_(4)
    return {**checkpoint, "metadata": encoding.to_checkpoint(), "state_dict": model.state_dict()}


def metadata_rows(n: int, seed: int) -> pd.DataFrame:
    """Rows with every kind of value: known and missing ages, unknown and unseen sexes and sites."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "age": rng.choice([35.0, 50.0, 72.5, np.nan, 5.0], n),
        "sex": rng.choice(["male", "female", "unknown", "", "other"], n),
        "localization": rng.choice(["back", "face", "trunk", "scalp", "acral", "unknown", "elbow"], n)})


def test_a_metadata_model_exports_with_a_second_input():
    """A metadata model's graph takes the fields as a second input, in plain units (age in
    years, one-hot values), whatever each fold's own encoding: two folds fitted on different
    rows (other age statistics, other sites seen, one without sex) give predict's ensemble."""
    from hmnist.onnx_export import member_map
    from hmnist.onnx_model import METADATA, input_encoding

    train = [metadata_rows(40, 0), metadata_rows(40, 1)]
    train[0] = train[0][train[0]["localization"] != "scalp"]  # fold 0 never saw the scalp, fold 1 did
    members = [metadata_checkpoint(0, train[0], ["age", "sex", "localization"]),
               metadata_checkpoint(1, train[1], ["age", "localization"])]
    given = input_encoding(members)
    assert given.fields == ("age", "sex", "localization") and (given.age_mean, given.age_scale) == (0.0, 1.0)
    rows = metadata_rows(12, 2)
    from hmnist.fusion import checkpoint_encoding

    for member in members:  # each fold's encoding, from the graph's input: the same numbers
        own = checkpoint_encoding(member)
        weight, shift = member_map(given, own)
        np.testing.assert_allclose(given.encode(rows) @ weight + shift, own.encode(rows), atol=1e-6)
        np.testing.assert_allclose(given.encode(None, 3) @ weight + shift, own.encode(None, 3), atol=1e-6)

    data = export(members, ["model.pt", "fold1.pt"])
    images = np.random.default_rng(3).integers(0, 256, (12, 48, 48, 3), dtype=np.uint8)
    assert check(data, members, images, "model.onnx", rows) <= TOLERANCE
    assert check(data, members, images, "model.onnx") <= TOLERANCE  # every field missing
    onnx_model = OnnxModel(data, "model.onnx")
    assert onnx_model.encoding == given and onnx_model.members == 2
    columns = json.loads(onnx_model.metadata["metadata_columns"])
    assert len(columns) == given.width and columns[:2] == ["age in years (0 when unknown)", "age unknown (1 or 0)"]
    assert "localization = scalp" in columns and "sex unknown" in columns
    # the graph alone, as a user without hmnist feeds it; the fields move the output
    from hmnist.augment import ModelInput

    pixels = ModelInput.planes(torch.from_numpy(images), 32).permute(0, 2, 3, 1).numpy()
    expected, _ = reference_probs(members, images, rows=rows)
    probs, _ = onnx_model.session.run([OUTPUT, CALIBRATED], {INPUT: pixels, METADATA: given.encode(rows)})
    np.testing.assert_allclose(probs, expected, atol=TOLERANCE)
    missing, _ = reference_probs(members, images)
    assert np.abs(expected - missing).max() > 1e-3
    # a metadata ensemble with an image-only member: that member ignores the input
    mixed = [members[0], checkpoint_of("resnet9", 32, tta="hflip", seed=2)]
    assert check(export(mixed, ["model.pt", "fold1.pt"]), mixed, images, "model.onnx", rows) <= TOLERANCE


# -- the stage, predict, the card -----------------------------------------------------------------

def test_the_export_equals_evaluate_on_the_test_split(trained):
    """export/model.onnx, on the prepared test images, gives evaluate's probabilities and
    calibrated probabilities (predictions/*.csv) within the stated tolerance."""
    from hmnist.data import load_prepared, load_split, split_rows

    images, index = load_prepared(trained / "data/prepared")
    rows = split_rows(index, load_split(trained / "data/split.csv"), "test")
    onnx_model = OnnxModel(trained / "export/model.onnx")
    probs, calibrated = onnx_model.run_cache(np.asarray(images[rows]))
    expected = pd.read_csv(trained / "predictions/test.csv")
    expected_calibrated = pd.read_csv(trained / "predictions/test_calibrated.csv")
    assert expected["image"].tolist() == index["image_id"].iloc[rows].tolist()
    np.testing.assert_allclose(probs, expected[COLUMNS].to_numpy(), atol=TOLERANCE)
    np.testing.assert_allclose(calibrated, expected_calibrated[COLUMNS].to_numpy(), atol=TOLERANCE)
    assert onnx_model.tta == "hflip" and onnx_model.calibration[0] is not None
    assert [op["name"] for op in onnx_model.operating_points] == ["mel@sens0.80", "malignant@sens0.90"]


def test_predict_with_the_onnx_file_writes_the_same_csvs(trained, tmp_path):
    """`hmnist predict --checkpoint export/model.onnx`: the submission, the calibrated
    probabilities and the decisions of `--checkpoint models/model.pt`."""
    ids = write_test_images(trained, tmp_path / "images")
    outputs = {}
    for name, checkpoint in (("pt", "models/model.pt"), ("onnx", "export/model.onnx")):
        out = tmp_path / name / "predictions.csv"
        # in this process (conftest.run_here): the console script's own run is test_predict's
        result = run_here([BIN / "hmnist", "predict", "--checkpoint", trained / checkpoint, tmp_path / "images",
                           "--out", out, "--device", "cpu", "--batch-size", "7"], tmp_path)
        assert f"classified {len(ids)} image(s) with TTA (hflip)" in result.stdout
        outputs[name] = [pd.read_csv(out.with_name(f), keep_default_na=False)
                         for f in ("predictions.csv", "predictions_calibrated.csv", "predictions_decisions.csv")]
    for pt, onnx in zip(outputs["pt"][:2], outputs["onnx"][:2]):
        assert onnx["image"].tolist() == pt["image"].tolist() == ids
        np.testing.assert_allclose(onnx[COLUMNS].to_numpy(), pt[COLUMNS].to_numpy(), atol=TOLERANCE)
    pd.testing.assert_frame_equal(outputs["onnx"][2], outputs["pt"][2])
    assert outputs["pt"][2].columns.tolist() == ["image", "class", "mel@sens0.80", "malignant@sens0.90"]


def test_onnx_errors_are_one_line(trained, tmp_path):
    """Not ONNX, ONNX of another kind, an older export format or checkpoint version, a graph
    unlike its metadata, a TTA or --explain it cannot do: each a one-line error. The first
    through the console script (exit 2, no traceback, from a process of its own), the others
    through the same main() in this process."""
    import onnx
    from onnx import TensorProto, helper

    images = tmp_path / "images"
    write_test_images(trained, images)
    source = onnx.load(trained / "export/model.onnx")

    def predict(path: Path, *extra: str) -> subprocess.CompletedProcess:
        return run_here([BIN / "hmnist", "predict", "--checkpoint", path, images, "--out", tmp_path / "out.csv",
                         *extra], tmp_path, check=False)

    def edited(name: str, **props: str) -> Path:
        model = onnx.ModelProto()
        model.CopyFrom(source)
        for entry in model.metadata_props:
            if entry.key in props:
                entry.value = props[entry.key]
        path = tmp_path / name
        onnx.save(model, path)
        return path

    (tmp_path / "garbage.onnx").write_bytes(b"\x00not a protobuf at all" * 10)
    user_error(run([str(BIN / "hmnist"), "predict", "--checkpoint", str(tmp_path / "garbage.onnx"), str(images),
                    "--out", str(tmp_path / "out.csv")], tmp_path, check=False), "is not a readable ONNX file")
    # an ONNX model that is not hmnist's (another tool's classifier): no hmnist metadata
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 224, 224])])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    user_error(predict(tmp_path / "other.onnx"), "is not an hmnist export (no hmnist metadata in it)")
    user_error(predict(edited("old.onnx", hmnist_version="0")), "is hmnist export version 0, this hmnist reads version 1")
    user_error(predict(edited("oldckpt.onnx", checkpoint_version="0")),
               "was exported from a version 0 checkpoint")
    user_error(predict(edited("lies.onnx", input_size="64")), "is not the one its hmnist metadata describes")
    user_error(predict(edited("damaged.onnx", classes="[not json")), "is a damaged hmnist export")
    user_error(predict(edited("classes.onnx", classes=json.dumps(list(reversed(CLASSES))))),
               "not the ISIC 2018 ones")
    user_error(predict(trained / "export/model.onnx", "--tta", "dihedral"),
               "has its test-time augmentation built in (hflip)")
    user_error(predict(trained / "export/model.onnx", "--explain", str(tmp_path / "maps")),
               "--explain needs PyTorch checkpoints (.pt)")
    user_error(predict(tmp_path / "missing.onnx"), "not found: export one with `dvc repro export`")


def card_rows(card: str) -> dict[str, tuple[float, float | None, float | None]]:
    """The card's test-metrics table: name -> (value, low, high)."""
    rows = {}
    for name, value, span in re.findall(r"^\| `([^`]+)` \| ([-\d.]+|n/a) \| (\[[^\]]*\])? \|$", card, re.M):
        low, high = (float(x) for x in span.strip("[]").split(", ")) if span else (None, None)
        rows[name] = (float(value) if value != "n/a" else None, low, high)
    return rows


def test_the_model_card_numbers_are_metrics_json(trained):
    """Every number of metrics.json in the card, to its 4 decimals, with its interval; the split
    counts are data/split.csv's; the limitations this project measured are there."""
    card = (trained / "export/MODEL_CARD.md").read_text()
    metrics = json.loads((trained / "metrics/metrics.json").read_text())
    rows = card_rows(card)
    for name in ("balanced_accuracy", "accuracy", "macro_f1", "melanoma_sensitivity", "ece", "nll", "brier"):
        value, low, high = rows[name]
        assert value == pytest.approx(metrics[name], abs=5e-5), name
        assert (low, high) == (pytest.approx(metrics[f"{name}_low"], abs=5e-5),
                               pytest.approx(metrics[f"{name}_high"], abs=5e-5)), name
    numeric = {k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not k.endswith(("_low", "_high"))}
    assert numeric <= set(rows), numeric - set(rows)
    for name in numeric:
        assert rows[name][0] == pytest.approx(metrics[name], abs=5e-5), name
    # per class and per operating point: tables whose cells are metrics.json's
    for cls, values in metrics["per_class"].items():
        line = next(line for line in card.splitlines() if line.startswith(f"| {cls} |"))
        assert f"{values['recall']:.4f}" in line, line
    for name, values in metrics["operating_points"].items():
        for key in ("threshold", "sensitivity", "specificity"):
            value, low, high = rows[f"operating_points.{name}.{key}"]
            assert value == pytest.approx(values[key], abs=5e-5), (name, key)
            if f"{key}_low" in values:
                assert (low, high) == (pytest.approx(values[f"{key}_low"], abs=5e-5),
                                       pytest.approx(values[f"{key}_high"], abs=5e-5))

    split = pd.read_csv(trained / "data/split.csv")
    for name in ("train", "val", "test"):
        rows_of = split[split["split"] == name]
        counts = rows_of["dx"].value_counts()
        line = next(line for line in card.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:3] == [str(len(rows_of)), str(rows_of["lesion_id"].nunique())], line
        assert cells[3:10] == [str(counts.get(c, 0)) for c in CLASSES], line
        lesions = rows_of.drop_duplicates("lesion_id")["dx"].value_counts()
        line = next(line for line in card.splitlines() if line.startswith(f"| {name} lesions |"))
        assert line == f"| {name} lesions | " + " | ".join(str(lesions.get(c, 0)) for c in CLASSES) + " |"
    for section in ("## Model details", "## Intended use", "## Training and evaluation data",
                    "## Training procedure", "## Test metrics", "## Calibration", "## Operating points",
                    "## Limitations and ethical considerations", "## How to use"):
        assert section in card, section
    for fact in ("fair skin", "Dermoscopic images only", "not a medical device",
                 f"the test split holds {int((split[split['split'] == 'test']['dx'] == 'df').sum())} dermatofibroma"):
        assert fact in card, fact


def test_the_card_names_the_weights_kept():
    """An epoch's weights (raw or EMA) by their epoch; SWA's by the epochs averaged."""
    from hmnist.card import _kept
    assert _kept({"kept_weights": "ema", "best_epoch": 3}, {"epochs": 8}) == "epoch 3 of 8 (ema weights)"
    swa = {"kept_weights": "swa", "best_epoch": 12, "swa_epochs": [9, 10, 11, 12]}
    assert _kept(swa, {"epochs": 12}) == "the average of epochs 9-12 of 12 (SWA weights)"


# -- the DVC model artifacts ------------------------------------------------------------------------

def test_dvc_declares_the_model_artifacts(tmp_path):
    """dvc.yaml's artifacts, read by DVC, carry the selected model as a label; `dvc ls` lists the
    files; a version registered with gto is what `dvc artifacts get` downloads (docs/workflow.md)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"] = "swin"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "init"], root)

    from dvc.repo import Repo

    artifacts = Repo(str(root)).artifacts.read()["dvc.yaml"]
    assert set(artifacts) == {"skin-lesion-classifier", "skin-lesion-classifier-onnx"}
    for name, path in (("skin-lesion-classifier", "models/model.pt"), ("skin-lesion-classifier-onnx",
                                                                       "export/model.onnx")):
        artifact = artifacts[name]
        assert artifact.type == "model" and artifact.path == path and "swin" in artifact.labels and artifact.desc
        assert artifact.meta["card"] == "export/MODEL_CARD.md"
    listed = json.loads(run(["dvc", "ls", ".", "export", "--json"], root).stdout)
    assert {e["path"] for e in listed} == {"model.onnx", "MODEL_CARD.md"}

    run(["gto", "register", "skin-lesion-classifier-onnx", "--version", "v1.0.0"], root,
        env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t",
             "GIT_COMMITTER_EMAIL": "t@t.invalid"})
    import dvc.api

    shown = dvc.api.artifacts_show("skin-lesion-classifier-onnx", repo=str(root))
    assert shown["path"] == "export/model.onnx"
    assert shown["rev"] == run(["git", "rev-parse", "HEAD"], root).stdout.strip()


def test_the_stage_needs_the_metrics_of_its_model(tmp_path, monkeypatch):
    """The card reports evaluate's metrics of the exported model: missing, unreadable or another
    model's metrics/metrics.json is a one-line error naming the fix."""
    from hmnist.stages.export import read_metrics

    monkeypatch.chdir(tmp_path)
    checkpoints = [{"model_name": "lite0"}]
    with pytest.raises(UserError, match=r"^metrics/metrics.json not found: run `dvc repro evaluate` first$"):
        read_metrics(checkpoints)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/metrics.json").write_text("{not json")
    with pytest.raises(UserError, match=r"^cannot read metrics/metrics.json: .*: run `dvc repro evaluate`$"):
        read_metrics(checkpoints)
    (tmp_path / "metrics/metrics.json").write_text(json.dumps({"model": "deit", "balanced_accuracy": 0.5}))
    with pytest.raises(UserError, match=r"is of deit \(1 model\(s\)\), the checkpoints of lite0 \(1\)"):
        read_metrics(checkpoints)
    (tmp_path / "metrics/metrics.json").write_text(json.dumps({"model": "lite0", "ensemble_of": 3}))
    with pytest.raises(UserError, match=r"is of lite0 \(3 model\(s\)\), the checkpoints of lite0 \(1\)"):
        read_metrics(checkpoints)
    assert read_metrics([{"model_name": "lite0"}] * 3) == {"model": "lite0", "ensemble_of": 3}


def test_the_onnx_speed_benchmark_runs(tmp_path, monkeypatch, capsys):
    """benchmarks/onnx_speed.py --quick, at a tiny size, on params.yaml's default model (lite0):
    both ways timed at each batch size (the figures themselves mean nothing at this size). Run
    as `python benchmarks/onnx_speed.py` runs it (runpy, as __main__), in this process: a
    subprocess would spend seconds importing torch and onnxruntime again."""
    import runpy

    out = tmp_path / "speed.json"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["onnx_speed.py", "--quick", "--threads", "1", "--json", str(out)])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(REPO / "benchmarks/onnx_speed.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # the script sets its own; the tests after it keep theirs
    stdout = capsys.readouterr().out
    assert "lite0 (tf_efficientnet_lite0) at 32px" in stdout and "TTA hflip" in stdout
    results = json.loads(out.read_text())["results"]
    assert [r["batch"] for r in results] == [1, 4]
    for r in results:
        assert r["eager_images_per_second"] > 0 and r["onnx_images_per_second"] > 0
