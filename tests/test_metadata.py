"""Patient metadata fused with the image (fusion.py, issue 31): leakage fields refused, the
encoding, field dropout, a prediction that reads its own row and no other, predict --metadata
against the evaluate stage, bad metadata files, Grad-CAM of a metadata model, old checkpoints.

A tiny metadata model is trained once for the module by running the real stages on the
synthetic zip (whose metadata has HAM10000's columns, dx_type included).
"""
from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import hmnist
from hmnist.augment import ModelInput
from hmnist.cam import class_maps
from hmnist.commands import predict as predict_module
from hmnist.report_page import used_metadata
from hmnist.config import METADATA_FIELDS, ModelConfig, parse_params
from hmnist.data import load_prepared, load_split, split_rows
from hmnist.inference import inference_model, predict_probs
from hmnist.errors import UserError
from hmnist.fusion import Encoding, FusedModel, drop_fields, encoded_for, fuse
from hmnist.models import create_model, load_checkpoint, model_from_checkpoint, save_checkpoint
from hmnist.stages.evaluate import evaluate
from hmnist.trainer import train
from synthetic import metadata_frame

from conftest import TINY_ARCH, prepared_split, run, run_stages, tiny_params
from test_predict import ARCHIVE, assert_user_error, extract, main_error, split_ids, staged_project

CPU = torch.device("cpu")
FIELDS = list(METADATA_FIELDS)
LEAKAGE = ["dx_type", "lesion_id", "image_id", "dx"]


# -- params and the encoder ---------------------------------------------------------------------

@pytest.mark.parametrize("field", LEAKAGE)
def test_leakage_fields_are_refused_in_params(field, synthetic_zip):
    raw = tiny_params(synthetic_zip)
    raw["models"]["resnet9"]["metadata"] = ["age", field]
    with pytest.raises(UserError, match=f"models.resnet9.metadata lists '{field}', which must never reach a model"):
        parse_params(raw)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["models"]["resnet9"].update(metadata=["weight"]), "models.resnet9.metadata lists unknown field 'weight'"),
    (lambda p: p["models"]["resnet9"].update(metadata=["age", "age"]), "models.resnet9.metadata lists a field twice"),
    (lambda p: p["models"]["resnet9"].update(metadata_dropout=1.0), "models.resnet9.metadata_dropout must be in [0, 1)"),
    (lambda p: p["models"]["resnet9"].update(metadata=["sex"], layer_decay=0.8),
     "models.resnet9.layer_decay must be 1 (off) with metadata"),
    (lambda p: (p["models"]["resnet9"].update(metadata=["sex"]), p["train"].update(mixup=0.2)),
     "models.resnet9.metadata cannot be used with train.mixup or train.cutmix"),
    (lambda p: p["evaluate"].update(remove_metadata=["dx_type"]), "evaluate.remove_metadata lists 'dx_type'"),
])
def test_bad_metadata_params_name_the_key(edit, message, synthetic_zip):
    raw = tiny_params(synthetic_zip)
    edit(raw)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_params(raw)


def test_the_encoder_refuses_leakage_fields_and_reads_only_its_own():
    frame = metadata_frame(60, seed=0)  # HAM10000's columns: dx_type, lesion_id, image_id, dx beside the fields
    for field in LEAKAGE:
        with pytest.raises(UserError, match=f"metadata field '{field}' cannot reach a model"):
            Encoding.fit(frame, ["age", field])
    encoding = Encoding.fit(frame, FIELDS)
    shuffled = frame.copy()
    rng = np.random.default_rng(0)
    for column in LEAKAGE:
        shuffled[column] = rng.permutation(shuffled[column].to_numpy())
    np.testing.assert_array_equal(encoding.encode(frame), encoding.encode(shuffled))
    with pytest.raises(UserError, match=r"the prepared index has no localization column: it was prepared before"):
        Encoding.fit(frame.drop(columns="localization"), FIELDS)
    # ... and the encoder does read its fields: the check above can fail
    moved = frame.copy()
    moved["sex"] = rng.permutation(moved["sex"].to_numpy())
    assert not np.array_equal(encoding.encode(frame), encoding.encode(moved))


