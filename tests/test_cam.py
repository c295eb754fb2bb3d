"""Class-activation maps (cam.py): on the right spot for a model whose answer is known, and
defined for every model family the pipeline trains."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from hmnist.augment import ModelInput
from hmnist.cam import _Tapped, class_maps, overlay, target_layer
from hmnist.config import CLASSES, ModelConfig
from hmnist.models import create_model

CPU = torch.device("cpu")


class Brightness(nn.Module):
    """A one-channel 'CNN' with timm's two halves: its feature map is each pixel's brightness, and
    class 0's logit is the mean brightness, so Grad-CAM for class 0 must light up the bright spot."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(self.conv.weight, 1 / 3)

    def forward_features(self, x):
        return torch.relu(self.conv(x))

    def forward_head(self, x):
        mean = x.mean(dim=(2, 3))
        return torch.cat([mean, -mean, torch.zeros(len(x), len(CLASSES) - 2)], dim=1)


def test_the_map_is_where_the_evidence_is():
    images = torch.full((2, 32, 32, 3), 20, dtype=torch.uint8)
    images[0, 2:10, 4:12] = 230    # a bright spot top left
    images[1, 20:30, 22:30] = 230  # and bottom right
    maps = class_maps(Brightness(), ModelInput(32, (0, 0, 0), (1, 1, 1), CPU), images, np.array([0, 0]))
    assert maps.shape == (2, 32, 32)
    for heat, spot in zip(maps, [(slice(2, 10), slice(4, 12)), (slice(20, 30), slice(22, 30))]):
        inside = np.zeros_like(heat, dtype=bool)
        inside[spot] = True
        assert heat[inside].mean() > 0.8 and heat[~inside].mean() < 0.2, (heat[inside].mean(), heat[~inside].mean())
    picture = overlay(images[0].numpy(), maps[0])
    assert picture.shape == (32, 32, 3) and picture.dtype == np.uint8
    assert picture[5, 7, 0] > picture[25, 25, 0]  # jet: red where the map is high, blue where low


def test_token_grid_keeps_each_patch_in_place():
    model = create_model(ModelConfig(arch="deit_tiny_patch16_224", resize=32), pretrained=False)
    layer, reshape = target_layer(_Tapped(model))
    assert layer is model.blocks[-1].norm1
    tokens = torch.arange(1 + 4, dtype=torch.float32)[None, :, None].expand(1, 5, 3)  # class token, then 2x2 patches
    grid = reshape(tokens)
    assert grid.shape == (1, 3, 2, 2) and grid[0, 0].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("arch", ["resnet9", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
                                  "tf_efficientnet_lite0"])
def test_every_family_gives_maps(arch):
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch, resize=64), pretrained=False).eval()
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    maps = class_maps(model, ModelInput(64, (0.5,) * 3, (0.25,) * 3, CPU), images, np.array([0, 3]))
    assert maps.shape == (2, 40, 40) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 and maps.std() > 0  # a map, not a constant
