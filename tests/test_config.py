import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from hmnist.config import CLASSES, load_params, parse_params, user_path
from hmnist.errors import UserError


def real() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_parse():
    params = load_params(REPO / "params.yaml")
    # the model measured on real images, with offline weights: `dvc repro` trains it on any machine
    assert params.model == "lite0" and params.models["lite0"].arch == "tf_efficientnet_lite0"
    assert params.models["lite0"].pretrained
    assert set(params.models) == {"deit", "swin", "resnet9", "lite0"}
    assert params.models["deit"].arch == "deit_tiny_patch16_224"
    assert (params.models["deit"].resize, params.models["deit"].batch_size) == (224, 128)
    assert (params.models["swin"].resize, params.models["swin"].batch_size) == (224, 64)
    assert CLASSES == ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")


def test_params_are_frozen():
    params = parse_params(real())
    with pytest.raises(Exception):
        params.split.seed = 1


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["split"].update(tset=0.1), "unknown key 'split.tset'"),
    (lambda p: p.update(modle="deit"), "unknown key 'modle'"),
    (lambda p: p["models"]["swin"].update(batchsize=8), "unknown key 'models.swin.batchsize'"),
    (lambda p: p["split"].update(val=-0.1), "split.val must be between 0 and 1"),
    (lambda p: p["split"].update(val=0.5, test=0.5), "split.val + split.test must be below 1"),
    (lambda p: p["models"]["deit"].update(batch_size=0), "models.deit.batch_size must be at least 1"),
    (lambda p: p["models"]["deit"].update(batch_size="big"), "models.deit.batch_size must be int"),
    (lambda p: p["models"]["deit"].update(epochs=2.5), "models.deit.epochs must be int"),
    (lambda p: p["models"]["deit"].update(pretrained="yes"), "models.deit.pretrained must be bool"),
    (lambda p: p.update(model="vgg"), "model 'vgg' is not one of models"),
    (lambda p: p["train"].update(device="tpu"), "train.device must be one of auto, cuda, cpu"),
    (lambda p: p["train"].update(balance="oversample"), "train.balance must be one of"),
    (lambda p: p["models"]["resnet9"].pop("arch"), "missing key 'models.resnet9.arch'"),
    (lambda p: p["prepare"].update(size=8), "prepare.size must be at least 16"),
    (lambda p: p["models"]["deit"].update(layer_decay=0), "models.deit.layer_decay must be in (0, 1]"),
    (lambda p: p["train"].update(mixup=-1), "train.mixup must be >= 0"),
    (lambda p: p["train"].update(mixup_prob=2), "train.mixup_prob must be between 0 and 1"),
    (lambda p: p["train"].update(ema_decay=1.0), "train.ema_decay must be in [0, 1)"),
    (lambda p: p["train"].update(clip_mode="max"), "train.clip_mode must be one of norm, value, agc"),
    (lambda p: p["train"].update(schedule="linear"), "train.schedule must be one of cosine, onecycle"),
    (lambda p: p["models"]["lite0"].update(schedule="step"),
     "models.lite0.schedule must be one of cosine, onecycle or null (train.schedule)"),
    (lambda p: p["models"]["lite0"].update(clip_grad=-1), "models.lite0.clip_grad must be >= 0 or null (train.clip_grad)"),
    (lambda p: p["train"].update(select="first"), "train.select must be one of last, best, smoothed"),
    (lambda p: p["train"].update(swa_epochs=-1), "train.swa_epochs must be >= 0 (0 = off)"),
    (lambda p: p["train"].update(swa_lr=0), "train.swa_lr must be positive"),
    (lambda p: p["train"].update(swa_epochs=2, select="best"),
     "train.swa_epochs needs train.select: last and train.ema_decay: 0"),
    (lambda p: p["train"].update(swa_epochs=2, ema_decay=0.9), "train.swa_epochs needs train.select: last"),
    (lambda p: p["train"].update(swa_epochs=8), "train.swa_epochs must be below models.lite0.epochs (8)"),
    (lambda p: p["models"]["deit"].update(epochs=0), "models.deit.epochs must be at least 1"),
    (lambda p: p["models"]["deit"].update(lr=0), "models.deit.lr must be positive"),
    (lambda p: p["models"]["deit"].update(weight_decay=-1), "models.deit.weight_decay must be >= 0"),
    (lambda p: p["models"]["deit"].update(drop_path_rate=1), "models.deit.drop_path_rate must be in [0, 1)"),
    (lambda p: p["prepare"].update(workers=-1), "prepare.workers must be >= 0"),
    (lambda p: p["train"].update(label_smoothing=1), "train.label_smoothing must be in [0, 1)"),
    (lambda p: p["train"].update(warmup_epochs=-1), "train.warmup_epochs must be >= 0"),
    (lambda p: p["train"].update(crop_area_min=0), "train.crop_area_min must be in (0, 1]"),
    (lambda p: p["train"].update(color_jitter=1), "train.color_jitter must be in [0, 1)"),
    (lambda p: p["train"].update(cutmix=-1), "train.cutmix must be >= 0 (a Beta alpha; 0 = off)"),
    (lambda p: p["train"].update(clip_grad=-1), "train.clip_grad must be >= 0 (0 = off)"),
    (lambda p: p["data"].update(dataset="ham10000"), "data.dataset must be owner/name"),
    (lambda p: p["evaluate"].update(bootstrap=50), "evaluate.bootstrap must be 0 (no intervals) or at least 100 resamples"),
    (lambda p: p["cv"].update(folds=21), "cv.folds must be between 1 and 20"),
    (lambda p: p["cv"].update(other_folds=3), "cv.other_folds must be a list"),
    (lambda p: p.update(train=5), "train must be a mapping, got 5"),
    (lambda p: p.update(models={}), "models must be a non-empty mapping of names to settings"),
    (lambda p: p["split"].update(seed=None), "split.seed must be set (got null)"),
    (lambda p: p["split"].update(seed=-1), "split.seed must be between 0 and 4294967295 (2**32 - 1), got -1"),
    (lambda p: p["train"].update(seed=-1), "train.seed must be between 0 and 4294967295 (2**32 - 1), got -1"),
    (lambda p: p["train"].update(seed=99999999999999999999),
     "train.seed must be between 0 and 4294967295 (2**32 - 1), got 99999999999999999999"),
    (lambda p: p["evaluate"].update(bootstrap_seed=-1), "evaluate.bootstrap_seed must be between 0 and 4294967295"),
    (lambda p: p["models"]["deit"].update(epochs=True), "models.deit.epochs must be int, got True"),
    (lambda p: p["models"]["deit"].update(lr=True), "models.deit.lr must be float, got True"),
    (lambda p: p["data"].update(source=" "), "data.source must be 'kaggle' or a path to the dataset"),
    (lambda p: p["models"]["deit"].update(arch=""), "models.deit.arch must name a timm architecture"),
    (lambda p: p["models"]["lite0"].update(warmup_epochs=-1),
     "models.lite0.warmup_epochs must be >= 0 or null (train.warmup_epochs), got -1"),
    (lambda p: p["evaluate"].update(tta="flips"), "evaluate.tta is now per model: delete it and set "
                                                  "models.<name>.tta (none, hflip, flips, dihedral), which the "
                                                  "checkpoint keeps"),
    (lambda p: p["models"]["lite0"].update(tta="rotate"),
     "models.lite0.tta must be one of none, hflip, flips, dihedral, got 'rotate'"),
    (lambda p: p["train"].update(calibration="platt"),
     "train.calibration must be one of none, temperature, temperature_bias, auto, got 'platt'"),
    (lambda p: p["train"]["operating_points"][0].update(name="mel sens"),
     "train.operating_points[0].name must be letters, digits and _ . @ + - only, got 'mel sens'"),
    (lambda p: p["train"]["operating_points"][1].update(name="mel@sens0.80"),
     "train.operating_points[0].name 'mel@sens0.80' is used twice: each operating point needs its own"),
    (lambda p: p["train"]["operating_points"][1].update(classes=["mel", "scc"]),
     "train.operating_points[1].classes must be distinct classes of mel, nv, bcc, akiec, bkl, df, vasc, "
     "got ['mel', 'scc']"),
    (lambda p: p["train"]["operating_points"][1].update(classes=list(CLASSES)),
     "train.operating_points[1].classes cannot be every class: every image would be flagged"),
    (lambda p: p["train"]["operating_points"][0].update(sensitivity=1),
     "train.operating_points[0].sensitivity must be between 0 and 1 (exclusive), got 1.0"),
    (lambda p: p["train"]["operating_points"][0].pop("classes"), "missing key 'train.operating_points[0].classes'"),
    (lambda p: p["train"].update(operating_points=[{"name": "x", "classes": ["mel"], "sensitivity": 0.8, "at": 1}]),
     "unknown key 'train.operating_points[0].at'"),
    (lambda p: p["cv"].update(folds=5), "cv.other_folds must be [1, 2, 3, 4] for cv.folds=5 (one train_fold stage each; "
                                        "DVC cannot count to cv.folds by itself): dvc exp run -S cv.folds=5 "
                                        "-S 'cv.other_folds=[1,2,3,4]'"),
])
def test_bad_params_name_the_key(edit, message):
    params = real()
    edit(params)
    with pytest.raises(UserError, match=None) as error:
        parse_params(params)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(UserError, match=rf"^{tmp_path / 'params.yaml'} not found: run from the project root "
                                        r"\(where dvc.yaml is\)$"):
        load_params(tmp_path / "params.yaml")


