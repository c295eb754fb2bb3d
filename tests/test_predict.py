"""predict: the submission file, agreement with the evaluate stage, the CLI, the API, bad inputs.

A tiny ResNet9 is trained once for the module by running the real stages on the synthetic zip.
"""
from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import hmnist
from hmnist.commands import predict as predict_module
from hmnist.config import CLASSES
from hmnist.errors import UserError
from synthetic import image_folder

from conftest import BIN, LimitedGpu, run, run_stages, tiny_params

HEADER = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
ARCHIVE = Path("data/raw/skin-cancer-mnist-ham10000.zip")


@pytest.fixture(scope="module")
def trained(synthetic_zip, tmp_path_factory) -> Path:
    """A project dir after prepare, split, train and evaluate (no dvc needed), with ResNet9: a
    tiny network's last feature map at 32 px is one pixel, too coarse for a class map."""
    root = tmp_path_factory.mktemp("predict_project")
    params = tiny_params(synthetic_zip, "resnet9")
    params["models"]["resnet9"]["tta"] = "hflip"  # evaluate and predict must both take the checkpoint's
    return staged_project(root, params, synthetic_zip)


def staged_project(root: Path, params: dict, synthetic_zip: Path) -> Path:
    """`root` as a project with `params` and the synthetic archive, after prepare, split, train
    and evaluate, each stage's main() run as `python -m hmnist.stages.NAME` runs it, in this
    process (no dvc needed; conftest.run_stages)."""
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ARCHIVE).parent.mkdir(parents=True)
    shutil.copy(synthetic_zip, root / ARCHIVE)
    run_stages(root, ("prepare", "split", "train", "evaluate"))
    return root


@pytest.fixture(scope="module")
def model(trained):
    return hmnist.load(trained / "models/model.pt", device="cpu")


def image_bytes(archive: Path, image_id: str) -> bytes:
    with zipfile.ZipFile(archive) as f:
        return f.read(f"{image_folder(image_id)}/{image_id}.jpg")