def test_the_encoding_is_fitted_on_its_rows_and_survives_the_checkpoint(tmp_path):
    train_rows = pd.DataFrame({"age": [20.0, 40.0, np.nan, 60.0], "sex": ["male", "female", "unknown", "male"],
                               "localization": ["back", "face", "back", None]})
    encoding = Encoding.fit(train_rows, ["localization", "age", "sex"])
    assert encoding.fields == ("age", "sex", "localization")  # canonical order, whatever the listing's
    assert encoding.age_mean == 40.0 and encoding.age_scale == pytest.approx(np.std([20, 40, 60]))
    assert dict(encoding.vocabularies) == {"sex": ("female", "male"), "localization": ("back", "face")}
    layout = encoding.layout()
    assert layout == {"age": slice(0, 2), "sex": slice(2, 5), "localization": slice(5, 8)} and encoding.width == 8
    new = pd.DataFrame({"age": [40.0 + encoding.age_scale, np.nan], "sex": ["female", ""],
                        "localization": ["acral", "FACE "]})  # unseen in training -> unknown; case and spaces
    np.testing.assert_allclose(encoding.encode(new), [[1, 0, 1, 0, 0, 0, 0, 1], [0, 1, 0, 0, 1, 0, 1, 0]])
    # every field missing: the same as rows whose fields are all empty
    np.testing.assert_array_equal(encoding.encode(None, 2), encoding.encode(new, missing=FIELDS))
    np.testing.assert_array_equal(encoding.encode(None, 1)[0], [0, 1, 0, 0, 1, 0, 0, 1])
    # in a checkpoint: plain data, loadable with weights_only
    torch.save({"metadata": encoding.to_checkpoint()}, tmp_path / "c.pt")
    again = Encoding.from_checkpoint(torch.load(tmp_path / "c.pt", weights_only=True)["metadata"])
    assert again == encoding


def test_field_dropout_drops_whole_fields_at_its_rate():
    frame = metadata_frame(400, seed=3)
    encoding = Encoding.fit(frame, FIELDS)
    x = torch.from_numpy(encoding.encode(frame))
    missing = torch.from_numpy(encoding.encode(None, len(frame)))
    assert torch.equal(drop_fields(x, encoding, 0.0, torch.Generator().manual_seed(0)), x)
    assert torch.equal(drop_fields(x, encoding, 1.0, torch.Generator().manual_seed(0)), missing)
    dropped = drop_fields(x, encoding, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, drop_fields(x, encoding, 0.3, torch.Generator().manual_seed(0)))  # seeded
    for name, columns in encoding.layout().items():
        kept = (dropped[:, columns] == x[:, columns]).all(1)
        gone = (dropped[:, columns] == missing[:, columns]).all(1)
        assert (kept | gone).all(), name  # a whole field or nothing
        was_missing = (x[:, columns] == missing[:, columns]).all(1)
        rate = (gone & ~was_missing).sum() / (~was_missing).sum()
        assert 0.24 < rate < 0.36, (name, rate)  # 0.3 of about 700 rows


# -- the fused model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic_zip):
    return prepared_split(tmp_path_factory.mktemp("prepared"), synthetic_zip)


def mechanics(synthetic_zip, **model) -> dict:
    raw = tiny_params(synthetic_zip)
    raw["models"]["resnet9"].update(resize=16, batch_size=4096, **model)
    raw["train"]["calibration"] = "none"  # not what these tests are about: seconds saved
    return raw


@pytest.fixture(scope="module")
def fused(data, synthetic_zip):
    images, index, split = data
    model, meta = train(parse_params(mechanics(synthetic_zip, metadata=FIELDS, epochs=3, lr=1e-2)), images, index, split)
    return model, meta


def test_a_metadata_model_is_fused_and_its_checkpoint_keeps_the_encoding(data, fused, tmp_path):
    images, index, split = data
    model, meta = fused
    assert isinstance(model, FusedModel)
    train_rows = split_rows(index, split, "train")
    assert Encoding.from_checkpoint(meta["metadata"]) == Encoding.fit(index.iloc[train_rows], FIELDS, 0.2)
    assert meta["model_config"]["metadata"] == FIELDS
    save_checkpoint(tmp_path / "m.pt", model, meta)
    checkpoint = load_checkpoint(tmp_path / "m.pt")
    loaded = model_from_checkpoint(checkpoint)
    rows = split_rows(index, split, "test")
    probs = evaluate(checkpoint, images[rows], 64, "cpu", metadata=index.iloc[rows])
    model_input = ModelInput(16, meta["mean"], meta["std"], CPU)
    again = predict_probs(loaded, torch.from_numpy(images[rows]), model_input, 7, CPU,
                          metadata=encoded_for(checkpoint, index.iloc[rows], len(rows)))
    np.testing.assert_allclose(probs, again, atol=1e-6)