def test_int_accepted_for_float():
    params = real()
    params["models"]["deit"]["lr"] = 1
    assert parse_params(params).models["deit"].lr == 1.0


def test_stage_rejects_typo_before_work(tmp_path):
    params = real()
    params["split"]["sed"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "hmnist.stages.split"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: params.yaml: unknown key 'split.sed' (known: seed, test, val)")
    assert "Traceback" not in result.stderr


def test_invalid_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("model: [deit\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_params(tmp_path / "params.yaml")


def test_missing_params_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_exponent_without_a_dot_is_a_float():
    """`lr: 4e-3` is a float to YAML 1.2 and to `dvc exp run -S`, a string to PyYAML."""
    params = real()
    params["models"]["deit"]["lr"] = yaml.safe_load("4e-3")
    assert parse_params(params).models["deit"].lr == 4e-3
    params["models"]["deit"]["batch_size"] = "4e3"
    with pytest.raises(UserError, match="batch_size must be int"):
        parse_params(params)


def test_every_param_is_documented():
    """Each key of params.yaml has a row in docs/parameters.md's table (models.<name>.KEY for
    the per-model settings), with the default the file has for the scalar ones outside models."""
    page = (REPO / "docs" / "parameters.md").read_text()
    table = page[page.index("| key | default | meaning |"):]
    table = table[:table.index("\n\n")]
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip().strip("`")
            for line in table.splitlines() if line.startswith("| `")}

    def keys(data: dict, prefix: str = ""):
        for key, value in data.items():
            if isinstance(value, dict):
                yield from keys(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    raw = real()
    missing = []
    for key, value in keys(raw):
        name = "models.<name>." + key.split(".", 2)[2] if key.startswith("models.") else key
        if name not in rows:
            missing.append(name)
        elif not key.startswith("models.") and not isinstance(value, list):
            assert rows[name] == str(value).lower() or yaml.safe_load(rows[name]) == value, (name, rows[name], value)
    assert not missing, f"params without a row in docs/parameters.md: {sorted(set(missing))}"


# ---- a params file read while another run rewrites it ------------------------------------------

def test_an_empty_params_file_is_one_line_naming_it(tmp_path):
    for text in ("", "\n", "# only a comment\n"):
        (tmp_path / "params.yaml").write_text(text)
        with pytest.raises(UserError, match=rf"^{tmp_path / 'params.yaml'} is empty \(is another dvc exp run "
                                            r"rewriting it\? Run experiments side by side with dvc exp run --queue"):
            load_params(tmp_path / "params.yaml")


def test_a_half_written_params_file_never_crashes(tmp_path):
    """Cut the real file at every 11th byte, as a run reading it mid-rewrite would: each read
    gives the params or one line naming the file, never another exception."""
    text = (REPO / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    errors = 0
    for cut in range(0, len(text), 11):
        path.write_text(text[:cut])
        try:
            load_params(path)
        except UserError as e:
            errors += 1
            assert str(e).startswith(str(path)) and "\n" not in str(e), (cut, str(e))
    assert errors > len(text) // 22  # most cuts lose a required key or break the YAML


# ---- ~ and environment variables in paths ------------------------------------------------------

def test_paths_expand_home_and_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HAM_DIR", "/data/ham")
    assert user_path("~/datasets/ham10000.zip") == tmp_path / "datasets/ham10000.zip"
    assert user_path("$HAM_DIR/ham.zip") == Path("/data/ham/ham.zip")
    assert user_path("${HAM_DIR}/w.pth") == Path("/data/ham/w.pth")
    assert user_path("relative/ham.zip") == Path("relative/ham.zip")


def test_the_documented_data_source_examples_parse_in_dvc(tmp_path, monkeypatch):
    """The `dvc exp run -S` example of a local copy (docs/data.md, and the README's if it has
    one) goes through DVC's own override parser (what -S calls) and lands in params.yaml as a
    path that hmnist expands. An unquoted ~ does not parse, and no page shows it unquoted."""
    from dvc.utils.hydra import apply_overrides

    quoted = r"dvc exp run -S '(data\.source=\"~/[^\"]+\")'"
    pages = {path: path.read_text() for path in (REPO / "docs" / "data.md", REPO / "README.md")}
    assert re.search(quoted, pages[REPO / "docs" / "data.md"]), "docs/data.md has no quoted ~ example for data.source"
    for path, text in pages.items():
        assert not re.search(r"-S '?data\.source=~", text), f"{path.name} shows a ~ that -S cannot parse"
        for example in re.findall(quoted, text):
            params = tmp_path / "params.yaml"
            params.write_text((REPO / "params.yaml").read_text())
            apply_overrides(params, [example])
            source = load_params(params).data.source
            assert source == "~/datasets/ham10000.zip", (path.name, source)
            monkeypatch.setenv("HOME", str(tmp_path))
            assert user_path(source) == tmp_path / "datasets/ham10000.zip"
    with pytest.raises(Exception, match="Invalid `--set-param` value"):
        apply_overrides(params, ["data.source=~/datasets/ham10000.zip"])  # what the README said before