def extract(trained: Path, image_ids: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    paths = [dest / f"{image_id}.jpg" for image_id in image_ids]
    for image_id, path in zip(image_ids, paths):
        path.write_bytes(image_bytes(trained / ARCHIVE, image_id))
    return paths


def split_ids(trained: Path, name: str) -> list[str]:
    split = pd.read_csv(trained / "data/split.csv", dtype=str)
    return sorted(split.loc[split["split"] == name, "image_id"])


def first_jpeg(folder: Path) -> Path:
    return min(p for p in folder.glob("*.jpg") if not p.name.startswith("."))


def assert_submission(frame: pd.DataFrame, images: list[str]) -> None:
    assert list(frame.columns) == HEADER.split(",")
    assert frame["image"].tolist() == sorted(images)
    probs = frame[[c.upper() for c in CLASSES]].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def assert_user_error(result_or_capture, code: int, *fragments: str) -> str:
    """Exit 2, a single `error:` line naming `fragments` on stderr, no traceback."""
    stderr = result_or_capture.stderr if hasattr(result_or_capture, "stderr") else result_or_capture
    assert code == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().endswith(errors[0])
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def main_error(capsys, *argv: str) -> str:
    """Run `python -m hmnist.commands.predict` in this process; return its one error line."""
    with pytest.raises(SystemExit) as exit_info:
        predict_module.main(list(argv))
    return assert_user_error(capsys.readouterr().err, exit_info.value.code)


@pytest.fixture
def images(trained, tmp_path) -> Path:
    """Nested folders of JPEGs (upper- and lower-case extensions), a PNG, and files to ignore."""
    ids = split_ids(trained, "train")[:7]
    folder = tmp_path / "images"
    extract(trained, ids[:3], folder)
    extract(trained, ids[3:5], folder / "a" / "b")
    (folder / "a" / "b" / f"{ids[4]}.jpg").rename(folder / "a" / "b" / f"{ids[4]}.JPEG")
    Image.open(io.BytesIO(image_bytes(trained / ARCHIVE, ids[5]))).save(folder / "a" / f"{ids[5]}.PNG")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden").mkdir()
    extract(trained, ids[6:7], folder / ".hidden")  # hidden folders are skipped, like a shell glob
    (folder / "._ISIC_junk.jpg").write_bytes(b"macOS resource fork")  # hidden file: skipped
    return folder


def test_folder_to_submission_csv_with_console_script(trained, images, tmp_path):
    out = tmp_path / "out" / "predictions.csv"
    result = run([str(BIN / "hmnist"), "predict", "--checkpoint", str(trained / "models/model.pt"),
                  str(images), "--out", str(out), "--batch-size", "4"], tmp_path)
    assert "classified 6 image(s)" in result.stdout
    lines = out.read_text().splitlines()
    assert lines[0] == HEADER
    expected = sorted(p.name.split(".")[0] for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                      and ".hidden" not in p.parts and not p.name.startswith("."))
    assert len(expected) == 6
    assert_submission(pd.read_csv(out), expected)
    assert not list(out.parent.glob("*.partial"))


def test_matches_evaluate_stage(trained, model, tmp_path, capsys):
    """The test split's images, predicted from JPEG files, get the evaluate stage's probabilities."""
    ids = split_ids(trained, "test")
    extract(trained, ids, tmp_path / "test_images")
    expected = pd.read_csv(trained / "predictions/test.csv")
    assert expected["image"].tolist() == ids

    result = model.classify(tmp_path / "test_images", batch_size=5)  # batches unlike evaluate's
    frame = result.submission
    assert_submission(frame, ids)
    np.testing.assert_allclose(frame.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:8].to_numpy(), atol=1e-5)
    # with the checkpoint's TTA (hflip), not without
    plain = model.predict(tmp_path / "test_images", tta="none")
    assert np.abs(plain.iloc[:, 1:].to_numpy() - expected.iloc[:, 1:8].to_numpy()).max() > 1e-4
    calibrated = pd.read_csv(trained / "predictions/test_calibrated.csv")
    assert calibrated["image"].tolist() == ids and (calibrated["dx"] == expected["dx"]).all()
    np.testing.assert_allclose(result.calibrated.iloc[:, 1:].to_numpy(), calibrated.iloc[:, 1:8].to_numpy(), atol=1e-5)

    # `python -m hmnist.commands.predict`, writing to stdout, says the same (its main() here: the
    # console script's process is test_folder_to_submission_csv_with_console_script's)
    capsys.readouterr()
    predict_module.main(["--checkpoint", str(trained / "models/model.pt"), "--device", "cpu", "--out", "-",
                         str(tmp_path / "test_images")])
    result = capsys.readouterr()
    from_stdout = pd.read_csv(io.StringIO(result.out))
    np.testing.assert_allclose(from_stdout.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:8].to_numpy(), atol=1e-5)
    assert "wrote stdout" in result.err


def test_tta_gives_other_valid_probabilities(trained, model, images):
    plain = model.predict(images)
    tta = model.predict(images, tta=True)
    assert_submission(tta, plain["image"].tolist())
    assert np.abs(tta.iloc[:, 1:].to_numpy() - plain.iloc[:, 1:].to_numpy()).max() > 1e-4


def test_evaluate_tta_matches_predict_tta(trained, model, tmp_path):
    from hmnist.stages import evaluate as evaluate_module
    from hmnist.data import load_prepared, load_split, split_rows
    from hmnist.models import load_checkpoint

    images, index = load_prepared(trained / "data/prepared")
    rows = split_rows(index, load_split(trained / "data/split.csv"), "test")
    ids = index["image_id"].iloc[rows].tolist()
    extract(trained, ids, tmp_path / "test_images")
    for tta in ("flips", "dihedral"):
        probs = evaluate_module.evaluate(load_checkpoint(trained / "models/model.pt"), images[rows], 64, "cpu", tta)
        frame = model.predict(tmp_path / "test_images", tta=tta)
        np.testing.assert_allclose(frame.iloc[:, 1:].to_numpy(), probs, atol=1e-5)


