"""params.yaml, read into typed, frozen dataclasses.

Every stage calls `load_params()` first, so a typo anywhere in the file fails the first
stage that runs, with one line naming the key, before any work starts.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hmnist.errors import UserError

PARAMS_FILE = "params.yaml"
YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # exponent without a dot: not a float to PyYAML

# ISIC 2018 Task 3 order; the label of an image is its index here. HAM10000 spells them in
# lower case in the `dx` column.
CLASSES = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")
CLASS_INDEX = {name: label for label, name in enumerate(CLASSES)}  # dx -> label
# the classes as an ISIC 2018 submission names its probability columns: MEL, NV, ...
CLASS_COLUMNS = [name.upper() for name in CLASSES]
DEVICES = ("auto", "cuda", "cpu")
BALANCE = ("loss", "sample_loss", "sampler", "none")
# test-time augmentation: the image; + its horizontal flip; + its 3 flips; + 4 right-angle turns
TTA = ("none", "hflip", "flips", "dihedral")
# the probability calibration fitted on the validation split at the end of training (train.calibration)
CALIBRATION = ("none", "temperature", "temperature_bias", "auto")
SCHEDULES = ("cosine", "onecycle")
CLIP_MODES = ("norm", "value", "agc")  # timm's dispatch_clip_grad: total norm, each value, adaptive (per unit)
SELECT = ("last", "best", "smoothed")  # which epoch's weights the train stage keeps (train.select)
# patient metadata a model may read beside the image (models.<name>.metadata; fusion.py): HAM10000's
# age, sex and the lesion's body site
METADATA_FIELDS = ("age", "sex", "localization")
# columns of HAM10000_metadata.csv (and the prepared index) that must never reach a model: dx is the
# label; dx_type (how the diagnosis was confirmed: follow-up is almost only nevi) is a proxy for it;
# lesion_id and image_id are identifiers a model could memorise
LEAKAGE_FIELDS = ("dx", "dx_type", "lesion_id", "image_id", "label")


@dataclass(frozen=True)
class DataConfig:
    source: str = "kaggle"  # "kaggle", or a path to a local copy (the Kaggle zip or its unpacked folder)
    dataset: str = "kmader/skin-cancer-mnist-ham10000"


@dataclass(frozen=True)
class PrepareConfig:
    size: int = 224  # side of the square cache images; 224 serves every default model without upsampling
    workers: int = 0  # decoding processes; 0 means one per CPU core


@dataclass(frozen=True)
class SplitConfig:
    val: float = 0.15
    test: float = 0.15
    seed: int = 42


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # any timm architecture name; resnet9 is registered by hmnist.models
    resize: int = 224  # the model's input side; the cache is resized on the device
    batch_size: int = 64  # effective batch: micro-batches keep it if the GPU runs out of memory
    epochs: int = 10
    lr: float = 5e-4  # peak AdamW learning rate, after warmup
    weight_decay: float = 0.05
    pretrained: bool = False  # ImageNet weights from the Hugging Face hub (or pretrained_path)
    pretrained_path: str | None = None  # local weights file (.safetensors/.pth); no network when set
    # stochastic depth: each residual branch is skipped with a probability rising to this in the
    # last block (timm's drop_path_rate); models without residual branches ignore it
    drop_path_rate: float = 0.0
    # layer-wise learning-rate decay: each layer's lr is lr * layer_decay ** (layers above it), so
    # pretrained early layers move less; 1 = off. Models without timm's layer grouping ignore it
    layer_decay: float = 1.0
    # this model's linear warmup in epochs, instead of train.warmup_epochs (null: that one), e.g.
    # a fine-tuning recipe's short ramp where the train block's suits training from scratch
    warmup_epochs: float | None = None
    # this model's own learning-rate schedule, weight-decay groups and gradient clipping instead of
    # the train block's (null: the train block's), so a fine-tuning recipe measured for one model
    # does not change another's measured defaults
    schedule: str | None = None
    decay_all: bool | None = None
    clip_grad: float | None = None
    # test-time augmentation this model is calibrated, evaluated and predicted with (stored in its
    # checkpoint; the epoch's validation stays one view): none, hflip (2 views), flips (4), dihedral (8)
    tta: str = "none"
    # patient metadata fused with the image (fusion.py): any of age, sex, localization; [] = the
    # image alone. Per model, like tta: it changes the network (a metadata branch and a wider
    # classifier) and what its checkpoint needs at prediction time. Off until measured (BENCHMARKS.md)
    metadata: list[str] = field(default_factory=list)
    # training replaces each metadata field of each image by "missing" with this probability, so the
    # model still works, degraded, when a field (or all) is unknown at prediction time
    metadata_dropout: float = 0.2


@dataclass(frozen=True)
class OperatingPointConfig:
    # the decision's name: the column of `hmnist predict`'s decisions CSV, e.g. mel@sens0.80
    name: str
    # flagged when the sum of the calibrated probabilities of these classes reaches the threshold
    classes: list[str]
    # the threshold is the highest one whose sensitivity on the validation split reaches this
    sensitivity: float


def default_operating_points() -> list[OperatingPointConfig]:
    return [OperatingPointConfig("mel@sens0.80", ["mel"], 0.80),
            OperatingPointConfig("malignant@sens0.90", ["mel", "bcc", "akiec"], 0.90)]


@dataclass(frozen=True)
class TrainConfig:
    device: str = "auto"  # auto: CUDA when present (a GPU no other hmnist run holds), else CPU with a notice; cuda:K pins one
    devices: int | str = 1  # processes of one data-parallel run, one per GPU (or CPU processes); "all": every visible GPU
    seed: int = 0
    warmup_epochs: float = 3.6  # linear warmup, then cosine decay to zero (3.6: 30% of 12 epochs, as OneCycle)
    balance: str = "loss"  # how class imbalance is handled: weighted loss, weighted sampler, or none
    # class weight = (1 / frequency) ** balance_power. 1.0 is plain inverse frequency, which lifts
    # balanced accuracy while wrecking plain accuracy; the square root keeps both.
    balance_power: float = 0.5
    label_smoothing: float = 0.1
    augment: bool = True  # flips, rotation, random resized crop, colour jitter, all on the device
    crop_area_min: float = 1.0  # random resized crop keeps this to 100% of the image's area; 1 = no crop
    rotation: float = 0.0  # largest rotation either way, degrees (180: any; lesions have no "up")
    color_jitter: float = 0.0  # brightness, contrast, saturation within +- this
    # Mixup / CutMix (timm): Beta(alpha, alpha) mixing ratio, 0 = off; with both on, each batch
    # uses one of them at random. mixup_prob: the share of batches mixed
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    # exponential moving average of the weights (timm ModelEmaV3), evaluated every epoch beside
    # the raw weights; the kept checkpoint is the better of the two. 0 = off, else the decay's
    # ceiling: it warms up as 1 - (1 + step) ** -2/3, so short runs average over fewer steps
    ema_decay: float = 0.0
    # which epoch the checkpoint keeps: last (the schedule's end; validation then measures it
    # without having chosen it), best (highest validation balanced accuracy: on a few hundred
    # images that chases noise and flatters itself) or smoothed (highest mean over the epoch and
    # its two neighbours). With EMA on, each epoch's better of raw and EMA weights is the candidate
    select: str = "last"
    # stochastic weight averaging (torch.optim.swa_utils): the last swa_epochs of a model's epochs
    # run after its schedule at a constant swa_lr times each group's peak rate, and the weights
    # after each of them are averaged; the average, its BatchNorm statistics recomputed on the
    # train split, is the model kept. 0 = off (needs select: last and no EMA)
    swa_epochs: int = 0
    swa_lr: float = 0.25
    # the learning-rate schedule: cosine (linear warmup over warmup_epochs, then cosine decay to
    # zero) or onecycle (PyTorch's OneCycleLR: cosine warmup from peak/25 over the same share of
    # the steps, cosine decay to peak/25e4, and Adam's beta1 cycled 0.95 -> 0.85 -> 0.95, as the
    # plain fine-tuning loop runs it)
    schedule: str = "cosine"
    # weight decay on every tensor (true, as AdamW(model.parameters()) in a plain loop), or only
    # on weight matrices and convolutions (false: timm's groups, none on biases and norms)
    decay_all: bool = False
    clip_grad: float = 0.1  # gradient clipping threshold, 0 = off
    clip_mode: str = "value"  # norm (total gradient norm), value (each element), agc (adaptive, per unit)
    compile: bool = False  # torch.compile the model (see BENCHMARKS.md for when it pays off)
    # deterministic kernels only: identical GPU runs, at some speed; CPU runs are identical anyway
    deterministic: bool = False
    # fitted on the validation split after training, on the probabilities of the model's TTA views,
    # by NLL: none, temperature (one T: never changes a prediction), temperature_bias (T and a bias
    # per class: also undoes the class-weighted loss's shift of each class's prior), or auto (the
    # one of the two with the lower NLL on held-out lesions of the validation split, 5-fold)
    calibration: str = "auto"
    # decision thresholds chosen on the validation split (docs/metrics.md, "Operating points")
    operating_points: list[OperatingPointConfig] = field(default_factory=default_operating_points)


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 256  # inference only: no activations kept for backward
    # lesion resamples for the 95% intervals (0: none): the percentile ends need a few thousand
    # to settle; the whole bootstrap is vectorised, so 2,000 cost little (BENCHMARKS.md)
    bootstrap: int = 2000
    bootstrap_seed: int = 0  # same predictions, same intervals
    # metadata fields a metadata model is evaluated without (read as missing, as for an image
    # without them): measures how it degrades; [] = every field it was trained with. No effect on
    # image-only models
    remove_metadata: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CvConfig:
    # 1: one train/val split (split.val). K >= 2: the non-test images are cut into K folds
    # (whole lesions, stratified by class); fold k trains on the others and picks its epoch on
    # fold k; evaluate reports each fold and their ensemble. The test split is the same for any K.
    folds: int = 1
    # [1, ..., K-1]: dvc.yaml makes one train_fold stage per entry (fold 0 is the train stage).
    # DVC's foreach needs a list and cannot count to K, so this restates folds; they must agree.
    other_folds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Params:
    model: str
    models: dict[str, ModelConfig]
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    cv: CvConfig = field(default_factory=CvConfig)

    @property
    def model_config(self) -> ModelConfig:
        return self.models[self.model]


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML scalar to the annotated type, or raise a one-line error."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"{where} must be set (got null)")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # 4e-3: a float in YAML 1.2 (and to DVC), a string to PyYAML's YAML 1.1
        if option is str and isinstance(value, str):
            return value
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise UserError(f"{where} must be {names}, got {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise UserError(f"unknown key '{_join(where, key)}' (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = _join(where, f.name)
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"missing key '{key}'")
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key)
        elif typing.get_origin(tp) is list:
            entries = data[f.name]
            if not isinstance(entries, list):
                raise UserError(f"{key} must be a list, got {entries!r}")
            item_type = typing.get_args(tp)[0]
            kwargs[f.name] = [_build(item_type, v, f"{key}[{i}]") if dataclasses.is_dataclass(item_type)
                              else _check_type(v, item_type, f"{key}[{i}]") for i, v in enumerate(entries)]
        elif typing.get_origin(tp) is dict:
            entries = data[f.name]
            if not isinstance(entries, dict) or not entries:
                raise UserError(f"{key} must be a non-empty mapping of names to settings")
            value_type = typing.get_args(tp)[1]
            kwargs[f.name] = {str(k): _build(value_type, v, _join(key, k)) for k, v in entries.items()}
        else:
            kwargs[f.name] = _check_type(data[f.name], tp, key)
    return cls(**kwargs)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def parse_params(data: Any, source: str = PARAMS_FILE) -> Params:
    try:
        evaluate = data.get("evaluate") if isinstance(data, dict) else None
        if isinstance(evaluate, dict) and "tta" in evaluate:  # before the generic unknown-key error: say where it went
            raise UserError("evaluate.tta is now per model: delete it and set models.<name>.tta "
                            "(none, hflip, flips, dihedral), which the checkpoint keeps")
        params = _build(Params, data if data is not None else {}, "")
        # the rules read this module's vocabularies (TTA, CLASSES, ...): imported here, not at the top
        from hmnist.params_rules import validate

        validate(params)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    return params


# Two `dvc exp run` in one workspace rewrite params.yaml under each other: a stage can read it
# empty or cut short. docs/sharing.md says how to run experiments side by side instead.
REWRITTEN = "is another dvc exp run rewriting it? Run experiments side by side with dvc exp run --queue"


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate the whole params file; raises UserError naming the bad key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root (where dvc.yaml is)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise UserError(f"{path} is empty ({REWRITTEN})")
    return parse_params(data, str(path))


def user_path(text: str) -> Path:
    """A path written in params.yaml, with `~` and $VARIABLES expanded as a shell would."""
    return Path(os.path.expandvars(os.path.expanduser(text)))
