"""Models by name through timm's registry, ResNet9 included, and the checkpoint format.

`create_model` builds DeiT, Swin, ResNet9 or any other timm architecture with a 7-class
head; ImageNet weights come from the Hugging Face hub or from a local file.
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

from hmnist.config import CLASSES, ModelConfig
from hmnist.errors import UserError

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
    conv256+pool, conv512+pool, residual 2x512, pooling, linear. Adaptive pooling instead of
    a fixed 4x4 max-pool, so any input size works."""

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
        self.pool = nn.AdaptiveMaxPool2d(1)
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
        x = self.drop(self.pool(x).flatten(1))
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
    return build_model_with_cfg(ResNet9, "resnet9", pretrained, **kwargs)


def create_model(config: ModelConfig, num_classes: int = len(CLASSES), pretrained: bool | None = None) -> nn.Module:
    """A timm model with a `num_classes` head at `config.resize`.

    `pretrained=False` skips ImageNet weights whatever the config says (used when a trained
    checkpoint's weights will be loaded on top anyway).
    """
    if config.arch not in timm.list_models():
        raise UserError(f"unknown architecture '{config.arch}': use a name from timm.list_models() or resnet9")
    pretrained = config.pretrained if pretrained is None else pretrained
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if pretrained and config.pretrained_path:
        path = Path(config.pretrained_path)
        if not path.is_file():
            raise UserError(f"pretrained_path {path} does not exist")
        # timm loads the file as it would the hub's: the 1000-class head is dropped and
        # position embeddings are resampled to the input size.
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
    elif pretrained:
        _check_hub(config.arch)
    try:
        return _create(config.arch, pretrained, img_size=config.resize, **kwargs)
    except UserError:
        raise
    except Exception as e:
        if not pretrained:
            raise
        if config.pretrained_path:
            raise UserError(f"cannot load weights for {config.arch} from {config.pretrained_path}: "
                            f"{type(e).__name__}: {_first_line(e)}") from None
        raise UserError(
            f"cannot get ImageNet weights for {config.arch} from the Hugging Face hub "
            f"({type(e).__name__}: {_first_line(e)}): set pretrained_path to a local weights file, "
            f"or pretrained: false to train from scratch"
        ) from None


def _check_hub(arch: str) -> None:
    """Fail in seconds, not after the hub client's minute of retries, when it is unreachable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise UserError(f"timm has no ImageNet weights for {arch}: set pretrained: false, "
                        f"or pretrained_path to a weights file")
    repo, _, revision = hub_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str):
            return  # cached: no network needed
    fix = "set pretrained_path to a local weights file, or pretrained: false to train from scratch"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"ImageNet weights for {arch} are not in the Hugging Face cache and HF_HUB_OFFLINE "
                        f"is set: {fix}")
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face hub ({host}:{port}: {e.strerror or e}) to download "
                        f"ImageNet weights for {arch}: {fix}") from None


def _create(arch: str, pretrained: bool, img_size: int, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=pretrained, img_size=img_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        # CNNs take any input size and have no img_size argument
        return timm.create_model(arch, pretrained=pretrained, **kwargs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no details"


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
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train one with `dvc repro train`")
    try:
        data = path.read_bytes()
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable hmnist checkpoint (truncated or not a torch file): "
                        f"{type(e).__name__}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an hmnist checkpoint (made by `python -m hmnist.train`)")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} is checkpoint version {checkpoint.get('version')}, "
                        f"this hmnist reads version {CHECKPOINT_VERSION}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    config = ModelConfig(**checkpoint["model_config"])
    model = create_model(config, num_classes=len(checkpoint["classes"]), pretrained=False)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module