def test_tta_modes(trained, model, images):
    plain, flips = model.predict(images, tta="none"), model.predict(images, tta="flips")
    dihedral = model.predict(images, tta="dihedral")
    assert_submission(dihedral, plain["image"].tolist())
    np.testing.assert_allclose(model.predict(images, tta=True).iloc[:, 1:], flips.iloc[:, 1:])
    assert np.abs(dihedral.iloc[:, 1:].to_numpy() - flips.iloc[:, 1:].to_numpy()).max() > 1e-4
    hflip = model.predict(images, tta="hflip")
    assert np.abs(hflip.iloc[:, 1:].to_numpy() - flips.iloc[:, 1:].to_numpy()).max() > 1e-4
    np.testing.assert_allclose(model.predict(images).iloc[:, 1:], hflip.iloc[:, 1:])  # the checkpoint's
    with pytest.raises(UserError, match="tta must be one of none, hflip, flips, dihedral"):
        model.predict(images, tta="rotate")


def test_predict_out_of_memory_halves_the_batch(trained, images, capsys):
    small_gpu = hmnist.load(trained / "models/model.pt", device="cpu")
    expected = small_gpu.predict(images, batch_size=4)
    small_gpu.members[0].model = LimitedGpu(small_gpu.members[0].model, max_eval_batch=2).eval()
    frame = small_gpu.predict(images, batch_size=4)  # decoded batches of 4 and 2
    assert capsys.readouterr().err.count("out of GPU memory in inference; continuing with batches of 2") == 1
    np.testing.assert_allclose(frame.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:8].to_numpy(), atol=1e-5)
    small_gpu.members[0].model.max_eval_batch = 0
    with pytest.raises(UserError, match="out of GPU memory even for one image at a time"):
        small_gpu.predict(images)


def test_evaluate_out_of_memory_halves_the_batch(trained, monkeypatch, capsys):
    from hmnist.stages import evaluate as evaluate_module
    from hmnist.data import load_prepared
    from hmnist.models import load_checkpoint

    checkpoint = load_checkpoint(trained / "models/model.pt")
    images, _ = load_prepared(trained / "data/prepared")
    expected = evaluate_module.evaluate(checkpoint, images[:20], 64, "cpu")
    real = evaluate_module.inference_model
    monkeypatch.setattr(evaluate_module, "inference_model", lambda checkpoint, device: (
        LimitedGpu(real(checkpoint, device)[0], max_eval_batch=3).eval(), real(checkpoint, device)[1]))
    probs = evaluate_module.evaluate(checkpoint, images[:20], 64, "cpu")
    assert "out of GPU memory in inference; continuing with batches of 32" in capsys.readouterr().err
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_api(trained, model, images):
    assert model.classes == list(CLASSES)
    assert (model.arch, model.model_name, model.input_size, model.prepare_size) == ("resnet9", "resnet9", 32, 32)
    assert model.device == torch.device("cpu")
    one = first_jpeg(images)
    # a folder and a file inside it: the file is counted once; a single path needs no list
    frame = model.predict([images, one, str(one)])
    assert len(frame) == 6
    assert model.predict(one)["image"].tolist() == [one.stem]
    assert frame.attrs["skipped"] == []


def test_api_argument_errors():
    """What only a Python caller can get wrong; the command line's choices rule these out."""
    from hmnist.inference import tta_views

    with pytest.raises(UserError, match="^no checkpoint given$"):
        hmnist.load([], device="cpu")
    with pytest.raises(UserError, match=r"^--device must be one of auto, cuda, cuda:K, cpu, got 'gpu'$"):
        hmnist.load("models/model.pt", device="gpu")  # the device is checked before the checkpoint is read
    with pytest.raises(UserError, match=r"^test-time augmentation must be one of none, hflip, flips, dihedral, got 'turns'$"):
        tta_views(torch.zeros(1, 3, 4, 4), "turns")