def test_a_prediction_reads_its_own_metadata_row_and_no_other(data, fused):
    images, index, split = data
    model, meta = fused
    rows = split_rows(index, split, "test")
    checkpoint = {**meta, "state_dict": model.state_dict()}
    frame = index.iloc[rows].reset_index(drop=True)
    probs = evaluate(checkpoint, images[rows], 64, "cpu", metadata=frame)
    # the rows shuffled: the predictions change
    order = np.random.default_rng(0).permutation(len(frame))
    assert not (order == np.arange(len(frame))).all()
    shuffled = evaluate(checkpoint, images[rows], 64, "cpu", metadata=frame.iloc[order].reset_index(drop=True))
    moved = np.abs(shuffled - probs).max(1) > 1e-6
    assert moved.sum() >= len(frame) // 2, moved
    # one row changed: that image's prediction changes, no other's
    edited = frame.copy()
    edited.loc[0, ["age", "sex", "localization"]] = [5.0 if frame.loc[0, "age"] > 40 else 85.0,
                                                      "female" if frame.loc[0, "sex"] == "male" else "male", "unknown"]
    after = evaluate(checkpoint, images[rows], 64, "cpu", metadata=edited)
    assert np.abs(after[0] - probs[0]).max() > 1e-6
    np.testing.assert_array_equal(after[1:], probs[1:])
    # dx_type, lesion_id, image_id and dx changed: the same output, to the bit
    leaked = frame.copy()
    leaked["dx_type"] = "histo"
    for column in ("lesion_id", "image_id", "dx"):
        leaked[column] = frame[column].to_numpy()[order]
    np.testing.assert_array_equal(evaluate(checkpoint, images[rows], 64, "cpu", metadata=leaked), probs)


def test_prepare_keeps_the_fields_and_never_dx_type(data):
    _, index, _ = data
    assert "dx_type" not in index.columns
    assert {"age", "sex", "localization"} <= set(index.columns)


def test_grad_cam_explains_the_image_part_of_a_metadata_model():
    torch.manual_seed(0)
    for arch in ("resnet9", "deit_tiny_patch16_224"):
        backbone = create_model(ModelConfig(arch=arch, resize=64), pretrained=False)
        encoding = Encoding.fit(metadata_frame(60, seed=0), FIELDS)
        model = fuse(backbone, encoding, 7).eval()
        images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
        metadata = torch.from_numpy(encoding.encode(metadata_frame(60, seed=1).iloc[:2]))
        maps = class_maps(model, ModelInput(64, (0.5,) * 3, (0.25,) * 3, CPU), images, np.array([0, 3]),
                          metadata=metadata)
        assert maps.shape == (2, 40, 40) and np.isfinite(maps).all() and maps.std() > 0, arch


def test_the_report_says_when_a_model_read_metadata():
    assert used_metadata({"model": "lite0"}) == ""
    assert used_metadata({"metadata": "age,sex", "metadata_removed": "none"}) == " with patient metadata (age,sex)"
    assert "evaluated with age,sex removed" in used_metadata({"metadata": "age,sex", "metadata_removed": "age,sex"})


def test_an_image_only_checkpoint_from_before_metadata_still_loads(data, synthetic_zip, tmp_path):
    images, index, split = data
    model, meta = train(parse_params(mechanics(synthetic_zip, epochs=1)), images, index, split)
    assert not isinstance(model, FusedModel) and "metadata" not in meta  # image-only: the format as it was
    old = {**meta, "model_config": {k: v for k, v in meta["model_config"].items()
                                    if k not in ("metadata", "metadata_dropout")}}
    save_checkpoint(tmp_path / "old.pt", model, old)
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "old.pt"))
    assert not isinstance(loaded, FusedModel)
    rows = split_rows(index, split, "test")
    np.testing.assert_allclose(evaluate(load_checkpoint(tmp_path / "old.pt"), images[rows], 64, "cpu"),
                               evaluate({**meta, "state_dict": model.state_dict()}, images[rows], 64, "cpu",
                                        metadata=index.iloc[rows]), atol=1e-6)


