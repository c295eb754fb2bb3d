"""Class-activation maps: where in an image a trained model found its evidence for a class.

Grad-CAM (Selvaraju et al. 2017) through the `grad-cam` package (pytorch-grad-cam): the
activations of one layer, each channel weighted by the mean gradient of the class's
probability, summed and rectified, scaled to 0..1, and blown up to the image. The probability,
not the logit: its gradient is the class's logit against the others' (what made this class win),
while a logit alone can be below zero everywhere in a head with a large negative bias — a
trained ResNet9 on real images gave an all-zero map for every image that way. Which layer, by
model family
(docs/metrics.md, "Class-activation maps"):

- CNNs (resnet9, EfficientNet-Lite, any timm CNN): the feature map `forward_features` returns,
  the last convolutional stage, which the head pools: resnet9's last residual stage (512
  channels at 1/8 of the input), EfficientNet's conv_head (+ its BatchNorm and activation).
  The last stage has the most class-specific channels and still a spatial grid; earlier ones
  are sharper but say less about the class.
- Swin: the same final feature map, which timm keeps channels-last (NHWC); the package's
  reshape-transform hook turns it into NCHW.
- DeiT / ViT: the input of the last block's attention (`blocks[-1].norm1`), with the class (and
  distillation) tokens dropped and the patch tokens laid out on their grid. The final feature
  map would not do: the head reads only the class token, so every patch token's gradient there
  is zero.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from hmnist.augment import ModelInput
from hmnist.fusion import FusedModel


class _Tapped(nn.Module):
    """The model with an identity layer between its features and its head: the hook point
    Grad-CAM needs for "the feature map the head pools", which timm models do not name alike.
    A metadata model's head also reads the batch's encoded metadata rows (`metadata`, set per
    batch), held fixed: the map explains the image part of its decision."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.features = model, nn.Identity()
        self.metadata: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = () if self.metadata is None else (self.metadata,)
        return self.model.forward_head(self.features(self.model.forward_features(x)), *extra)


def _is_token_model(model: nn.Module) -> bool:
    """A ViT-like model (DeiT): patch tokens and, usually, class tokens through `blocks`."""
    return hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")


def target_layer(wrapped: _Tapped) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The layer whose activations are weighted, and the reshape to NCHW the package needs."""
    model = wrapped.model.backbone if isinstance(wrapped.model, FusedModel) else wrapped.model  # its image network
    if _is_token_model(model):
        prefix = int(model.num_prefix_tokens)
        grid = tuple(getattr(model.patch_embed, "grid_size", ()) or ())

        def tokens_to_map(tensor: torch.Tensor) -> torch.Tensor:
            patches = tensor[:, prefix:]
            height, width = grid if len(grid) == 2 else (math.isqrt(patches.shape[1]),) * 2
            return patches.reshape(len(patches), height, width, patches.shape[2]).permute(0, 3, 1, 2)

        return model.blocks[-1].norm1, tokens_to_map
    if getattr(model, "output_fmt", "NCHW") == "NHWC":  # timm's Swin
        return wrapped.features, lambda tensor: tensor.permute(0, 3, 1, 2)
    return wrapped.features, lambda tensor: tensor


def class_maps(model: nn.Module, model_input: ModelInput, images: torch.Tensor, classes: np.ndarray,
               batch_size: int = 32, metadata: torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM maps (N x H x W, each scaled to 0..1; all 0 where no position favours the class)
    of uint8 NHWC `images` for class
    `classes[i]` of image i, at the images' own size. `model_input` preprocesses the images as
    evaluation does (inference.inference_model gives both). A metadata model takes each image's
    encoded `metadata` row (fusion.encoded_for)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    wrapped = _Tapped(model).eval()
    layer, reshape = target_layer(wrapped)
    height, width = images.shape[1:3]
    maps = []
    with GradCAM(model=wrapped, target_layers=[layer], reshape_transform=reshape) as cam:
        for start in range(0, len(images), batch_size):
            x = model_input(images[start:start + batch_size].to(model_input.mean.device))
            if metadata is not None:
                wrapped.metadata = metadata[start:start + batch_size].to(x.device)
            targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes[start:start + batch_size]]
            for heat in cam(input_tensor=x, targets=targets):  # at the model's input size
                maps.append(np.asarray(Image.fromarray(heat.astype(np.float32))
                                       .resize((width, height), Image.Resampling.BILINEAR)))
    return np.clip(np.stack(maps), 0, 1) if maps else np.zeros((0, height, width), np.float32)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A uint8 RGB image with its map over it in the package's jet colours, half and half."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, heat, use_rgb=True, image_weight=0.5)