def test_import_is_light():
    code = "import sys, hmnist; assert callable(hmnist.load); print(sorted(m for m in ('torch', 'timm', 'pandas') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_bad_images_stop_or_are_skipped(trained, model, images, tmp_path, capsys):
    checkpoint = str(trained / "models/model.pt")
    good = sorted(p.name.split(".")[0] for p in images.rglob("*")
                  if p.is_file() and ".hidden" not in p.parts and p.suffix != ".txt" and not p.name.startswith("."))
    whole = first_jpeg(images).read_bytes()
    truncated = images / "a" / "truncated.jpg"
    truncated.write_bytes(whole[:len(whole) // 2])
    text = images / "text.png"
    text.write_text("hello")
    explicit = tmp_path / "notes.txt"
    explicit.write_text("an explicitly named file that is not an image")

    assert str(truncated) in main_error(capsys, "--checkpoint", checkpoint, "--device", "cpu",
                                        str(images / "a"), "--out", str(tmp_path / "x.csv"))
    line = main_error(capsys, "--checkpoint", checkpoint, "--device", "cpu", str(text), "--out", str(tmp_path / "x.csv"))
    assert str(text) in line and "not an image" in line and "--skip-bad" in line
    line = main_error(capsys, "--checkpoint", checkpoint, "--device", "cpu", str(explicit), "--out", str(tmp_path / "x.csv"))
    assert str(explicit) in line and "not a JPEG or PNG" in line
    assert not (tmp_path / "x.csv").exists()
    with pytest.raises(UserError, match="truncated.jpg"):
        model.predict(images)

    out = tmp_path / "good.csv"
    predict_module.main(["--checkpoint", checkpoint, "--device", "cpu", "--skip-bad", "--batch-size", "3",
                         str(images), str(explicit), "--out", str(out)])
    stderr = capsys.readouterr().err
    bad = [str(explicit), str(text), str(truncated)]
    for path in bad:
        assert f"warning: skipping {path}: " in stderr
    assert stderr.splitlines()[-4:] == ["skipped 3 file(s) that could not be read as images:",
                                        *(f"  {p}" for p in sorted(bad))]
    assert_submission(pd.read_csv(out), good)

    with pytest.raises(UserError, match="none of the 2 input file"):
        model.predict([truncated, text], skip_bad=True)


def test_path_errors(trained, images, tmp_path, capsys):
    checkpoint = str(trained / "models/model.pt")
    missing = tmp_path / "no_such_folder"
    line = main_error(capsys, "--checkpoint", checkpoint, str(images), str(missing))
    assert f"{missing}: no such file or folder" in line

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("no images here")
    line = main_error(capsys, "--checkpoint", checkpoint, str(empty))
    assert f"no JPEG or PNG images (.jpg, .jpeg, .png) found in {empty}" in line

    # two files that would both be row ISIC_x: ambiguous, whatever their folders or extensions
    first = first_jpeg(images)
    twin = tmp_path / "elsewhere" / f"{first.stem}.png"
    twin.parent.mkdir()
    Image.open(first).save(twin)
    line = main_error(capsys, "--checkpoint", checkpoint, str(images), str(twin))
    assert str(first) in line and str(twin) in line and f"'{first.stem}'" in line

    if not torch.cuda.is_available():
        line = main_error(capsys, "--checkpoint", checkpoint, "--device", "cuda", str(images))
        assert "no CUDA GPU" in line


class RunsCode:
    """Unpickling this (unsafely) creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_errors(trained, images, tmp_path, capsys):
    real = (trained / "models/model.pt").read_bytes()
    marker = tmp_path / "code_ran"
    cases = {
        "missing.pt": None,
        "truncated.pt": real[: len(real) // 2],
        "random.pt": np.random.default_rng(0).bytes(4096),
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, tmp_path / "foreign.pt")
    torch.save({"payload": RunsCode(marker)}, tmp_path / "evil_torch.pt")
    (tmp_path / "evil_pickle.pt").write_bytes(pickle.dumps(RunsCode(marker), protocol=2))

    expected = {
        "missing.pt": "not found",
        "truncated.pt": "not a readable hmnist checkpoint",
        "random.pt": "not a readable hmnist checkpoint",
        "foreign.pt": "is not an hmnist checkpoint",
        "evil_torch.pt": "not a readable hmnist checkpoint",
        "evil_pickle.pt": "not a readable hmnist checkpoint",
    }
    for name, words in expected.items():
        line = main_error(capsys, "--checkpoint", str(tmp_path / name), str(images))
        assert str(tmp_path / name) in line and words in line, line
        with pytest.raises(UserError, match=words):
            hmnist.load(tmp_path / name)
    assert not marker.exists(), "loading a checkpoint ran code from it"

    # the console script reports the same way
    result = run([str(BIN / "hmnist"), "predict", "--checkpoint", str(tmp_path / "evil_torch.pt"), str(images)],
                 tmp_path, check=False)
    assert_user_error(result, result.returncode, "evil_torch.pt", "not a readable hmnist checkpoint")
    assert not marker.exists()

    # the payload is live: an unsafe load would have run it, so the checks above could fail
    torch.load(tmp_path / "evil_torch.pt", weights_only=False)
    assert marker.exists()


def test_damaged_checkpoint_with_our_format(trained, images, tmp_path):
    state = torch.load(trained / "models/model.pt", weights_only=True)
    state["state_dict"] = {k: v for k, v in list(state["state_dict"].items())[:-2]}  # weights missing
    torch.save(state, tmp_path / "damaged.pt")
    with pytest.raises(UserError, match="damaged.pt is a damaged hmnist checkpoint: RuntimeError"):
        hmnist.load(tmp_path / "damaged.pt", device="cpu")


def test_explain_writes_each_images_map(trained, model, images, tmp_path, capsys):
    from hmnist.cam import class_maps, overlay
    from hmnist.image_files import read_image

    out, maps = tmp_path / "predictions.csv", tmp_path / "maps"
    predict_module.main(["--checkpoint", str(trained / "models/model.pt"), str(images), "--out", str(out),
                         "--explain", str(maps), "--device", "cpu", "--batch-size", "4"])
    assert f"and their maps to {maps}" in capsys.readouterr().out
    frame = pd.read_csv(out)
    assert sorted(p.stem for p in maps.glob("*.png")) == frame["image"].tolist()
    # each is the map for the predicted class over the image as the model saw it
    first = next(p for p in images.rglob("*") if p.stem == frame["image"][0])
    image, _ = read_image(first, model.prepare_size)
    predicted = frame[[c.upper() for c in CLASSES]].to_numpy()[0].argmax()
    member = model.members[0]
    heat = class_maps(member.model, member.model_input, torch.from_numpy(image[None]), np.array([predicted]))[0]
    assert heat.max() == pytest.approx(1, abs=1e-3) and heat.min() < 0.5  # a map, not empty or flat
    written = np.asarray(Image.open(maps / f"{frame['image'][0]}.png"))
    assert written.shape == (model.prepare_size, model.prepare_size, 3)
    assert np.abs(written.astype(int) - overlay(image, heat)).max() <= 1
def test_a_folder_as_checkpoint_says_so(trained, images, tmp_path, capsys):
    line = main_error(capsys, "--checkpoint", str(trained / "models"), str(images))
    assert line == f"error: checkpoint {trained / 'models'} is a folder: give one of its checkpoints, " \
                   f"e.g. {trained / 'models/model.pt'}"
    (tmp_path / "empty").mkdir()
    line = main_error(capsys, "--checkpoint", str(tmp_path / "empty"), str(images))
    assert line == f"error: checkpoint {tmp_path / 'empty'} is a folder, with no .pt checkpoint in it"


def test_moving_the_model_fails_as_itself(trained, monkeypatch):
    """A full GPU is the user's to fix (one line); a CUDA fault is not a damaged checkpoint, and
    keeps its traceback."""
    faults = iter([torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"),
                   RuntimeError("CUDA error: an illegal memory access was encountered")])

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device):
            raise next(faults)
        return self

    monkeypatch.setattr(torch.nn.Module, "to", to)
    path = trained / "models/model.pt"
    with pytest.raises(UserError, match=rf"^out of GPU memory moving the model of {path} to cpu: free the GPU"):
        hmnist.load(path, device="cpu")
    with pytest.raises(RuntimeError, match="illegal memory access") as error:
        hmnist.load(path, device="cpu")
    assert not isinstance(error.value, UserError)


def test_decisions_csv_applies_the_checkpoints_thresholds(trained, images, tmp_path, capsys):
    """Beside the submission: the calibrated probabilities (the checkpoint's calibration of the
    submission's), and the decisions: the argmax class, and yes where the calibrated probability
    of an operating point's classes reaches the checkpoint's threshold."""
    from hmnist import calibration
    from hmnist.models import load_checkpoint

    checkpoint = load_checkpoint(trained / "models/model.pt")
    assert checkpoint["tta"] == "hflip" and checkpoint["calibration"]["method"] in ("temperature", "temperature_bias")
    points = checkpoint["operating_points"]
    assert [p["name"] for p in points] == ["mel@sens0.80", "malignant@sens0.90"]
    out = tmp_path / "out" / "new.csv"
    capsys.readouterr()
    predict_module.main(["--checkpoint", str(trained / "models/model.pt"), str(images), "--out", str(out)])
    stdout = capsys.readouterr().out
    assert "new_calibrated.csv" in stdout and "new_decisions.csv" in stdout
    submission = pd.read_csv(out)
    assert_submission(submission, submission["image"].tolist())
    calibrated = pd.read_csv(out.with_name("new_calibrated.csv"))
    assert calibrated.columns.tolist() == submission.columns.tolist()
    expected = calibration.apply(submission.iloc[:, 1:].to_numpy(np.float32), checkpoint["calibration"])
    np.testing.assert_allclose(calibrated.iloc[:, 1:].to_numpy(), expected, atol=1e-5)
    decisions = pd.read_csv(out.with_name("new_decisions.csv"), keep_default_na=False)
    assert decisions.columns.tolist() == ["image", "class", "mel@sens0.80", "malignant@sens0.90"]
    assert decisions["image"].tolist() == submission["image"].tolist()
    assert decisions["class"].tolist() == [CLASSES[i] for i in submission.iloc[:, 1:].to_numpy().argmax(1)]
    for op in points:
        score = calibrated[[c.upper() for c in op["classes"]]].sum(axis=1).to_numpy()
        assert decisions[op["name"]].tolist() == ["yes" if s >= op["threshold"] else "no" for s in score]


def test_a_checkpoint_from_before_tta_calibration_and_operating_points(trained, images, tmp_path):
    """An older checkpoint has none of the new keys: no TTA, probabilities as they are, no decisions."""
    state = torch.load(trained / "models/model.pt", weights_only=True)
    for key in ("tta", "calibration", "operating_points"):
        del state[key]
    torch.save(state, tmp_path / "old.pt")
    old = hmnist.load(tmp_path / "old.pt", device="cpu").classify(images)
    new = hmnist.load(trained / "models/model.pt", device="cpu").predict(images, tta="none")
    np.testing.assert_allclose(old.submission.iloc[:, 1:].to_numpy(), new.iloc[:, 1:].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(old.calibrated.iloc[:, 1:].to_numpy(), old.submission.iloc[:, 1:].to_numpy())
    assert old.decisions.columns.tolist() == ["image", "class"]


def test_evaluate_writes_each_output_whole(trained, tmp_path, monkeypatch, capsys):
    """A write that fails half-way (a full disk) leaves the previous file, not half a new one."""
    from matplotlib.figure import Figure

    from hmnist.stages import evaluate as evaluate_module

    project = tmp_path / "project"
    shutil.copytree(trained, project)
    monkeypatch.chdir(project)
    before = (project / "plots/roc.png").read_bytes()
    real_savefig = Figure.savefig

    def full_disk(self, fname, *args, **kwargs):
        if "roc" in str(fname):
            Path(fname).write_bytes(b"\x89PNG half a plot")
            raise OSError(28, "No space left on device")
        return real_savefig(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(SystemExit) as stopped:
        evaluate_module.main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: cannot write plots/roc.png: No space left on device")
    assert (project / "plots/roc.png").read_bytes() == before
    assert not list(project.rglob("*.partial"))


def saved(image: Image.Image, path: Path, format: str = "PNG") -> Path:
    image.save(path, format)  # a TIFF under a .png name too: PIL goes by the content
    return path


def test_high_bit_depth_images_scale_to_8_bits(tmp_path):
    """16-bit greyscale (a PNG from a scanner, a TIFF in either byte order) decodes as its 8-bit
    equivalent, not clipped to white; LA and PA keep their colours; 32-bit integer and float
    images, whose range is unknown, are refused, never guessed."""
    from hmnist.data import decode_image

    grey = np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint8)
    wide = grey.astype(np.uint16) * 257  # the same brightness on the 16-bit scale
    expected = decode_image(saved(Image.fromarray(grey, "L"), tmp_path / "grey8.png").read_bytes(), 32)
    sixteen = {"I;16 PNG": saved(Image.fromarray(wide), tmp_path / "a.png"),
               "I;16 TIFF": saved(Image.fromarray(wide), tmp_path / "b.png", "TIFF"),
               "I;16B TIFF": saved(Image.frombytes("I;16B", (64, 48), wide.astype(">u2").tobytes()),
                                   tmp_path / "c.png", "TIFF")}
    for name, path in sixteen.items():
        with Image.open(path) as opened:
            assert opened.mode == name.split()[0], name  # the mode the test means to exercise
        np.testing.assert_array_equal(decode_image(path.read_bytes(), 32), expected, err_msg=name)
    alpha = np.full_like(grey, 100)
    la = saved(Image.fromarray(np.stack([grey, alpha], -1), "LA"), tmp_path / "la.png")
    np.testing.assert_array_equal(decode_image(la.read_bytes(), 32), expected)
    palette = Image.fromarray(grey, "L").convert("P")
    pa = saved(palette.convert("PA"), tmp_path / "pa.png", "TIFF")
    with Image.open(pa) as opened:
        assert opened.mode == "PA"
    np.testing.assert_array_equal(decode_image(pa.read_bytes(), 32), np.array(palette.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)))
    for kind, mode, array in (("a 32-bit integer image", "I", wide.astype(np.int32)),
                              ("a floating-point image", "F", wide.astype(np.float32))):
        path = saved(Image.fromarray(array), tmp_path / f"{mode}.png", "TIFF")
        with pytest.raises(ValueError, match=rf"^{kind} \(PIL mode {mode}\) has no fixed brightness range to scale to 8 bits: "
                                             "save it as an 8- or 16-bit PNG, or a JPEG$"):
            decode_image(path.read_bytes(), 32)


def test_predict_16_bit_png_as_its_8_bit_twin(model, tmp_path):
    """The issue's case end to end: a 16-bit greyscale PNG is classified as its 8-bit twin, not
    as a blank white image."""
    grey = np.random.default_rng(1).integers(0, 256, (96, 128), dtype=np.uint8)
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.fromarray(grey, "L").save(folder / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen.png")
    Image.new("L", (128, 96), 255).save(folder / "white.png")
    frame = model.predict(folder).set_index("image")
    np.testing.assert_allclose(frame.loc["sixteen"], frame.loc["eight"], atol=1e-6)
    assert np.abs(frame.loc["sixteen"] - frame.loc["white"]).max() > 1e-4
    path = saved(Image.fromarray(grey.astype(np.float32)), folder / "float.png", "TIFF")
    with pytest.raises(UserError, match=rf"^{path}: cannot decode it as an image: a floating-point image"):
        model.predict(path)


def test_broken_symbolic_links_are_named_or_skipped(trained, model, images, tmp_path, capsys):
    """A dangling link and a link to itself in a folder: without --skip-bad the error names the
    broken link; with it both are skipped with a warning and the other images classified."""
    good = sorted(p.stem for p in images.rglob("*") if p.is_file() and ".hidden" not in p.parts
                  and p.suffix != ".txt" and not p.name.startswith("."))
    dangling, loop = images / "gone.jpg", images / "a" / "loop.png"
    dangling.symlink_to(images / "nowhere.jpg")
    loop.symlink_to(loop)
    checkpoint = str(trained / "models/model.pt")
    line = main_error(capsys, "--checkpoint", checkpoint, "--device", "cpu", str(images), "--out", str(tmp_path / "x.csv"))
    assert line == (f"error: {loop}: a broken symbolic link: it leads to itself, in a loop "
                    "(skip unreadable files with --skip-bad)")
    with pytest.raises(UserError, match=rf"^{dangling}: a broken symbolic link: its target {images / 'nowhere.jpg'} "
                                        r"does not exist \(skip unreadable files with --skip-bad\)$"):
        model.predict(dangling)
    out = tmp_path / "good.csv"
    predict_module.main(["--checkpoint", checkpoint, "--device", "cpu", "--skip-bad", str(images), "--out", str(out)])
    stderr = capsys.readouterr().err
    assert f"warning: skipping {dangling}: a broken symbolic link" in stderr
    assert f"warning: skipping {loop}: a broken symbolic link" in stderr
    assert_submission(pd.read_csv(out), good)


def test_output_path_checked_before_any_work(tmp_path, capsys):
    """--out a folder, or somewhere no file can be made: one line before the checkpoint is even
    read (here it does not exist, and that error would come first otherwise)."""
    from hmnist.data import check_writable

    image = tmp_path / "in" / "ISIC_1.png"
    image.parent.mkdir()
    Image.new("RGB", (8, 8)).save(image)
    missing = str(tmp_path / "no_such.pt")
    line = main_error(capsys, "--checkpoint", missing, str(image), "--out", str(tmp_path))
    assert line == f"error: cannot write {tmp_path}: it is a folder (give a file in it, e.g. {tmp_path / 'predictions.csv'})"
    (tmp_path / "plain").write_text("a file where a folder should be")
    line = main_error(capsys, "--checkpoint", missing, str(image), "--out", str(tmp_path / "plain" / "sub" / "p.csv"))
    assert line == f"error: cannot write {tmp_path / 'plain/sub/p.csv'}: {tmp_path / 'plain'} is not a folder"
    if Path("/proc/self").is_dir():  # Linux: a file system that makes no files, even for root
        line = main_error(capsys, "--checkpoint", missing, str(image), "--out", "/proc/x.csv")
        assert line == "error: cannot write /proc/x.csv: cannot create a file in /proc (no files can be made there)"
    before = sorted(tmp_path.rglob("*"))
    check_writable(tmp_path / "new" / "deeper" / "p.csv", "predictions.csv")  # folders write_whole would make
    assert sorted(tmp_path.rglob("*")) == before  # the check itself leaves nothing behind
    line = main_error(capsys, "--checkpoint", missing, str(image), "--out", str(tmp_path / "new" / "p.csv"))
    assert "checkpoint" in line and "not found" in line  # a writable path: on to the checkpoint