# -- the pipeline and hmnist predict --metadata ---------------------------------------------------

@pytest.fixture(scope="module")
def trained(synthetic_zip, tmp_path_factory) -> Path:
    """A project after prepare, split, train and evaluate with a metadata model (and hflip TTA:
    each view reads the same row)."""
    root = tmp_path_factory.mktemp("metadata_project")
    params = tiny_params(synthetic_zip)
    params["models"]["resnet9"].update(tta="hflip", metadata=FIELDS, epochs=3, lr=1e-2)
    params["train"]["calibration"] = "temperature"
    return staged_project(root, params, synthetic_zip)


@pytest.fixture(scope="module")
def training_csv(trained) -> Path:
    """HAM10000_metadata.csv as the archive has it (dx, dx_type and lesion_id included)."""
    with zipfile.ZipFile(trained / ARCHIVE) as f:
        (trained / "HAM10000_metadata.csv").write_bytes(f.read("HAM10000_metadata.csv"))
    return trained / "HAM10000_metadata.csv"


@pytest.fixture(scope="module")
def heldout(trained, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("test_images")
    extract(trained, split_ids(trained, "test"), folder)
    return folder


def test_predict_with_the_training_csv_reproduces_evaluate(trained, training_csv, heldout, tmp_path, capsys):
    expected = pd.read_csv(trained / "predictions/test.csv")
    metrics = json.loads((trained / "metrics/metrics.json").read_text())
    assert metrics["metadata"] == "age,sex,localization" and metrics["metadata_removed"] == "none"
    model = hmnist.load(trained / "models/model.pt", device="cpu")
    result = model.classify(heldout, batch_size=5, metadata=training_csv)
    assert result.submission["image"].tolist() == expected["image"].tolist()
    np.testing.assert_allclose(result.submission.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:8].to_numpy(), atol=1e-5)
    err = capsys.readouterr().err
    assert "row(s) of" in err and "name no input image: ignored" in err  # the training CSV lists every image

    # the CLI says the same
    out = tmp_path / "p.csv"
    predict_module.main(["--checkpoint", str(trained / "models/model.pt"), "--device", "cpu", "--metadata",
                         str(training_csv), "--out", str(out), str(heldout)])
    assert "with the metadata of" in capsys.readouterr().out
    np.testing.assert_allclose(pd.read_csv(out).iloc[:, 1:].to_numpy(), expected.iloc[:, 1:8].to_numpy(), atol=1e-5)

    # without metadata: every field missing, said once, and what evaluate.remove_metadata gives
    bare = model.classify(heldout, batch_size=5)
    notices = [line for line in capsys.readouterr().err.splitlines() if "none was given" in line]
    assert len(notices) == 1 and "predicting with every field missing" in notices[0]
    assert np.abs(bare.submission.iloc[:, 1:].to_numpy() - expected.iloc[:, 1:8].to_numpy()).max() > 1e-4
    images, index = load_prepared(trained / "data/prepared")
    rows = split_rows(index, load_split(trained / "data/split.csv"), "test")
    checkpoint = load_checkpoint(trained / "models/model.pt")
    removed = evaluate(checkpoint, images[rows], 64, "cpu", metadata=index.iloc[rows], remove=FIELDS)
    np.testing.assert_allclose(bare.submission.iloc[:, 1:].to_numpy(), removed, atol=1e-5)


def test_the_removed_metadata_evaluation_is_a_stage_param(trained, tmp_path):
    """evaluate.remove_metadata: the stage's metrics say which fields it removed."""
    project = tmp_path / "project"
    shutil.copytree(trained, project, ignore=shutil.ignore_patterns("*.zip"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["remove_metadata"] = ["sex", "age"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stdout = run_stages(project, ("evaluate",))  # the stage's main() reading params.yaml, in this process
    metrics = json.loads((project / "metrics/metrics.json").read_text())
    assert metrics["metadata_removed"] == "age,sex"
    assert "removed: age,sex" in stdout
    before = pd.read_csv(trained / "predictions/test.csv").iloc[:, 1:8].to_numpy()
    assert np.abs(pd.read_csv(project / "predictions/test.csv").iloc[:, 1:8].to_numpy() - before).max() > 1e-6


def test_the_export_stage_takes_the_metadata_and_predict_reads_it(trained, training_csv, heldout, tmp_path,
                                                                 capsys):
    """The export stage writes a metadata model (the fields a second graph input), checked
    against PyTorch on the test images' own fields; `hmnist predict` with export/model.onnx
    and --metadata gives the checkpoint's probabilities, with the fields and without them."""
    from hmnist.onnx_export import TOLERANCE
    from hmnist.onnx_model import OnnxModel

    project = tmp_path / "project"
    shutil.copytree(trained, project, ignore=shutil.ignore_patterns("*.zip"))
    stdout = run_stages(project, ("export",))
    assert "exported resnet9" in stdout
    onnx_model = OnnxModel(project / "export/model.onnx")
    assert onnx_model.encoding is not None and onnx_model.encoding.fields == tuple(FIELDS)
    pt = hmnist.load(project / "models/model.pt", device="cpu")
    exported = hmnist.load(project / "export/model.onnx", device="cpu")
    for given in (training_csv, None):
        expected = pt.classify(heldout, batch_size=5, metadata=given)
        result = exported.classify(heldout, batch_size=7, metadata=given)
        assert result.submission["image"].tolist() == expected.submission["image"].tolist()
        for ours, theirs in ((result.submission, expected.submission), (result.calibrated, expected.calibrated)):
            np.testing.assert_allclose(ours.iloc[:, 1:].to_numpy(), theirs.iloc[:, 1:].to_numpy(), atol=TOLERANCE)
        pd.testing.assert_frame_equal(result.decisions, expected.decisions)
    notices = [line for line in capsys.readouterr().err.splitlines() if "none was given" in line]
    assert len(notices) == 2 and "model.onnx reads patient metadata (age, sex, localization)" in notices[1]


def test_isic_archive_names_map_onto_ham10000s(trained, training_csv, heldout, capsys):
    ham = pd.read_csv(training_csv, dtype=str)
    ham = ham[ham["image_id"].isin(split_ids(trained, "test"))]
    to_isic = {"back": "posterior torso", "trunk": "anterior torso", "lower extremity": "lower extremity",
               "face": "head/neck", "abdomen": "abdomen"}  # abdomen: a HAM10000 value, kept as it is
    isic = pd.DataFrame({"isic_id": ham["image_id"], "age_approx": ham["age"], "sex": ham["sex"],
                         "anatom_site_general": ham["localization"].map(to_isic)})
    path = training_csv.with_name("isic.csv")
    isic.to_csv(path, index=False)
    model = hmnist.load(trained / "models/model.pt", device="cpu")
    from_isic = model.predict(heldout, metadata=path)
    # what the mapping means in HAM10000's names: head/neck is one of face, scalp, ear, neck: unknown
    mapped = ham.assign(localization=ham["localization"].replace({"face": "unknown"}))
    mapped_path = training_csv.with_name("mapped.csv")
    mapped.to_csv(mapped_path, index=False)
    from_ham = model.predict(heldout, metadata=mapped_path)
    np.testing.assert_allclose(from_isic.iloc[:, 1:].to_numpy(), from_ham.iloc[:, 1:].to_numpy(), atol=1e-6)
    assert (ham["localization"] == "face").any()  # the unknown case is exercised
    plain = model.predict(heldout, metadata=training_csv)
    assert np.abs(plain.iloc[:, 1:].to_numpy() - from_isic.iloc[:, 1:].to_numpy()).max() > 1e-6
    capsys.readouterr()


def test_missing_fields_and_unrecognised_values_are_documented_fallbacks(trained, training_csv, heldout, capsys):
    ham = pd.read_csv(training_csv, dtype=str)
    ham = ham[ham["image_id"].isin(split_ids(trained, "test"))]
    only_age = training_csv.with_name("only_age.csv")
    ham[["image_id", "age"]].assign(sex=np.where(np.arange(len(ham)) == 0, "intersex", ham["sex"])).to_csv(
        only_age, index=False)
    model = hmnist.load(trained / "models/model.pt", device="cpu")
    frame = model.predict(heldout, metadata=only_age)
    err = capsys.readouterr().err
    assert "has no localization column: read as missing for every image" in err
    assert "sex value(s) 'intersex' (1 rows) read as unknown" in err
    blank = ham.assign(localization="", sex=np.where(np.arange(len(ham)) == 0, "", ham["sex"]))
    blank_path = training_csv.with_name("blank.csv")
    blank.to_csv(blank_path, index=False)
    np.testing.assert_allclose(frame.iloc[:, 1:].to_numpy(), model.predict(heldout, metadata=blank_path)
                               .iloc[:, 1:].to_numpy(), atol=1e-6)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_metadata_files_are_one_line_errors(trained, training_csv, heldout, tmp_path, capsys):
    ids = sorted(p.stem for p in heldout.glob("*.jpg"))
    good = "image,age,sex,localization\n" + "".join(f"{i},50,male,back\n" for i in ids)
    cases = {
        "missing_row": ("image,age,sex,localization\n" + "".join(f"{i},50,male,back\n" for i in ids[1:]),
                        f"has no row for 1 of the {len(ids)} image(s): {ids[0]}"),
        "duplicate": (good + f"{ids[0]},60,female,face\n", f"lists 1 image(s) more than once: {ids[0]}"),
        "malformed_age": (good.replace(f"{ids[2]},50", f"{ids[2]},fifty"),
                          "line 4: age 'fifty' is not an age in years between 0 and 120"),
        "negative_age": (good.replace(f"{ids[0]},50", f"{ids[0]},-3"), "line 2: age '-3' is not an age in years"),
        "no_image_column": (good.replace("image,", "name,"), "needs one image column (image, image_id, isic_id, "
                                                             "image_name)"),
        "two_image_columns": (good.replace("image,age", "image,image_id").replace(",50,", ",x,"),
                              "it has several (image, image_id): keep one"),
        "both_names": (good.replace("localization", "anatom_site_general").replace("image,age", "image,age_approx,age")
                       .replace(",50,", ",50,50,"), "gives a field twice, as age and age_approx: keep one column for age"),
        "no_fields": ("image,weight\n" + "".join(f"{i},70\n" for i in ids), "has no metadata column"),
        "no_name": (good + ",50,male,back\n", f"line {len(ids) + 2} has no image name"),
        "empty": ("", "is not a readable CSV file"),
    }
    checkpoint = str(trained / "models/model.pt")
    for name, (text, fragment) in cases.items():
        path = write(tmp_path / f"{name}.csv", text)
        line = main_error(capsys, "--checkpoint", checkpoint, "--device", "cpu", "--metadata", str(path),
                          "--out", str(tmp_path / "out.csv"), str(heldout))
        assert fragment in line and str(path) in line, (name, line)
    assert not (tmp_path / "out.csv").exists()
    line = main_error(capsys, "--checkpoint", checkpoint, "--metadata", str(tmp_path / "absent.csv"), str(heldout))
    assert "absent.csv: no such file" in line
    # the console script: exit 2, one line, no traceback
    result = run([sys.executable, "-m", "hmnist.commands.predict", "--checkpoint", checkpoint, "--device", "cpu",
                  "--metadata", str(tmp_path / "duplicate.csv"), str(heldout)], tmp_path, check=False)
    assert_user_error(result, result.returncode, "more than once")


def test_metadata_for_an_image_only_model_is_an_error(data, synthetic_zip, heldout, tmp_path, capsys):
    images, index, split = data
    model, meta = train(parse_params(mechanics(synthetic_zip, epochs=1)), images, index, split)
    save_checkpoint(tmp_path / "image_only.pt", model, meta)
    path = write(tmp_path / "m.csv", "image,age\nx,50\n")
    line = main_error(capsys, "--checkpoint", str(tmp_path / "image_only.pt"), "--device", "cpu", "--metadata",
                      str(path), str(heldout))
    assert "was trained without metadata (models.<name>.metadata: []): leave --metadata out" in line
    # and without --metadata it predicts as it always did: no notice
    hmnist.load(tmp_path / "image_only.pt", device="cpu").predict(heldout)
    assert "metadata" not in capsys.readouterr().err


def test_inference_model_of_a_damaged_encoding_is_a_damaged_checkpoint(trained, tmp_path):
    state = torch.load(trained / "models/model.pt", weights_only=True)
    state["metadata"] = {"fields": ["age"]}  # its age scaling lost
    torch.save(state, tmp_path / "damaged.pt")
    with pytest.raises(UserError, match="damaged.pt is a damaged hmnist checkpoint: KeyError"):
        inference_model(load_checkpoint(tmp_path / "damaged.pt"), CPU, str(tmp_path / "damaged.pt"))
